"""``gnorm.compat.linen.GroupNorm``: a drop-in for ``flax.linen.GroupNorm``."""

# No ``from __future__ import annotations``: Flax checks the annotation of the
# ``name`` field against the real ``Optional[str]``, not a string.

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Axes
from flax.typing import Dtype
from flax.typing import Initializer

from gnorm._src.compat import flax_common
from gnorm._src.compat import originals


class GroupNorm(nn.Module):
  """Group normalization (Wu & He, 2018): ``flax.linen.GroupNorm``, gnorm's maths.

  A drop-in for ``flax.linen.GroupNorm``: the same fields with the same
  defaults, the same call ``layer(x, *, mask=None)``, the same parameters
  (``scale`` and ``bias`` of shape ``(C,)`` in ``param_dtype``, created in
  flax's order, so random initializers draw the same values), the same
  automatic name (``GroupNorm_0``), the same result dtype (``dtype``, or
  else the promotion of ``x``'s and the parameters' dtypes: bfloat16 input
  with float32 parameters gives float32) and the same kind of error for a
  bad configuration. Checkpoints of either load into the other. The
  normalisation is ``gnorm.group_norm``: exact statistics (never
  ``E[x^2] - E[x]^2``) in at least float32, a backward pass that keeps only ``x`` and per-group
  statistics, statistics across shards with ``axis_name``.

  Where it differs from flax:

  * ``mask``: positions where the mask is False are padding, as in flax
    they are left out of the statistics, but their output is 0 (flax
    normalises them with the statistics of the rest) and they receive no
    gradient, so whatever they hold, NaN or Inf included, reaches no output
    and no gradient. A group with nothing counted outputs 0 (flax: NaN).
    The mask may be any shape that broadcasts to ``x``, such as
    ``(N, L, 1)``; a non-boolean mask is converted with ``astype(bool)``.
  * ``use_fast_variance`` and ``force_float32_reductions`` are accepted and
    have no effect: the statistics are always gnorm's exact ones (two-pass
    on the CPU and TPU, shifted with an exact combine on GPUs), computed in
    at least float32 (flax's default is the one-pass
    ``E[x^2] - E[x]^2``, which loses digits when the mean is large against
    the spread).
  * ``reduction_axes``: every set flax accepts works, with flax's
    statistics (the axes left out are kept, each index of them with
    statistics of its own). Kept axes that are not the leading ones, such
    as axis 2 of ``reduction_axes=(0, 1, 3, 4)`` on rank 5, are moved to
    the front first: a transpose of ``x`` and of the output, which flax
    does not need (docs/drop_ins.md gives its cost).
  * ``axis_index_groups`` combines statistics within each group of
    devices, as flax's ``lax.pmean`` does, exactly (Chan's formula) also
    with a mask that leaves shards with unequal counts (flax averages the
    shards' means); as in flax it is ignored without ``axis_name``. JAX
    runs it in ``shard_map`` and ``pmap``, not under ``vmap``.
  * Where flax raises, the drop-in raises the same exception type with a
    message that starts as flax's, gnorm's detail after it
    (``tests/test_compat_errors.py`` replays flax's cases). It also raises
    where flax does not: a ``TypeError`` for complex input and a
    ``ValueError`` for a negative or non-finite ``epsilon``.

  Attributes:
    num_groups: the number of groups (default 32); None when ``group_size``
      is given.
    group_size: the number of channels in a group, instead of
      ``num_groups``.
    epsilon: added to the variance (default ``1e-6``, flax's).
    dtype: the dtype of the result (default: inferred from the input and the
      parameters).
    param_dtype: the dtype of ``scale`` and ``bias`` (default float32).
    use_bias: whether to create and add ``bias``.
    use_scale: whether to create and multiply by ``scale``.
    bias_init: initializer of ``bias`` (default zeros).
    scale_init: initializer of ``scale`` (default ones).
    reduction_axes: the axes of the statistics, including the last (feature)
      axis; default: every axis but the first.
    axis_name: a mesh axis name: inside ``shard_map`` or ``pmap`` the
      statistics cover the shards along it.
    axis_index_groups: with ``axis_name``: groups of its indices, such as
      ``[[0, 1], [2, 3]]``; statistics within each group.
    use_fast_variance: accepted, no effect.
    force_float32_reductions: accepted, no effect.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from gnorm.compat import linen
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> layer = linen.GroupNorm(num_groups=3)
    >>> variables = layer.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
    >>> y = layer.apply(variables, x)
    >>> y_flax = nn.GroupNorm(num_groups=3).apply(variables, x)
    >>> bool(jnp.allclose(y, y_flax, atol=1e-5))
    True

    bfloat16 input with float32 parameters gives float32, as in flax:

    >>> layer.apply(variables, x.astype(jnp.bfloat16)).dtype
    dtype('float32')

    Padding outputs 0:

    >>> mask = jnp.arange(4)[None, :, None, None] < jnp.array([4, 2])[:, None, None, None]
    >>> y = layer.apply(variables, x, mask=mask)
    >>> float(jnp.abs(y[1, 2:]).max())
    0.0
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = jax.nn.initializers.zeros
  scale_init: Initializer = jax.nn.initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``x`` (features last) by groups of channels.

    Args:
      x: the input, of shape ``(..., C)``; by default axis 0 is the batch
        and every other axis is reduced.
      mask: True where positions count in the statistics, broadcastable to
        ``x``; False positions (padding) output 0.

    Returns:
      The normalised input, of ``x``'s shape, in ``dtype`` (or the promotion
      of ``x``'s and the parameters' dtypes).
    """
    x = jnp.asarray(x)
    if x.ndim == 0:  # flax divides by the feature count it finds
      raise ZeroDivisionError(f"{originals.MODULO_BY_ZERO}: the input must have at least one "
                              "axis, the feature axis; got a scalar.")
    flax_common.reduction_layout(x.ndim, self.reduction_axes)
    channels = x.shape[-1]
    num_groups = flax_common.resolve_groups(self.num_groups, self.group_size, channels,
                                            shape=x.shape, assert_int=True)
    scale = bias = None
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (channels,), self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (channels,), self.param_dtype)
    return flax_common.normalize(
        x, scale, bias, num_groups=num_groups, epsilon=self.epsilon,
        reduction_axes=self.reduction_axes, dtype=self.dtype, mask=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
