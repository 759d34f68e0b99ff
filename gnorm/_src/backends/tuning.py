"""Where ``implementation="auto"`` runs the Pallas kernels, and with which tiles.

The answer is data measured on a GPU, never a guess: ``tuning_table.json``
beside this file holds, per GPU (its ``device_kind`` as JAX reports it, such
as ``"NVIDIA H200"``) and per shape class, which implementation was faster
there and the tiles (``pallas_triton.Block``) that made it so, with the times
that justify the choice and the provenance of the measurement (device,
library versions, date, gnorm commit, command, method). The table is written
by ``benchmarks/pallas_sweep.py`` on a GPU and installed with its
``--install``; as tokamax ships its autotuned configs, it is data, and this
module only loads it and looks things up.

Where the table has nothing to say (an unknown device, a JAX release other
than the one measured, a shape class not swept) the choice is the heuristic:
XLA for ``"auto"`` and the kernels' own tiles (``pallas_triton.tiling``) for
an explicit ``implementation="pallas"``. The ``source`` of every answer says
which, in words.

A shape class is what the kernels' speed depends on besides the device:

* the dtype and the layout (channels last, or right after the batch);
* the number of elements, in four classes (``SIZE_CLASSES``): under 1M
  elements the heuristic's 8K-element blocks make fewer programs than an
  H100 or H200 has SMs (132), so the call is bound by launches and latency;
  1M-8M is one to eight waves of blocks on data that stays in the 50 MiB L2
  between two layers; 8M-32M (16-128 MiB) outgrows the L2 (float32 from 13M
  elements, bfloat16 from 26M) and is where issue 20 compares with
  torch.compile (>= 8M) and with the copy bandwidth (>= 16M); from 32M on
  every dtype streams from HBM;
* the forward's plan (``forward_plan``): a (sample, group) that fits in one
  block, with enough of them to fill the GPU, is normalised by one program in
  one pass, which no block choice affects. The channels per group matter to
  the kernels through this plan only: the blocks tile channels regardless of
  groups.

Loading is stdlib only (``json``), happens once per file (``clear_cache``
forgets it) and validates the whole table (``tuning_schema.py``), naming the
file and the field in any error. Looking up an entry never imports Pallas
unless the table has a measurement for the device and this JAX release.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

from gnorm._src.backends.tuning_schema import SCHEMA_VERSION
from gnorm._src.backends.tuning_schema import SIZE_CLASSES
from gnorm._src.backends.tuning_schema import Key
from gnorm._src.backends.tuning_schema import TableError
from gnorm._src.backends.tuning_schema import check_installable
from gnorm._src.backends.tuning_schema import size_class
from gnorm._src.backends.tuning_schema import validate

if TYPE_CHECKING:
  from gnorm._src.backends.pallas_triton import Block

__all__ = [
    "SCHEMA_VERSION", "SIZE_CLASSES", "TABLE_PATH", "Blocks", "Choice", "Key", "TableError",
    "blocks_for", "check_installable", "choose", "clear_cache", "describe", "dtype_name",
    "forward_plan", "gpu_device_kind", "key", "load", "measured_on_gpu", "size_class",
    "validate",
]

TABLE_PATH = pathlib.Path(__file__).with_name("tuning_table.json")


class Choice(NamedTuple):
  """What ``implementation="auto"`` runs for one call.

  Attributes:
    implementation: ``"pallas"`` or ``"xla"``.
    forward: the forward kernels' tiles (``None``: the heuristic's, or XLA).
    backward: the backward kernels' tiles (``None``: the heuristic's, or XLA).
    source: where the choice came from, in words.
  """

  implementation: str
  forward: Block | None
  backward: Block | None
  source: str


class Blocks(NamedTuple):
  """Tiles for an explicit ``implementation="pallas"`` call (``None``: the heuristic's)."""

  forward: Block | None
  backward: Block | None
  source: str


def forward_plan(n: int, s: int, c: int, groups: int, channels_last: bool) -> str:
  """``"one_pass"`` where ``pallas.forward`` takes its one-pass plan, else ``"tiled"``."""
  # Imported here: pallas.py may come to import this module.
  from gnorm._src.backends import pallas  # noqa: PLC0415
  from gnorm._src.backends import pallas_triton  # noqa: PLC0415

  fits = pallas_triton.group_tiling(n, s, c, groups, channels_last) is not None
  return "one_pass" if fits and n * groups >= pallas.ONE_PASS_MIN_PROGRAMS else "tiled"


def dtype_name(dtype: Any) -> str:
  """``"bfloat16"``, ``"float32"``...: a dtype (or its name) by name."""
  if isinstance(dtype, str):
    return dtype
  import jax.numpy as jnp  # noqa: PLC0415 - only for a dtype object

  return jnp.dtype(dtype).name


def key(dtype: Any, channels_last: bool, n: int, s: int, c: int, groups: int) -> Key:
  """The shape class of an ``(N, S, C)`` (or ``(N, C, S)``) call with ``groups`` groups."""
  return Key(dtype_name(dtype), bool(channels_last), size_class(n * s * c),
             forward_plan(n, s, c, groups, channels_last))


@functools.cache
def _load(path: str) -> dict:
  try:
    text = pathlib.Path(path).read_text()
  except OSError as e:
    raise TableError(f"{path}: cannot read the tuning table ({e})") from e
  try:
    data = json.loads(text)
  except ValueError as e:
    raise TableError(f"{path}: not valid JSON ({e})") from e
  check_installable(data, path)
  return data


def load(path: str | pathlib.Path | None = None) -> dict:
  """The validated table at ``path`` (default ``TABLE_PATH``), read once per path.

  Raises:
    TableError: the file cannot be read, is not JSON, does not follow the
      schema, or holds a dry run's or a CPU's measurement.
  """
  return _load(str(TABLE_PATH if path is None else path))


def clear_cache() -> None:
  """Forgets the tables read so far (tests; a table installed while running)."""
  _load.cache_clear()


def measured_on_gpu(path: str | pathlib.Path | None = None) -> bool:
  """Whether the table holds any measurement made on a GPU (the shipped one may not)."""
  return bool(load(path)["provenance"]["measured_on_gpu"])


def describe(path: str | pathlib.Path | None = None) -> str:
  """The table's provenance in a sentence or two, for reports and errors."""
  data = load(path)
  if not data["measurements"]:
    return f"no GPU measurement: {data['provenance']['note']}"
  return "; ".join(
      f"{m['device_kind']}: {len(m['entries'])} classes, jax {m['versions']['jax']},"
      f" {m['date_utc']}, gnorm {m['gnorm_commit']}" for m in data["measurements"])


def _minor(version: str) -> str:
  return ".".join(version.split(".")[:2])


def _to_block(b: dict | None) -> Block | None:
  if b is None:
    return None
  from gnorm._src.backends.pallas_triton import Block  # noqa: PLC0415 - Pallas on demand

  return Block(b["bs"], b["bc"], b["warps"])


def _running_jax() -> str:
  import jax  # noqa: PLC0415

  return jax.__version__


def _lookup(device_kind: str | None, dtype: Any, channels_last: bool, n: int, s: int, c: int,
            groups: int, jax_version: str | None) -> tuple[dict | None, str]:
  """The entry for the call (or None) and, in words, where it came from or why none."""
  data = load()
  if device_kind is None:
    return None, "no GPU device kind (no local GPU, or lowered for one elsewhere)"
  if not data["measurements"]:
    return None, f"the tuning table has no GPU measurement yet ({TABLE_PATH.name})"
  m = next((m for m in data["measurements"] if m["device_kind"] == device_kind), None)
  if m is None:
    have = ", ".join(repr(m["device_kind"]) for m in data["measurements"])
    return None, f"no measurement for {device_kind!r} in the tuning table (it has {have})"
  running = jax_version or _running_jax()
  if _minor(running) != _minor(m["versions"]["jax"]):
    return None, (f"{device_kind} was measured with jax {m['versions']['jax']}, this is jax"
                  f" {running}: kernels compile differently across releases")
  k = key(dtype, channels_last, n, s, c, groups)
  e = next((e for e in m["entries"] if Key(e["dtype"], e["channels_last"], e["size_class"],
                                          e["forward_plan"]) == k), None)
  if e is None:
    return None, f"{device_kind}'s measurement has no entry for {k.describe()}"
  us = e["us"]
  speed = (f"forward+backward {us['pallas_fwdbwd']:.1f} us (Pallas) vs {us['xla_fwdbwd']:.1f}"
           f" us (XLA)" if us["pallas_fwdbwd"] and us["xla_fwdbwd"] else "not timed")
  shape = "x".join(map(str, e["case"]["shape"]))
  return e, (f"{device_kind}, jax {m['versions']['jax']}, {m['date_utc'][:10]}:"
             f" {k.describe()}, tuned on {shape} G={e['case']['groups']}: {speed}")


def choose(device_kind: str | None, dtype: Any, channels_last: bool, n: int, s: int, c: int,
           groups: int, *, jax_version: str | None = None) -> Choice:
  """What ``implementation="auto"`` runs for an ``(N, S, C)`` call (or ``(N, C, S)``).

  Args:
    device_kind: the GPU's ``jax.Device.device_kind`` (``gpu_device_kind()``),
      or ``None`` where there is none (then: XLA).
    dtype: the input's dtype (or its name).
    channels_last: the view is ``(N, S, C)``; else ``(N, C, S)``.
    n: the samples.
    s: the spatial positions per sample.
    c: the channels.
    groups: the number of groups.
    jax_version: the JAX the program runs with (default: this one); the
      table's entries apply to the release (major.minor) they were measured with.

  Returns:
    A ``Choice``: ``"pallas"`` with the measured tiles where the table says the
    kernels were faster for this device and shape class, else ``"xla"``.
  """
  e, source = _lookup(device_kind, dtype, channels_last, n, s, c, groups, jax_version)
  if e is None or e["implementation"] != "pallas":
    why = e.get("reason", "XLA was as fast") if e is not None else None
    return Choice("xla", None, None, f"{source}{f' ({why})' if why else ''}: XLA")
  return Choice("pallas", _to_block(e["forward"]), _to_block(e["backward"]),
                f"{source}: Pallas")


def blocks_for(device_kind: str | None, dtype: Any, channels_last: bool, n: int, s: int, c: int,
               groups: int, *, jax_version: str | None = None) -> Blocks | None:
  """The measured tiles for an explicit ``implementation="pallas"`` call (same key as
  ``choose``), or ``None``: the kernels' heuristic tiles.

  An entry's tiles are given whether or not the kernels beat XLA in its class:
  they are the fastest measured for the kernels there.
  """
  e, source = _lookup(device_kind, dtype, channels_last, n, s, c, groups, jax_version)
  if e is None or (e["forward"] is None and e["backward"] is None):
    return None
  return Blocks(_to_block(e["forward"]), _to_block(e["backward"]), source)


def gpu_device_kind() -> str | None:
  """The local GPU's ``device_kind`` (``"NVIDIA H200"``), or ``None`` without one.

  The device a program *runs* on: a program lowered for CUDA on a host
  without a GPU gets ``None``, so ``"auto"`` keeps it on XLA.
  """
  import jax  # noqa: PLC0415

  try:
    devices = jax.devices("gpu")
  except RuntimeError:  # no GPU backend in this process
    return None
  return devices[0].device_kind if devices else None
