"""What ``implementation="pallas"`` needs from JAX, checked in one place.

The kernels are written for Pallas's Triton backend,
``jax.experimental.pallas.triton``, which JAX 0.11 deprecated. This module
says whether this JAX has it (``why_unavailable``), keeps its deprecation
warning from users (``quiet_lowering``), and refuses tensors too large for
the kernels' 32-bit index arithmetic (``check_index_range``;
docs/gpu_kernels.md has the analysis). Nothing here imports Pallas at
gnorm's import time: the probe runs on first use and is cached.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import re
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import TypeVar

import jax

from gnorm._src import maths

TRITON_MODULE = "jax.experimental.pallas.triton"
# What the kernels use from it.
TRITON_NAMES = ("CompilerParams", "load", "store")

# The first sentence of the warning, as JAX 0.11.2 words it in the lowering
# rule of its Triton backend (jax/_src/pallas/triton/pallas_call_registration.py,
# deprecation id "jax-pallas-triton"). The filter matches from the start of
# the message, so later sentences may change without letting it through.
TRITON_DEPRECATION = ("The Pallas Triton backend is deprecated and will be removed in a "
                      "future JAX version.")

# The kernels' index arithmetic is int32: tensors of at most this many
# elements are indexed correctly whatever their shape (``check_index_range``).
MAX_ELEMENTS = 2**31 - 1

_T = TypeVar("_T")


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
  """Silences the Pallas Triton backend's deprecation warning, and only it.

  The warning is about gnorm's own use of the backend: a user can do nothing
  about it. JAX emits it when a ``pallas_call`` is lowered, after gnorm's
  Python code has returned under a user's ``jit``; so it wraps lowering rules
  (``quiet_lowering``). ``warnings.catch_warnings`` is not thread-safe: keep
  the scope to the lowering of gnorm's kernels.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=re.escape(TRITON_DEPRECATION),
                            category=DeprecationWarning)
    yield


def quiet_lowering(rule: Callable[..., _T]) -> Callable[..., _T]:
  """An MLIR lowering rule that runs ``rule`` inside ``quiet_deprecations``.

  For a primitive whose CUDA lowering lowers the Pallas kernels, e.g.
  ``mlir.register_lowering(p, quiet_lowering(mlir.lower_fun(fn, ...)),
  platform="cuda")``: ``mlir.lower_fun`` traces ``fn`` and lowers the traced
  ``pallas_call`` inside the call, so the warning is raised (and dropped)
  within the scope, whenever and by whomever the program is lowered.
  """

  @functools.wraps(rule)
  def quiet(*args: Any, **kwargs: Any) -> _T:
    with quiet_deprecations():
      return rule(*args, **kwargs)

  return quiet


@functools.cache
def why_unavailable() -> str | None:
  """Why this JAX cannot run the kernels, in words, or None when it can.

  Checks once that ``jax.experimental.pallas.triton`` imports and has what
  the kernels use (``TRITON_NAMES``). The module is part of every JAX build
  (the CPU-only one too), so this says nothing about whether a GPU is present.
  """
  try:
    # A JAX that deprecates the module on import must not warn the user either.
    with quiet_deprecations():
      module = importlib.import_module(TRITON_MODULE)
  except ImportError as e:
    return f"{TRITON_MODULE} cannot be imported ({type(e).__name__}: {e})"
  missing = [name for name in TRITON_NAMES if not hasattr(module, name)]
  if missing:
    return f"{TRITON_MODULE} has no {', '.join(missing)}"
  return None


def unavailable_message(why: str) -> str:
  """The error for ``implementation="pallas"`` when ``why_unavailable()`` is ``why``."""
  return (f"implementation='pallas' needs Pallas's Triton backend, which this JAX "
          f"({jax.__version__}) does not provide: {why}. Use implementation='xla' or "
          "'auto' (the XLA path covers every option).")


def _size(shape: Sequence[Any]) -> int | None:
  """The number of elements, or None when a dimension is not a static integer
  (a symbolic dimension of ``jax.export``)."""
  if not all(isinstance(d, numbers.Integral) for d in shape):
    return None
  return math.prod(int(d) for d in shape)  # Python ints: exact at any size


def check_index_range(shape: Sequence[Any], what: str) -> None:
  """Raises before launch when the kernels cannot index ``what`` of ``shape``.

  Up to ``MAX_ELEMENTS`` (2**31 - 1) elements every index and offset the
  kernels and Pallas's Triton lowering compute fits in int32, whatever the
  shape; beyond, it depends on the shape, so the bound is on the total size.

  Raises:
    ValueError: ``shape`` has more than ``MAX_ELEMENTS`` elements, or a
      dimension that is not a static integer.
  """
  size = _size(shape)
  if size is None:
    raise ValueError(
        f"implementation='pallas' needs static dimensions, got {what} of shape "
        f"{tuple(shape)}. Use implementation='xla' or 'auto'.")
  if size > MAX_ELEMENTS:
    raise ValueError(
        f"implementation='pallas' cannot index {what} of shape {tuple(shape)}: it has "
        f"{size:,} elements, more than the 2**31 - 1 = {MAX_ELEMENTS:,} that the kernels' "
        "int32 index arithmetic covers. Use implementation='xla' or 'auto' (the XLA path "
        "has no such limit).")


def unsupported(cfg: maths.Config, shape: tuple[int, ...], has_mask: bool) -> str | None:
  """The option the kernels do not cover, in words, or None."""
  if has_mask:
    return "mask"
  if cfg.axis_name is not None:
    return f"axis_name={cfg.axis_name!r}"
  if len(maths.view(shape, cfg.channel_axis).shape) != 3:
    return (f"channel_axis={cfg.channel_axis} with spatial axes on both sides of it "
            "(the kernels take channels last or channels right after the batch)")
  return None
