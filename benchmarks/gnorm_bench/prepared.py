"""What every implementation hands the timer and the reports, whatever its framework."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Prepared:
  """One implementation set up for one case.

  ``fwd`` and ``fwdbwd`` run once and return only when the device is done, so
  that a clock read around them times the work (JAX: ``block_until_ready``,
  torch on CUDA: ``torch.cuda.synchronize()``).
  """

  fwd: Callable[[], Any]
  fwdbwd: Callable[[], Any]
  outputs: Callable[[], tuple[Any, ...]]  # y, dx, dgamma, dbeta (NHWC, float64 NumPy)
  # Bytes of x and of y as this implementation reads and writes them: the
  # least a pass must move (the bandwidth table).
  io_bytes: Callable[[], tuple[int, int]]
  compile_once: Callable[[str], tuple[float, Any]] | None = None
  residuals: Callable[[], dict] | None = None
  note: str = ""


def residual_summary(leaves: list, x_size: int, x_itemsize: int) -> dict:
  """``leaves``: ``(dtype, shape, itemsize, is_x)`` per kept array."""
  out = [
    (f"{dt}{shape}" + (" (= x)" if is_x else ""), math.prod(shape), isz, is_x)
    for dt, shape, isz, is_x in leaves
  ]
  return {
    "total_bytes": int(sum(n * isz for _, n, isz, _ in out)),
    "bytes_excluding_x": int(sum(n * isz for _, n, isz, is_x in out if not is_x)),
    "x_bytes": int(x_size * x_itemsize),
    "full_size_leaves": [s for s, n, _, _ in out if n >= x_size],
    "leaves": [s for s, _, _, _ in out],
  }
