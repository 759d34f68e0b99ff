"""What the flax drop-ins of ``gnorm.compat`` share.

``gnorm.compat.linen.GroupNorm`` and ``gnorm.compat.nnx.GroupNorm`` take
flax's arguments and create flax's parameters; everything between those
arguments and ``gnorm.group_norm`` lives here: the checks flax makes (raising
the same kinds of error), the dtype of the result, and the transpose and
reshape that turn flax's ``reduction_axes`` into gnorm's batch-first layout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from collections.abc import Iterable
from typing import Any
from typing import cast
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from gnorm._src import functional
from gnorm._src.compat import originals


def _is_int(value: Any) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def resolve_groups(num_groups: Any, group_size: Any, channels: int, *,
                   shape: tuple[int, ...] | None = None, features: str = "channels",
                   assert_int: bool = False) -> int:
  """Returns the number of groups for flax's ``num_groups``/``group_size``.

  Raises what flax raises for the same arguments, with flax's message first
  (``originals.py``): a ``ValueError`` for neither or both given, a group
  count that is not a positive int dividing ``channels`` (an
  ``AssertionError`` for a non-int count with ``assert_int``, as
  ``flax.linen``), or a group size that does not divide ``channels``
  (``features`` names them as the layer's message does); a
  ``ZeroDivisionError`` for a group size of 0, and a ``TypeError`` for one
  that is not an int (where flax fails in a reshape of the input of
  ``shape``).

  Examples:
    >>> resolve_groups(32, None, 64), resolve_groups(None, 16, 64)
    (32, 4)
    >>> resolve_groups(32, 16, 64)
    Traceback (most recent call last):
    ...
    ValueError: Either `num_groups` or `group_size` should be specified...
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(f"{originals.FLAX_EITHER} Got num_groups={num_groups!r} and "
                     f"group_size={group_size!r}.")
  if group_size is not None:
    if not isinstance(group_size, numbers.Real):
      raise TypeError(f"group_size must be an int, got {group_size!r} "
                      f"(type {type(group_size).__name__}).")
    if group_size == 0:
      raise ZeroDivisionError(f"{originals.MODULO_BY_ZERO}: group_size must be a positive int "
                              f"dividing the number of {features} ({channels}), got 0.")
    if group_size < 0 or channels % group_size:
      raise ValueError(f"{originals.flax_group_size(channels, group_size, features)} "
                       f"group_size must be a positive int dividing it.")
    if not _is_int(group_size):
      head = "" if shape is None else originals.integer_shape(
          (*shape[:-1], channels / group_size, group_size)) + " "
      raise TypeError(f"{head}group_size must be an int, got {group_size!r}.")
    return channels // cast(int, group_size)  # an int: checked above
  if not _is_int(num_groups):
    if assert_int:
      raise AssertionError(f"num_groups must be an int, got {num_groups!r} "
                           f"(type {type(num_groups).__name__}).")
    raise ValueError(f"{originals.flax_groups(num_groups, channels)} num_groups must be a "
                     "positive int dividing it.")
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(f"{originals.flax_groups(num_groups, channels)} num_groups must be a "
                     "positive int dividing it.")
  return int(num_groups)


def index_groups(axis_name: Any, axis_index_groups: Any) -> Any:
  """The ``axis_index_groups`` to pass on: flax uses them only with an ``axis_name``.

  flax hands them to ``lax.pmean`` and ignores them without an ``axis_name``;
  so does this. With one, ``gnorm.group_norm`` checks them (a ``TypeError``
  or ``ValueError`` naming them) and combines statistics within each group.

  Examples:
    >>> index_groups(None, [[0, 1], [2, 3]]) is None, index_groups("d", [[0, 1], [2, 3]])
    (True, [[0, 1], [2, 3]])
  """
  return None if axis_name is None else axis_index_groups


class Layout(NamedTuple):
  """Where flax's ``reduction_axes`` put an input's axes for ``gnorm.group_norm``."""

  perm: tuple[int, ...] | None  # x.transpose(perm) is (kept..., reduced..., C); None: as is
  n_kept: int  # how many leading axes of that are kept (folded into gnorm's batch axis)


def reduction_layout(ndim: int, reduction_axes: int | Iterable[int] | None) -> Layout:
  """How an input of rank ``ndim`` is laid out for flax's ``reduction_axes``.

  ``reduction_axes=None`` is flax's default, every axis but the first (every
  axis for input of rank 1). Otherwise the axes, in any order, negative ones
  counting from the end, repeats allowed, must include the last (feature)
  axis, as flax requires. The axes left out are kept: each combination of
  their indices has statistics of its own (per group), as a sample does.
  gnorm's batch axis is its first, so the kept axes are moved to the front
  (``perm``) and folded into one.

  Args:
    ndim: the rank of the input.
    reduction_axes: flax's ``reduction_axes``: None, an int or ints.

  Returns:
    The ``Layout``: ``perm`` None when the kept axes already lead (no
    transpose), and the number of kept axes.

  Raises:
    TypeError: an axis that is not an int (flax fails sorting them).
    ValueError: an input of rank 0, an axis out of range, or axes without
      the last one (flax's message first).

  Examples:
    >>> reduction_layout(4, None), reduction_layout(3, (0, 1, 2))
    (Layout(perm=None, n_kept=1), Layout(perm=None, n_kept=0))
    >>> reduction_layout(5, (0, 1, 3, 4))  # flax's test_group_norm_unbatched
    Layout(perm=(2, 0, 1, 3, 4), n_kept=1)
    >>> reduction_layout(4, (1, 2))
    Traceback (most recent call last):
    ...
    ValueError: The reduction axes must include the final dimension ...
  """
  if ndim < 1:
    raise ValueError("the input must have at least one axis, the feature axis; got a scalar.")
  if reduction_axes is None:
    return Layout(None, min(1, ndim - 1))
  given = tuple(reduction_axes) if isinstance(reduction_axes, Iterable) else (reduction_axes,)
  bad = [a for a in given if not _is_int(a)]
  if bad:  # where flax fails: sorting them, or taking a float as an index
    head = (f"'{type(bad[0]).__name__}' object cannot be interpreted as an integer"
            if all(isinstance(a, numbers.Real) for a in bad) else originals.comparison(bad[0], 0))
    raise TypeError(f"{head}: reduction_axes must be an int or ints, got {reduction_axes!r}.")
  if not given:
    raise ValueError(f"reduction_axes must be an int or ints, got {reduction_axes!r}.")
  if not all(-ndim <= a < ndim for a in given) or (ndim - 1) not in {
      int(a) % ndim for a in given}:
    raise ValueError(
        f"{originals.FLAX_REDUCTION_AXES} reduction_axes {reduction_axes!r} must include the "
        f"last axis ({ndim - 1}) of the input of rank {ndim}, and only axes in range.")
  axes = {int(a) % ndim for a in given}
  kept = tuple(a for a in range(ndim - 1) if a not in axes)
  perm = (*kept, *sorted(axes))
  return Layout(None if perm == tuple(range(ndim)) else perm, len(kept))


def flax_promotion():
  """JAX's standard dtype promotion, where flax promotes implicitly: under
  ``jax_numpy_dtype_promotion="strict"`` the drop-ins then choose the dtypes
  flax chooses by default, and cast explicitly."""
  return jax.numpy_dtype_promotion("standard")


def result_dtype(dtype: DTypeLike | None, *arrays: ArrayLike | None) -> np.dtype:
  """The dtype of flax's result: ``dtype``, or else the promotion of the arrays.

  ``None`` entries are skipped; a promotion that is not inexact (integer
  input without parameters) becomes at least float32, as in flax.

  Examples:
    >>> x = jnp.ones((2, 4), jnp.bfloat16)
    >>> result_dtype(None, x, jnp.ones(4), None), result_dtype(jnp.float16, x)
    (dtype('float32'), dtype('float16'))
  """
  if dtype is None:
    with flax_promotion():
      dtype = jnp.result_type(*(jnp.asarray(a) for a in arrays if a is not None))
      if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.promote_types(dtype, jnp.float32)
  given, dtype = dtype, jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"{originals.flax_dtype(given)} (dtype must be a floating dtype).")
  return dtype


