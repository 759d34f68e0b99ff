"""``gnorm.compat.haiku.GroupNorm``: a drop-in for ``haiku.GroupNorm``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from gnorm._src.compat import originals
from gnorm._src.functional import group_norm

Initializer = Callable[[Sequence[int], Any], jax.Array]


class _Layout(NamedTuple):
  """How an input of a given rank is laid out for ``gnorm.group_norm``."""

  direct: bool  # x is already gnorm's layout: batch on axis 0, as is
  perm: tuple[int, ...]  # else x.transpose(perm) is (kept..., reduced..., C)
  n_kept: int  # how many leading axes of the transpose become gnorm's batch
  n_groups: int  # gnorm's group count
  channel_axis: int  # where the channels are, in x
  # Haiku's groups axis reduced, not the channels within a group: each
  # statistic covers channels j, j + C/G, ...; the transposed channels are
  # then reordered so that those are contiguous (see ``_strided``).
  strided: bool = False


def _layout(axis: slice | tuple[int, ...], rank: int, channel_index: int, groups: int,
            channels: int) -> _Layout:
  """Maps haiku's ``axis`` and ``data_format`` to a layout gnorm computes.

  Haiku reshapes ``x`` to ``(N, *spatial, G, C // G)`` (channels last) or
  ``(N, G, C // G, *spatial)`` (channels first) and reduces over ``axis``,
  given in the axes of ``x`` and renumbered for the reshaped array: the
  channel axis becomes the within-group axis ``C // G``, and with channels
  first every nonzero entry moves up by one (negative ones included, which
  is how haiku treats them). This repeats that renumbering, then reads the
  reduced set: axes of ``x`` that are not reduced are folded into gnorm's
  batch axis, reduced ones stay as spatial axes, and the group count
  follows from which channel axes are reduced: the groups axis alone
  (haiku's ``-2`` channels last) makes ``C // G`` statistics of channels
  ``G`` apart, which gnorm computes on the channels reordered (``strided``).
  """
  axes = tuple(range(rank))[axis] if isinstance(axis, slice) else tuple(axis)
  ch = rank - 1 if channel_index == -1 else 1
  if channel_index == -1:
    g_axis, c_axis = rank - 1, rank
    where = {a: a for a in range(rank - 1)}  # the other axes of x, renumbered
    renumbered = [rank if a == rank - 1 else a for a in axes]
  else:
    g_axis, c_axis = 1, 2
    where = {a: (a if a == 0 else a + 1) for a in range(rank) if a != 1}
    renumbered = [a if a == 0 else a + 1 for a in axes]
  for a, r in zip(axes, renumbered, strict=True):
    if not -(rank + 1) <= r <= rank:
      # numpy's AxisError is both a ValueError and an IndexError.
      raise np.exceptions.AxisError(
          f"{originals.INDEX}: axis={axis!r}: entry {a} is out of range for an input of "
          f"rank {rank}.")
  reduced = {r % (rank + 1) for r in renumbered}
  if len(reduced) != len(renumbered):
    raise ValueError(f"axis={axis!r} names the same axis twice (input rank {rank}).")
  strided = False
  if g_axis in reduced and groups > 1:
    strided = c_axis not in reduced and channels != groups
    n_groups = channels // groups if strided else 1
  elif c_axis in reduced:
    n_groups = groups
  else:
    n_groups = channels  # every channel on its own
  kept = tuple(a for a, r in where.items() if r not in reduced)
  summed = tuple(a for a, r in where.items() if r in reduced)
  return _Layout(kept == (0,) and not strided, (*kept, *summed, ch), len(kept), n_groups, ch,
                 strided)


def _strided(t: jax.Array, groups: int, inverse: bool = False) -> jax.Array:
  """Reorders the last (channel) axis of ``t`` from haiku's ``(G, C/G)`` order
  to ``(C/G, G)``, so that the channels ``G`` apart that one statistic covers
  are contiguous for gnorm (``inverse``: back)."""
  c = t.shape[-1]
  split = (c // groups, groups) if inverse else (groups, c // groups)
  return jnp.swapaxes(t.reshape(*t.shape[:-1], *split), -1, -2).reshape(t.shape)


def _as_affine(p: jax.Array | None, shape: tuple[int, ...],
               layout: _Layout) -> jax.Array | Literal[False] | None:
  """``p`` as a gnorm gamma/beta, or ``False`` when gnorm cannot take it.

  ``p`` has already been brought to the rank of ``x`` as haiku does. Per
  channel (or a scalar) always works; per sample and channel only when
  gnorm's batch axis is ``x``'s.
  """
  if p is None:
    return None
  c, ch = shape[layout.channel_axis], layout.channel_axis
  if p.ndim != len(shape) or p.shape[ch] not in (1, c):
    return False
  varying = {i for i, d in enumerate(p.shape) if d != 1}
  if varying <= {ch}:
    return jnp.broadcast_to(p.reshape(p.shape[ch]), (c,))  # reordered in _normalise
  if layout.direct and varying <= {0, ch} and p.shape[0] == shape[0]:
    return jnp.broadcast_to(p.reshape(shape[0], p.shape[ch]), (shape[0], c))
  return False


class GroupNorm(hk.Module):
  """Group normalization (Wu & He, 2018): ``haiku.GroupNorm``, gnorm's maths.

  A drop-in for ``haiku.GroupNorm``: the same constructor (same defaults,
  module name ``group_norm`` by default), the same call
  ``layer(x, scale=None, offset=None)`` with call-time ``scale``/``offset``
  (conditional normalisation) when ``create_scale``/``create_offset`` are
  False, the same ``data_format`` values (``"channels_last"``,
  ``"channels_first"`` and haiku's patterns such as ``"NCHW"``, ``"N...C"``
  or ``"BTHWD"``, read by ``hk.get_channel_index``) and the same ``axis``
  semantics, haiku's treatment of negative entries included. The
  parameters are haiku's: ``scale`` (ones) and ``offset`` (zeros) under the
  module's name, of shape ``(C,)`` channels last or ``(C, 1, ..., 1)``
  channels first, in the dtype of ``x`` (or from ``scale_init``/
  ``offset_init``), so the ``params`` of either load into the other. The
  output dtype is haiku's: that of ``x`` promoted with those of ``scale``
  and ``offset`` (bfloat16 input with float32 call-time ``scale`` gives
  float32). The same bad configurations raise the same exception types,
  with messages that start as haiku's (``tests/test_compat_errors.py``).

  The normalisation is ``gnorm.group_norm`` (batch axis 0, channels on the
  ``data_format``'s axis): exact statistics (never ``E[x^2] - E[x]^2``)
  in at least float32 and a backward pass that keeps only ``x`` and per-group statistics.
  Haiku computes ``jnp.var`` in the dtype of ``x``.

  Differences from haiku:

  * Statistics of bfloat16 or float16 input are computed in float32 (haiku
    rounds its mean and variance to the input's dtype), so low-precision
    outputs are closer to the exact result. Float32 outputs agree with
    haiku's to rounding; on data with a large mean (N(100, 3^2)) they are
    closer to the exact result than haiku's channels last (haiku's strided
    reductions lose more digits there) and about as close channels first.
  * ``axis``: any set haiku accepts works. Axes of ``x`` that ``axis``
    leaves out are folded into gnorm's batch axis (e.g. time with
    ``slice(2, None)`` on ``(N, T, C)``; this costs a transpose of ``x`` and
    of the output unless ``axis`` is every axis but the first), and leaving
    the channel axis out normalises each channel on its own, as in haiku.
    An ``axis`` that reduces over haiku's groups axis but not within the
    groups (channels last, haiku's ``-2`` on rank >= 3) makes statistics of
    the channels ``groups`` apart; gnorm computes them on the channels
    reordered, a transpose of ``x`` and of the output.
    ``self.axis`` keeps the value given (haiku renumbers it for its reshaped
    input on the first call). An out-of-range entry
    raises ``numpy.exceptions.AxisError`` (a ``ValueError`` and an
    ``IndexError``), a repeated one ``ValueError``.
  * Call-time ``scale``/``offset`` that are per channel (or scalars), or per
    sample and channel such as ``(N, 1, 1, C)`` with the default ``axis``,
    are applied inside ``gnorm.group_norm``; any other shape haiku accepts
    is applied after it, ``y * scale + offset``, as haiku does.
  * Input needs a batch axis (rank >= 2). Rank-1 input raises a
    ``ValueError`` with channels last (haiku then adds its own batch axis
    of 1 and, by default, reduces over nothing: the output is ``offset``)
    and an ``IndexError`` with channels first, as in haiku. A negative or
    non-finite ``eps`` raises a ``ValueError`` (haiku returns NaN for a
    negative one).

  Attributes:
    groups: the number of groups.
    axis: the ``axis`` given (an int or a sequence becomes a tuple).
    eps: added to the variance.
    data_format: the ``data_format`` given.
    channel_index: ``-1`` or ``1``, from ``data_format``.
    create_scale: whether ``scale`` is a parameter.
    create_offset: whether ``offset`` is a parameter.
    scale_init: initializer of ``scale`` (only when ``create_scale``).
    offset_init: initializer of ``offset`` (only when ``create_offset``).
    rank: the rank of the first input, then fixed; None before.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import haiku as hk
    >>> from gnorm.compat.haiku import GroupNorm
    >>> f = hk.without_apply_rng(hk.transform(lambda x: GroupNorm(4)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))  # NHWC
    >>> params = f.init(None, x)
    >>> jax.tree.map(jnp.shape, params)
    {'group_norm': {'offset': (16,), 'scale': (16,)}}
    >>> y = f.apply(params, x)
    >>> y.shape, y.dtype
    ((2, 8, 8, 16), dtype('float32'))

    ``haiku.GroupNorm``'s parameters apply unchanged:

    >>> g = hk.without_apply_rng(hk.transform(lambda x: hk.GroupNorm(4)(x)))
    >>> bool(jnp.allclose(g.apply(params, x), y, atol=1e-5))
    True

    Channels first, with a call-time (conditional) scale:

    >>> h = hk.without_apply_rng(hk.transform(lambda x, s: GroupNorm(
    ...     4, create_scale=False, data_format="channels_first")(x, scale=s)))
    >>> xc = jnp.moveaxis(x, -1, 1)
    >>> s = jnp.full((16, 1, 1), 2.0)
    >>> h.apply(h.init(None, xc, s), xc, s).shape
    (2, 16, 8, 8)
  """

  def __init__(
      self,
      groups: int,
      axis: int | slice | Sequence[int] = slice(1, None),
      create_scale: bool = True,
      create_offset: bool = True,
      eps: float = 1e-5,
      scale_init: Initializer | None = None,
      offset_init: Initializer | None = None,
      data_format: str = "channels_last",
      name: str | None = None,
  ):
    """Creates the module; see the class docstring.

    Args:
      groups: the number of groups; it must divide the channels.
      axis: the axes of ``x`` to normalise over (int, slice or ints); by
        default every axis but the first.
      create_scale: whether to create and apply a ``scale`` parameter.
      create_offset: whether to create and add an ``offset`` parameter.
      eps: added to the variance.
      scale_init: initializer of ``scale`` (default ones); only with
        ``create_scale=True``.
      offset_init: initializer of ``offset`` (default zeros); only with
        ``create_offset=True``.
      data_format: ``"channels_last"`` (default), ``"channels_first"`` or a
        pattern such as ``"NCHW"``, ``"NHWC"``, ``"N...C"``.
      name: the module's name (default ``group_norm``).

    Raises:
      ValueError: an ``axis`` that is not an int, a slice or ints, an
        initializer without its ``create_*``, or an unknown ``data_format``
        (as haiku).
    """
    super().__init__(name=name)
    if isinstance(axis, int):
      axis = (axis,)
    elif isinstance(axis, Iterable):
      axis = tuple(axis)
    if not (isinstance(axis, slice)
            or (isinstance(axis, tuple) and all(isinstance(a, int) for a in axis))):
      raise ValueError(f"{originals.HAIKU_AXIS} Got {axis!r}.")
    self.axis = axis
    self.groups = groups
    self.eps = eps
    self.data_format = data_format
    self.channel_index = hk.get_channel_index(data_format)
    self.create_scale = create_scale
    self.create_offset = create_offset
    self.rank: int | None = None
    if create_scale:
      self.scale_init = jnp.ones if scale_init is None else scale_init
    elif scale_init is not None:
      raise ValueError("Cannot set `scale_init` if `create_scale=False`.")
    if create_offset:
      self.offset_init = jnp.zeros if offset_init is None else offset_init
    elif offset_init is not None:
      raise ValueError("Cannot set `offset_init` if `create_offset=False`.")

  def __call__(
      self,
      x: jax.Array,
      scale: jax.Array | None = None,
      offset: jax.Array | None = None,
  ) -> jax.Array:
    """Normalises ``x``.

    Args:
      x: input in the constructor's ``data_format``, batch first.
      scale: multiplies the normalised input; broadcastable to ``x`` after
        leading axes of size 1 are added (so ``(C, 1, 1)`` channels first).
        Only with ``create_scale=False``.
      offset: added after ``scale``, broadcast the same way. Only with
        ``create_offset=False``.

    Returns:
      The normalised ``x``, of its shape, in its dtype promoted with those
      of ``scale`` and ``offset``.

    Raises:
      ValueError: rank 1, a rank different from the first call's, ``scale`` or
        ``offset`` given while the module creates it, ``groups`` not
        dividing the channels, or a bad ``eps``.
      IndexError: an input without a channel axis for ``data_format``.
    """
    x = jnp.asarray(x)
    if self.rank is not None and x.ndim != self.rank:
      raise ValueError(f"{originals.haiku_rank(self.rank, x.ndim)} (Input shape {x.shape}.)")
    if self.create_scale and scale is not None:
      raise ValueError("Cannot pass `scale` at call time if `create_scale=True`.")
    if self.create_offset and offset is not None:
      raise ValueError("Cannot pass `offset` at call time if `create_offset=True`.")
    channels = x.shape[self.channel_index]
    if x.ndim < 2:
      raise ValueError(
          f"GroupNorm needs a batch axis: got an input of shape {x.shape}; add one with "
          "x[None] (haiku would normalise each element on its own here).")
    if channels % self.groups != 0:
      raise ValueError(
          f"{originals.haiku_groups(channels, self.groups)} (input shape {x.shape}).")
    if not isinstance(self.groups, numbers.Integral):  # haiku fails in a reshape
      spatial = x.shape[1:-1] if self.channel_index == -1 else x.shape[2:]
      split = (self.groups, channels / self.groups)
      grouped = (-1, *spatial, *split) if self.channel_index == -1 else (-1, *split, *spatial)
      raise TypeError(f"{originals.integer_shape(grouped)} groups must be an int, got "
                      f"{self.groups!r}.")
    layout = _layout(self.axis, x.ndim, self.channel_index, self.groups, channels)
    self.rank = x.ndim

    if self.create_scale or self.create_offset:
      params_shape: tuple[int, ...] = (channels,)
      if self.channel_index == 1:
        params_shape += (1,) * (x.ndim - 2)
    if self.create_scale:
      scale = hk.get_parameter("scale", params_shape, x.dtype, init=self.scale_init)
    if self.create_offset:
      offset = hk.get_parameter("offset", params_shape, x.dtype, init=self.offset_init)
    if scale is not None:
      scale = jax.lax.broadcast_to_rank(jnp.asarray(scale), x.ndim)
    if offset is not None:
      offset = jax.lax.broadcast_to_rank(jnp.asarray(offset), x.ndim)

    # Haiku's dtype: the normalised x (floating) promoted with scale, offset
    # (by JAX's standard rules, under strict promotion too; cast explicitly).
    with jax.numpy_dtype_promotion("standard"):
      dtype = jnp.result_type(x.dtype, 0.0)
      dtype = jnp.result_type(dtype, *(p for p in (scale, offset) if p is not None))
    x = x.astype(dtype)
    gamma = _as_affine(scale, x.shape, layout)
    # Offset goes in only if scale did (or there is none): (x̂ * s) + o.
    beta: jax.Array | Literal[False] | None = (
        _as_affine(offset, x.shape, layout) if gamma is not False else False)
    params = {k: v for k, v in (("gamma", gamma), ("beta", beta))
              if v is not None and v is not False}
    y = self._normalise(x, params or None, layout)
    if gamma is False and scale is not None:  # False only for a given scale
      y = y * scale.astype(dtype)
    if beta is False and offset is not None:
      y = y + offset.astype(dtype)
    return y

  def _normalise(self, x: jax.Array, params: dict[str, jax.Array] | None,
                 layout: _Layout) -> jax.Array:
    """``gnorm.group_norm`` of ``x`` in the ``layout`` for haiku's ``axis``."""
    if layout.direct:
      return group_norm(params, x, layout.n_groups, self.eps, channel_axis=layout.channel_axis)
    xt = x.transpose(layout.perm)
    if layout.strided:  # a per-channel gamma/beta (_as_affine) is reordered alike
      xt = _strided(xt, self.groups)
      params = None if params is None else {
          k: _strided(v, self.groups) for k, v in params.items()}
    k = layout.n_kept
    flat = xt.reshape((math.prod(xt.shape[:k]), *xt.shape[k:]))
    y = group_norm(params, flat, layout.n_groups, self.eps, channel_axis=-1).reshape(xt.shape)
    if layout.strided:
      y = _strided(y, self.groups, inverse=True)
    return y.transpose(np.argsort(layout.perm))
