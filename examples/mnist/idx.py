"""A strict reader for IDX files, the format of the MNIST distribution.

An IDX file is a 4-byte magic number ``00 00 TT DD`` (``TT`` the element type,
``DD`` the number of dimensions), ``DD`` big-endian uint32 sizes, then the
elements in row-major order, big-endian. Files may be gzip-compressed.
Anything that does not match this layout raises :class:`IdxError` naming the
file and what is wrong, rather than a reshape error further down.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

# Element type codes of the IDX format, as big-endian NumPy dtypes.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
  """A file is not a well-formed IDX file (or not the one expected)."""


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if path.endswith(".gz"):
    try:
      with gzip.open(path, "rb") as f:
        return f.read()
    except EOFError as e:
      raise IdxError(
          f"{path}: truncated gzip stream (the download was probably cut "
          f"short): {e}") from e
    except (gzip.BadGzipFile, zlib.error) as e:
      raise IdxError(f"{path}: not a valid gzip file: {e}") from e
  with open(path, "rb") as f:
    return f.read()


def read_idx(
    path: str | os.PathLike,
    *,
    ndim: int | None = None,
) -> np.ndarray:
  """Reads one IDX file (``.gz`` by its suffix) into a NumPy array.

  Args:
    path: the file; a name ending in ``.gz`` is decompressed.
    ndim: if given, the number of dimensions the file must have.

  Returns:
    The array, in native byte order, with the file's shape.

  Raises:
    IdxError: bad magic number, unknown element type, wrong number of
      dimensions, a header or data shorter or longer than the header says, or
      a broken gzip stream. The message names the file.
    FileNotFoundError: the file does not exist.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 4:
    raise IdxError(
        f"{path}: file is {len(data)} bytes long, too short for the 4-byte "
        "IDX magic number")
  if data[0] != 0 or data[1] != 0:
    raise IdxError(
        f"{path}: bad magic number 0x{data[:4].hex()}; an IDX file starts "
        "with two zero bytes (MNIST images: 0x00000803, labels: 0x00000801)")
  code, file_ndim = data[2], data[3]
  if code not in _DTYPES:
    raise IdxError(
        f"{path}: bad magic number 0x{data[:4].hex()}: unknown element type "
        f"0x{code:02x} (known: {', '.join(f'0x{c:02x}' for c in _DTYPES)})")
  if ndim is not None and file_ndim != ndim:
    raise IdxError(
        f"{path}: wrong number of dimensions: the header says {file_ndim}, "
        f"expected {ndim}")
  header = 4 + 4 * file_ndim
  if len(data) < header:
    raise IdxError(
        f"{path}: truncated header: {file_ndim} dimensions need {header} "
        f"bytes, the file has {len(data)}")
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", file_ndim, 4))
  dtype = _DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  found = len(data) - header
  if found < expected:
    raise IdxError(
        f"{path}: truncated data: shape {shape} needs {expected} bytes after "
        f"the {header}-byte header, found {found}")
  if found > expected:
    raise IdxError(
        f"{path}: {found - expected} unexpected trailing bytes: shape {shape} "
        f"needs {expected} bytes after the {header}-byte header, found {found}")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes ``array`` as an IDX file (gzip-compressed if ``path`` ends in .gz).

  Args:
    path: the file to write.
    array: an array of one of the IDX element types (uint8, int8, int16,
      int32, float32, float64).

  Raises:
    TypeError: the array's dtype has no IDX element type.
  """
  array = np.asarray(array)
  code = next((c for c, d in _DTYPES.items() if array.dtype == d.newbyteorder("=")),
              None)
  if code is None:
    raise TypeError(f"IDX has no element type for dtype {array.dtype}")
  dtype = _DTYPES[code]
  data = (bytes([0, 0, code, array.ndim])
          + np.asarray(array.shape, ">u4").tobytes()
          + array.astype(dtype).tobytes())
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