def _fold_mask(mask: ArrayLike, shape: tuple[int, ...], layout: Layout,
               num_groups: int) -> jax.Array:
  """The mask for the input of ``shape`` laid out by ``layout``, kept axes folded."""
  m = jnp.asarray(mask, dtype=bool)
  if m.ndim and m.shape[-1] not in (1, shape[-1]):  # flax reshapes it by groups first
    grouped = (*m.shape[:-1], num_groups, shape[-1] // num_groups)
    raise TypeError(f"{originals.reshape(m.shape, grouped)}: the mask of shape {m.shape} does "
                    f"not broadcast to the input shape {shape}.")
  try:
    ok = m.ndim <= len(shape) and jnp.broadcast_shapes(m.shape, shape) == shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"mask of shape {m.shape} does not broadcast to the input shape {shape}.")
  m = m.reshape((1,) * (len(shape) - m.ndim) + m.shape)
  if layout.perm is not None:
    m, shape = m.transpose(layout.perm), tuple(shape[a] for a in layout.perm)
  k = layout.n_kept
  if k == 1:
    return m
  rest = m.shape[k:]
  if all(d == 1 for d in m.shape[:k]):
    return m.reshape((1, *rest))
  return jnp.broadcast_to(m, shape[:k] + rest).reshape((-1, *rest))


