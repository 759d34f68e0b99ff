"""The example's IDX reader and MNIST loaders, on small files written here."""

import contextlib
import gzip
import os
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from mnist import idx  # noqa: E402
from mnist import input_pipeline  # noqa: E402

IdxError = idx.IdxError


def _header(code, shape):
  return bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes()


@contextlib.contextmanager
def _raises(path, *fragments, error=IdxError):
  """Expects ``error`` with a message naming ``path`` and each fragment."""
  with pytest.raises(error) as info:
    yield
  message = str(info.value)
  assert os.fspath(path) in message, message
  for fragment in fragments:
    assert fragment in message, message


def _write_mnist(directory, n_train=12, n_test=5, gz=False, seed=0):
  """Writes the four MNIST files with random digits; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
      "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  for key, array in arrays.items():
    name = input_pipeline.IDX_FILES[key] + (".gz" if gz else "")
    idx.write_idx(directory / name, array)
  return arrays


# -- read_idx / write_idx ----------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype,shape", [
    (np.uint8, (7, 28, 28)), (np.uint8, (9,)), (np.int8, (3, 4)),
    (np.int16, (2, 3)), (np.int32, (5,)), (np.float32, (2, 2, 2)),
    (np.float64, (3,)),
])
def test_roundtrip(tmp_path, dtype, shape, suffix):
  rng = np.random.default_rng(0)
  array = (rng.standard_normal(shape) * 100).astype(dtype)
  path = tmp_path / f"a.idx{suffix}"
  idx.write_idx(path, array)
  back = idx.read_idx(path)
  assert back.dtype == np.dtype(dtype) and back.shape == shape
  np.testing.assert_array_equal(back, array)


def test_big_endian_on_disk(tmp_path):
  path = tmp_path / "a.idx"
  idx.write_idx(path, np.array([1, 256], np.int32))
  assert path.read_bytes() == _header(0x0C, (2,)) + bytes(
      [0, 0, 0, 1, 0, 0, 1, 0])


def test_write_rejects_unknown_dtype(tmp_path):
  with pytest.raises(TypeError, match="uint16"):
    idx.write_idx(tmp_path / "a.idx", np.zeros(3, np.uint16))


@pytest.mark.parametrize("data,fragments", [
    (b"", ["0 bytes", "too short"]),
    (b"\x00\x00", ["2 bytes", "too short"]),
    (b"\x1f\x8b\x08\x03" + bytes(20), ["bad magic number 0x1f8b0803",
                                       "two zero bytes"]),
    (b"\x00\x00\x07\x01" + bytes(8), ["unknown element type 0x07"]),
    (b"\x00\x00\x08\x03\x00\x00", ["truncated header", "16 bytes"]),
    (_header(0x08, (2, 3, 3)) + bytes(17),
     ["truncated data", "(2, 3, 3)", "needs 18 bytes", "found 17"]),
    (_header(0x0B, (4,)) + bytes(7), ["truncated data", "needs 8 bytes"]),
    (_header(0x08, (2,)) + bytes(5), ["3 unexpected trailing bytes"]),
])
@pytest.mark.parametrize("gz", [False, True])
def test_malformed(tmp_path, data, fragments, gz):
  path = tmp_path / ("bad.idx.gz" if gz else "bad.idx")
  path.write_bytes(gzip.compress(data) if gz else data)
  with _raises(path, *fragments):
    idx.read_idx(path)


def test_wrong_number_of_dimensions(tmp_path):
  path = tmp_path / "labels.idx"
  idx.write_idx(path, np.zeros((3, 2), np.uint8))
  with _raises(path, "wrong number of dimensions", "says 2", "expected 1"):
    idx.read_idx(path, ndim=1)


def test_truncated_gzip_stream(tmp_path):
  path = tmp_path / "images.idx.gz"
  idx.write_idx(path, np.arange(3000, dtype=np.int32))
  path.write_bytes(path.read_bytes()[:-30])
  with _raises(path, "truncated gzip stream"):
    idx.read_idx(path)


def test_not_gzip(tmp_path):
  path = tmp_path / "images.idx.gz"
  idx.write_idx(tmp_path / "images.idx", np.zeros(5, np.uint8))
  path.write_bytes((tmp_path / "images.idx").read_bytes())
  with _raises(path, "not a valid gzip file"):
    idx.read_idx(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError):
    idx.read_idx(tmp_path / "nothing.idx")


# -- load_idx_dir ------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir(tmp_path, gz):
  arrays = _write_mnist(tmp_path, gz=gz)
  data = input_pipeline.load_idx_dir(tmp_path)
  assert data.train_images.shape == (12, 28, 28, 1)
  assert data.test_images.shape == (5, 28, 28, 1)
  assert data.train_images.dtype == np.float32
  assert data.train_labels.dtype == np.int32
  np.testing.assert_allclose(
      data.train_images[..., 0] * 255, arrays["train_images"], atol=1e-4)
  np.testing.assert_array_equal(data.test_labels, arrays["test_labels"])
  assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0


def test_load_idx_dir_dot_spelling_and_mixed_compression(tmp_path):
  arrays = _write_mnist(tmp_path)
  os.rename(tmp_path / "train-images-idx3-ubyte",
            tmp_path / "train-images.idx3-ubyte")
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  idx.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", arrays["test_labels"])
  data = input_pipeline.load_idx_dir(tmp_path)
  np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])
  np.testing.assert_array_equal(data.test_labels, arrays["test_labels"])


def test_load_idx_dir_missing_file(tmp_path):
  _write_mnist(tmp_path)
  os.remove(tmp_path / "t10k-images-idx3-ubyte")
  with _raises(tmp_path, "'t10k-images-idx3-ubyte' not found",
               "t10k-images.idx3-ubyte.gz", error=FileNotFoundError):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_count_mismatch(tmp_path):
  _write_mnist(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte"
  idx.write_idx(labels, np.zeros(11, np.uint8))
  with _raises(labels, "count mismatch", "12 images", "11 labels",
               "train-images-idx3-ubyte"):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_wrong_image_size(tmp_path):
  _write_mnist(tmp_path)
  images = tmp_path / "t10k-images-idx3-ubyte"
  idx.write_idx(images, np.zeros((5, 27, 28), np.uint8))
  with _raises(images, "wrong image size (27, 28)", "28x28"):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_labels_and_images_swapped(tmp_path):
  _write_mnist(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte"
  idx.write_idx(labels, np.zeros((12, 28, 28), np.uint8))
  with _raises(labels, "wrong number of dimensions", "says 3", "expected 1"):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_wrong_element_type(tmp_path):
  _write_mnist(tmp_path)
  images = tmp_path / "train-images-idx3-ubyte"
  idx.write_idx(images, np.zeros((12, 28, 28), np.float32))
  with _raises(images, "unsigned bytes"):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_label_out_of_range(tmp_path):
  _write_mnist(tmp_path)
  labels = tmp_path / "t10k-labels-idx1-ubyte"
  idx.write_idx(labels, np.array([0, 1, 2, 10, 3], np.uint8))
  with _raises(labels, "label 10 out of range"):
    input_pipeline.load_idx_dir(tmp_path)


def test_load_idx_dir_truncated_gz(tmp_path):
  _write_mnist(tmp_path, gz=True)
  images = tmp_path / "train-images-idx3-ubyte.gz"
  images.write_bytes(images.read_bytes()[:200])
  with _raises(images, "truncated"):
    input_pipeline.load_idx_dir(tmp_path)


# -- the embedded digits -----------------------------------------------------


def test_load_embedded():
  data = input_pipeline.load_embedded()
  assert data.train_images.shape == (4000, 28, 28, 1)
  assert data.test_images.shape == (1000, 28, 28, 1)
  assert data.train_images.dtype == np.float32
  assert data.train_images.min() == 0.0 and data.train_images.max() == 1.0
  np.testing.assert_array_equal(np.bincount(data.train_labels), [400] * 10)
  np.testing.assert_array_equal(np.bincount(data.test_labels), [100] * 10)
  # Fixed split: the same held-out digits every time, none of them in train.
  again = input_pipeline.load_embedded()
  np.testing.assert_array_equal(data.test_images, again.test_images)
  train_rows = {row.tobytes() for row in data.train_images}
  overlap = sum(row.tobytes() in train_rows for row in data.test_images)
  assert overlap <= 5  # MNIST has a few exact duplicates, no more


def test_stratified_split():
  labels = np.repeat(np.arange(3), [5, 6, 7])
  train, test = input_pipeline.stratified_split(labels, 2, seed=1)
  assert len(test) == 6 and len(train) == 12
  np.testing.assert_array_equal(np.bincount(labels[test]), [2, 2, 2])
  assert set(train).isdisjoint(test)
  assert sorted([*train, *test]) == list(range(18))
  train2, test2 = input_pipeline.stratified_split(labels, 2, seed=1)
  np.testing.assert_array_equal(test, test2)
  _, test3 = input_pipeline.stratified_split(labels, 2, seed=2)
  assert not np.array_equal(test, test3)
