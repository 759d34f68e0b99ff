"""``gnorm.compat.equinox.GroupNorm``: a drop-in for ``equinox.nn.GroupNorm``."""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from gnorm._src.compat import originals
from gnorm._src.functional import group_norm

# The default of ``state`` is equinox's own sentinel object, read from the
# original's signature: ``layer(x)`` and ``layer(x, state)`` then behave
# exactly as equinox's do, and the two signatures compare equal.
_NO_STATE: Any = inspect.signature(eqx.nn.GroupNorm.__call__).parameters["state"].default


def _per_channel(param: jax.Array, channels: int, name: str, shape) -> jax.Array:
  """``weight`` or ``bias`` as a ``(channels,)`` vector (equinox broadcasts it)."""
  if param.shape == (channels,):
    return param
  if param.ndim > 1 or (param.ndim == 1 and param.shape[0] != 1):
    # equinox broadcasts it, as (C, 1, ...), to the input's shape.
    as_equinox = (*param.shape, *(1,) * (len(shape) - param.ndim))
    raise ValueError(
        f"{originals.broadcast(param.dtype, as_equinox, shape)}: `{name}` has shape "
        f"{param.shape}, which does not broadcast to the input's {channels} channels "
        f"(input shape {shape}).")
  return jnp.broadcast_to(param, (channels,))