def normalize(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    num_groups: int,
    epsilon: float,
    reduction_axes: int | Iterable[int] | None,
    dtype: DTypeLike | None,
    mask: ArrayLike | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Any = None,
) -> jax.Array:
  """flax's GroupNorm of ``x`` (features last), computed by ``gnorm.group_norm``.

  The axes that ``reduction_axes`` leave out are moved to the front, if they
  are not there already (see ``reduction_layout``), and folded into one
  batch axis (one of size 1 is added when every axis is reduced); gnorm
  normalises, and the result gets ``x``'s layout and shape back. The result has flax's
  dtype (``result_dtype``). ``x`` is first cast to the promotion of its dtype
  and the result's when that is wider (bfloat16 input, float32 result: the
  output is gnorm's for float32 input, as flax computes in float32), and the
  output is rounded to the result's dtype once.

  Args:
    x: the input, features on the last axis.
    scale: per-feature scale of shape ``(C,)`` (flax's ``scale``), or None.
    bias: per-feature offset of shape ``(C,)`` (flax's ``bias``), or None.
    num_groups: the number of groups (``resolve_groups``).
    epsilon: added to the variance.
    reduction_axes: flax's ``reduction_axes``.
    dtype: flax's ``dtype``: the result's dtype, or None to infer it.
    mask: True where positions count; broadcastable to ``x``. Padding
      outputs 0 and gets no gradient (gnorm's semantics).
    axis_name: a mesh axis name: statistics across its shards.
    axis_index_groups: with ``axis_name``: statistics across the shards of
      each group of its indices (ignored without ``axis_name``, as in flax).

  Returns:
    The normalised ``x``, in its shape and flax's dtype.

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    >>> y = normalize(x, jnp.ones(8), None, num_groups=2, epsilon=1e-6,
    ...               reduction_axes=(-2, -1), dtype=None)
    >>> ref = jax.vmap(lambda v: functional.group_norm(None, v, 2, 1e-6))(x)
    >>> y.shape, y.dtype, bool(jnp.allclose(y, ref, atol=1e-6))
    ((2, 3, 5, 8), dtype('float32'), True)

    Kept axes anywhere, as flax's ``test_group_norm_unbatched`` (axis 2 kept):

    >>> y = normalize(x, None, None, num_groups=2, epsilon=1e-6,
    ...               reduction_axes=(0, 1, 3), dtype=None)
    >>> ref = jax.vmap(lambda v: functional.group_norm(None, v[None], 2, 1e-6)[0],
    ...                in_axes=2, out_axes=2)(x)
    >>> bool(jnp.allclose(y, ref, atol=1e-6))
    True
  """
  x = jnp.asarray(x)
  out = result_dtype(dtype, x, scale, bias)
  layout = reduction_layout(x.ndim, reduction_axes)
  with flax_promotion():
    work = jnp.promote_types(x.dtype, out)
  if work != x.dtype:
    x = x.astype(work)
  shape = tuple(x.shape)
  if mask is not None:
    mask = _fold_mask(mask, shape, layout, num_groups)
  # Kept axes that do not lead cost a transpose of x here and one of the
  # output below (a copy each: XLA does not fold them into gnorm's
  # reductions); leading ones cost nothing, the fold is a free reshape.
  if layout.perm is not None:
    x = x.transpose(layout.perm)
  moved = tuple(x.shape)
  kept = layout.n_kept
  folded = moved if kept == 1 else (math.prod(moved[:kept]), *moved[kept:])
  params = {k: v for k, v in (("gamma", scale), ("beta", bias)) if v is not None}
  y = functional.group_norm(
      params or None, x.reshape(folded), num_groups, epsilon,
      channel_axis=-1, mask=mask, axis_name=axis_name,
      axis_index_groups=index_groups(axis_name, axis_index_groups)).reshape(moved)
  if layout.perm is not None:
    y = y.transpose(np.argsort(layout.perm))
  return y.astype(out)
