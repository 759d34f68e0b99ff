"""Every timed output checked against the float64 reference, so that a fast wrong kernel
cannot win.

The data and the reference are ``gnorm_bench.cases``' (``make_data``, ``reference``,
``within_bounds``). A group's statistics depend on its own channels only, so on a large
tensor the reference is computed exactly on a few groups' channels (the first two and the
last), which keeps the references of a whole run to seconds.
"""

from __future__ import annotations

import numpy as np

from .cases import Case
from .cases import make_data
from .cases import reference
from .cases import rel_err
from .cases import within_bounds
from .device_cases import DeviceCase

# Above this many elements only some groups are checked (a float64 reference of 1M
# elements takes NumPy a tenth of a second; of 33M, seconds).
FULL_CHECK_ELEMENTS = 2**20
# The implementations held to gnorm's documented bounds, by their ``cases`` name.
_BOUND_NAME = {
  "gnorm": ("gnorm", "gnorm_fused"),
  "gnorm_prev": ("gnorm", "gnorm_fused"),
  "gnorm_pallas": ("gnorm_pallas", "gnorm_pallas_fused"),
}


def checked_channels(case: DeviceCase) -> tuple[tuple[int, int], ...]:
  """The channel ranges ``(start, stop)`` whose outputs are checked: all of them, or
  those of three groups (the first two and the last)."""
  c = case.shape[-1]
  if case.elements <= FULL_CHECK_ELEMENTS:
    return ((0, c),)
  cg = c // case.groups
  return ((0, 2 * cg), (c - cg, c))


def take_channels(a, ranges: tuple[tuple[int, int], ...], axis: int = -1):
  """``a``'s channels in ``ranges`` along ``axis``: static slices, for NumPy or JAX arrays."""
  if len(ranges) == 1 and ranges[0] == (0, a.shape[axis]):
    return a
  parts = [a[(slice(None),) * (axis % a.ndim) + (slice(lo, hi),)] for lo, hi in ranges]
  if isinstance(a, np.ndarray):
    return np.concatenate(parts, axis=axis)
  import jax.numpy as jnp

  return jnp.concatenate(parts, axis=axis)


class References:
  """The data of each (shape, dtype) and the float64 reference of each case, made once."""

  def __init__(self):
    self._data = {}
    self._refs = {}

  def data(self, case: DeviceCase) -> dict:
    if case.data_key not in self._data:
      self._data[case.data_key] = make_data(case.bench_case())
    return self._data[case.data_key]

  def reference(self, case: DeviceCase) -> tuple[np.ndarray, ...]:
    """y, dx, dgamma, dbeta on ``checked_channels(case)``."""
    if case not in self._refs:
      ch = checked_channels(case)
      data = self.data(case)
      sub = {k: np.ascontiguousarray(take_channels(v, ch)) for k, v in data.items()}
      n_ch = sub["gamma"].shape[0]
      sub_case = Case(case.shape[:-1] + (n_ch,), n_ch // (case.shape[-1] // case.groups),
                      case.dtype)
      self._refs[case] = reference(sub_case, sub, case.activation)
    return self._refs[case]

  def drop_data(self) -> None:
    """Frees the host data (the references are kept)."""
    self._data = {}


def check(impl: str, case: DeviceCase, outputs: tuple, ref: tuple) -> dict:
  """``outputs``: y (forward) or y, dx, dgamma, dbeta (forward+backward), NHWC float64 on
  the checked channels. Returns the errors and whether they are within bounds."""
  y = outputs[0]
  entry = {"y_vs_ref": rel_err(y, ref[0])}
  grad = 0.0
  if len(outputs) > 1:
    grad = max(rel_err(a, r) for a, r in zip(outputs[1:], ref[1:], strict=True))
    entry["grad_vs_ref"] = grad
  finite = all(bool(np.all(np.isfinite(o))) for o in outputs)
  name = _BOUND_NAME.get(impl, (impl, impl))[1 if case.activation else 0]
  entry["bound"] = "docs/accuracy.md" if impl in _BOUND_NAME else "sanity"
  entry["ok"] = finite and within_bounds(name, y, ref[0], entry["y_vs_ref"], grad, case.dtype)
  return entry
