"""What ``implementation="pallas"`` needs from JAX, checked in one place.

The kernels (``pallas_triton.py``, ``pallas_triton_vjp.py``) are written for
Pallas's Triton backend, ``jax.experimental.pallas.triton``. This module says

* whether this JAX has that backend (``triton_available``, ``why_unavailable``,
  ``unavailable_message``): JAX 0.11.0 deprecated it in favour of Mosaic GPU
  and a later version may drop it, and ``implementation="pallas"`` must then
  fail with an error a user can act on while ``"auto"`` keeps to XLA;
* how to keep the backend's deprecation warning from users
  (``quiet_deprecations``, ``quiet_lowering``);
* whether a tensor is small enough for the kernels' 32-bit index arithmetic
  (``fits_int32_offsets``, ``check_index_range``).

Nothing here imports Pallas at gnorm's import time: the probe runs on its
first call and its answer is cached.
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

  The warning is about gnorm's own use of the backend, which gnorm tracks
  (``docs/gpu_kernels.md``): a user can do nothing about it, so it must not
  reach them. Any other warning, another ``DeprecationWarning`` included,
  still does.

  JAX emits it when a ``pallas_call`` is *lowered* for CUDA or ROCm, not when
  it is traced: under a user's ``jax.jit`` that is after gnorm's Python code
  has returned. So wrap the code that lowers the kernels (``quiet_lowering``
  wraps a lowering rule), not only the code that traces them.

  ``warnings.catch_warnings`` swaps the process-wide filter list, which is
  not thread-safe: a warning raised by another thread while the context is
  open is filtered by it too, and two threads entering and leaving it out of
  order can restore each other's filters. Keep the scope to the lowering of
  gnorm's kernels and nothing else.
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


def triton_available() -> bool:
  """Whether this JAX has the Pallas Triton backend the kernels are written for."""
  return why_unavailable() is None


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


def fits_int32_offsets(shape: Sequence[Any]) -> bool:
  """Whether the kernels can index a tensor of ``shape`` (at most
  ``MAX_ELEMENTS`` elements, static dimensions); for ``"auto"`` to fall back
  to XLA without raising."""
  size = _size(shape)
  return size is not None and size <= MAX_ELEMENTS


def check_index_range(shape: Sequence[Any], what: str) -> None:
  """Raises before launch when the kernels cannot index ``what`` of ``shape``.

  What overflows, read from ``pallas_triton.py`` (the backward's kernels use
  the same ``block``) and from Pallas's Triton lowering in JAX 0.10.2 and
  0.11.2 (``_compute_offsets_from_indices``, ``_process_grid_to_3d_grid``):

  * program ids and the kernels' own index arithmetic are int32: the row and
    channel indices ``k * bs + arange(bs)`` and ``j * bc + arange(bc)`` and
    the ``pl.ds`` starts ``k * bs``, ``j * bc``, ``g * cg``. Each is bounded
    by ``S`` or ``C`` rounded up to a power-of-two block, hence below 2**31
    whenever the tensor has fewer than 2**31 elements, and not beyond. (The
    combining kernels' row counts ``S - k * bs`` for row blocks ``k`` past
    the last may wrap; a ``where`` discards them.);
  * the element offset of a load or store is
    ``n * S * C + s * C + c`` for element ``(n, s, c)`` of the channels-last
    view (``n * C * S + c * S + s`` channels first): at most ``size - 1``.
    Pallas computes it in int32 when the array takes at most 2**32 bytes and
    in int64 above, so for gnorm's dtypes (2 bytes or more) the offset of an
    element that is loaded or stored fits either way; the masked-off lanes
    of a tail block (rows or channels past the end, never loaded or stored)
    can point past the end, by less than a block along each axis, and wrap
    in int32;
  * a grid axis over 65,535 blocks (the CUDA limit on grid y and z) is folded
    into the x axis by Pallas, which asserts that the product stays below
    2**31 - 1 programs: fewer than there are elements.

  So up to ``MAX_ELEMENTS`` (2**31 - 1) elements every one of these values
  fits in int32, whatever the shape. Beyond, it depends on the shape: with
  ``S >= 2**31`` the constant ``S`` of ``rows < S`` is itself out of int32's
  range (JAX raises an ``OverflowError`` while tracing), while a large batch
  of small samples would still index correctly. The check is the simple
  bound on the total size, which holds for every shape, and its error names
  the shape and the way out.

  Args:
    shape: the tensor's shape (static integers).
    what: what the tensor is, for the message (``"x"``, ``"the cotangent"``).

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