class GroupNorm(eqx.Module):
  """Group normalization (Wu & He, 2018): ``equinox.nn.GroupNorm``, gnorm's maths.

  A drop-in for ``equinox.nn.GroupNorm``: the same constructor
  ``GroupNorm(groups, channels=None, eps=1e-5, channelwise_affine=True,
  dtype=None)``, the same call ``layer(x, state=<sentinel>, *, key=None)`` on
  ONE unbatched, channels-first example of shape ``(C, *spatial)`` (rank 1
  and up; use ``jax.vmap`` or ``eqx.filter_vmap`` for a batch), returning
  ``y`` alone, or ``(y, state)`` with ``state`` passed through unchanged when
  one is given (``key`` is ignored). The module has equinox's fields, in
  equinox's order: static ``groups``, ``channels``, ``eps`` and
  ``channelwise_affine``, then the leaves ``weight`` (ones) and ``bias``
  (zeros) of shape ``(channels,)``, or None without the affine. Its leaves,
  their shapes and dtypes are the original's, so
  ``eqx.tree_serialise_leaves`` files of either load into the other. Only
  the class in the tree definition differs (an ``isinstance`` check against
  ``eqx.nn.GroupNorm`` is False).

  The normalisation is ``gnorm.group_norm`` on the example with a batch axis
  of 1 added (``channel_axis=1``): exact statistics (never
  ``E[x^2] - E[x]^2``) in at least float32 and a backward pass that keeps only ``x`` and per-group
  statistics. Equinox also computes a two-pass variance (``jnp.var``) in at
  least float32, so the two agree to float32 rounding, also on data with a
  large mean: on N(100, 3^2) both are within a few 1e-6 of the exact result
  and of each other (two float32 ulps of the mean, divided by the spread).
  This layer is not more accurate than equinox's: equinox's ``jnp.mean``
  over each contiguous group is often the slightly closer of the two there.

  ``dtype`` is equinox's: the dtype of ``weight`` and ``bias`` only
  (default float32, or float64 with ``jax_enable_x64``). Whatever it is, the
  statistics and the affine transform are computed in at least float32 and
  the output has the dtype of ``x`` (bfloat16 in, bfloat16 out), as in
  equinox, integer input included (equinox casts its output back to it).

  Differences from equinox:

  * A negative or non-finite ``eps`` raises a ``ValueError`` when the layer
    is called (equinox returns NaN for a negative one).
  * The same bad inputs raise the same exception types as equinox's, with
    messages that start as equinox's and then name the shapes
    (``tests/test_compat_errors.py`` replays equinox's cases).

  Attributes:
    groups: the number of groups the channels are split into.
    channels: the number of channels, or None (allowed without the affine).
    eps: added to the variance inside the square root.
    channelwise_affine: whether ``weight`` and ``bias`` exist.
    weight: per-channel scale, shape ``(channels,)``, or None.
    bias: per-channel shift, shape ``(channels,)``, or None.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import equinox as eqx
    >>> from gnorm.compat.equinox import GroupNorm
    >>> norm = GroupNorm(4, 16)
    >>> x = jax.random.normal(jax.random.key(0), (16, 8, 8))  # (C, H, W)
    >>> y = norm(x)
    >>> y.shape, y.dtype
    ((16, 8, 8), dtype('float32'))
    >>> bool(jnp.allclose(y.reshape(4, -1).mean(axis=1), 0.0, atol=1e-5))
    True

    A batch, with equinox's state convention (the state passes through):

    >>> norm, state = eqx.nn.make_with_state(GroupNorm)(4, 16)
    >>> xs = jnp.stack([x, 2 * x])
    >>> ys, _ = jax.vmap(norm, in_axes=(0, None), out_axes=(0, None))(xs, state)
    >>> ys.shape
    (2, 16, 8, 8)

    The same leaves as ``eqx.nn.GroupNorm``, so checkpoints carry over:

    >>> orig = eqx.nn.GroupNorm(4, 16)
    >>> [(a.shape, a.dtype) for a in jax.tree.leaves(orig)] == [
    ...     (a.shape, a.dtype) for a in jax.tree.leaves(norm)]
    True
    >>> bool(jnp.allclose(orig(x), norm(x), atol=1e-5))
    True
  """

  groups: int = eqx.field(static=True)
  channels: int | None = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  weight: jax.Array | None
  bias: jax.Array | None

  def __init__(
      self,
      groups: int,
      channels: int | None = None,
      eps: float = 1e-5,
      channelwise_affine: bool = True,
      dtype: Any = None,
  ):
    """Creates the layer; see the class docstring.

    Args:
      groups: the number of groups; it must divide ``channels``.
      channels: the number of input channels; may be None only when
        ``channelwise_affine=False``.
      eps: added to the variance inside the square root.
      channelwise_affine: whether to create ``weight`` and ``bias``.
      dtype: the dtype of ``weight`` and ``bias`` (default: float32, or
        float64 with ``jax_enable_x64``).

    Raises:
      ValueError: ``groups`` does not divide ``channels``, or ``channels`` is
        None with ``channelwise_affine=True`` (as equinox).
    """
    if channels is not None and channels % groups != 0:
      raise ValueError(f"{originals.EQUINOX_GROUPS} Got groups={groups}, channels={channels}.")
    if channels is None and channelwise_affine:
      raise ValueError(f"{originals.EQUINOX_CHANNELS}.")
    self.groups = groups
    self.channels = channels
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    if channelwise_affine:
      self.weight = jnp.ones(channels, dtype=dtype)
      self.bias = jnp.zeros(channels, dtype=dtype)
    else:
      self.weight = None
      self.bias = None

  def __call__(
      self,
      x: jax.Array,
      state: eqx.nn.State = _NO_STATE,
      *,
      key: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, eqx.nn.State]:
    """Normalises one example of shape ``(C, *spatial)``.

    Args:
      x: one unbatched example, channels first.
      state: passed through unchanged (as ``equinox.nn.GroupNorm``: for
        interchangeability with ``equinox.nn.BatchNorm``).
      key: ignored.

    Returns:
      ``y`` of the shape and dtype of ``x``, or ``(y, state)`` when ``state``
      is given.

    Raises:
      IndexError: ``x`` is a scalar.
      TypeError: ``groups`` does not divide the number of channels of ``x``.
      ValueError: ``weight`` or ``bias`` does not broadcast to the channels
        of ``x``, or ``eps`` is negative or not finite.
    """
    del key
    with jax.named_scope("gnorm.compat.equinox.GroupNorm"):
      x = jnp.asarray(x)
      if x.ndim == 0:
        raise IndexError(f"{originals.INDEX}: GroupNorm takes one example of shape "
                         "(channels, *spatial); got a scalar.")
      channels = x.shape[0]
      # equinox reshapes x to (groups, channels // groups, *spatial).
      if channels % self.groups != 0:
        grouped = (self.groups, channels // self.groups, *x.shape[1:])
        raise TypeError(
            f"{originals.reshape(x.shape, grouped)}: GroupNorm(groups={self.groups}) cannot "
            f"split the {channels} channels of an input of shape {x.shape} (channels first) "
            "into equal groups.")
      if not isinstance(self.groups, numbers.Integral):
        split: tuple = (self.groups, channels / self.groups, *x.shape[1:])
        raise TypeError(f"{originals.integer_shape(split)} groups must be an int, got "
                        f"{self.groups!r}.")
      params = None
      if self.channelwise_affine:
        # __init__ creates both arrays exactly when channelwise_affine is set.
        assert self.weight is not None and self.bias is not None
        params = {
            "gamma": _per_channel(self.weight, channels, "weight", x.shape),
            "beta": _per_channel(self.bias, channels, "bias", x.shape),
        }
      y = group_norm(params, x[None], self.groups, self.eps, channel_axis=1)[0]
      # Equinox's output always has the input's dtype (integers included).
      y = y.astype(x.dtype)
    if state is _NO_STATE:
      return y
    return y, state
