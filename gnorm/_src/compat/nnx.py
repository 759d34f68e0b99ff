"""``gnorm.compat.nnx.GroupNorm``: a drop-in for ``flax.nnx.GroupNorm``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.typing import Axes
from flax.typing import Dtype
from flax.typing import Initializer
from flax.typing import PromoteDtypeFn

from gnorm._src import validation
from gnorm._src.compat import flax_common
from gnorm._src.compat import originals


class GroupNorm(nnx.Module):
  """Group normalization (Wu & He, 2018): ``flax.nnx.GroupNorm``, gnorm's maths.

  A drop-in for ``flax.nnx.GroupNorm``: the same constructor with the same
  defaults, the same call ``layer(x, *, mask=None)``, the same attributes
  (``num_groups``, ``group_size``, ``epsilon``, ...), the same state
  (``scale`` and ``bias``, ``nnx.Param`` of shape ``(num_features,)`` in
  ``param_dtype``, drawn from ``rngs`` in flax's order; ``None`` when
  ``use_scale``/``use_bias`` is False), the same result dtype (``dtype``, or
  else the promotion of ``x``'s and the parameters' dtypes, through
  ``promote_dtype`` as in flax) and the same kind of error for a bad
  configuration. State saved from either (``nnx.state``, ``nnx.split``)
  loads into the other with ``nnx.update`` or ``nnx.merge``. The
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
  * ``use_fast_variance`` is accepted and has no effect: the statistics are
    always gnorm's exact ones (two-pass on the CPU and TPU, shifted with an
    exact combine on GPUs), in at least float32 (flax's default is
    the one-pass ``E[x^2] - E[x]^2``, which loses digits when the mean is
    large against the spread).
  * ``reduction_axes``: every set flax accepts works, with
    ``flax.linen.GroupNorm``'s statistics (the axes left out are kept, each
    index of them with statistics of its own). Kept axes that are not the
    leading ones, such as axis 2 of ``reduction_axes=(0, 1, 3, 4)`` on rank
    5, are moved to the front first: a transpose of ``x`` and of the output
    (docs/drop_ins.md gives its cost). With more than one kept axis (for
    example ``reduction_axes=(-3, -2, -1)`` on ``(B1, B2, H, W, C)``)
    ``flax.nnx.GroupNorm`` 0.12 mixes the statistics of different samples,
    and it raises on unbatched input (every axis reduced); the drop-in gives
    ``flax.linen``'s answer in both cases.
  * ``axis_index_groups`` combines statistics within each group of
    devices, as flax's ``lax.pmean`` does, exactly (Chan's formula) also
    with a mask that leaves shards with unequal counts (flax averages the
    shards' means); as in flax it is ignored without ``axis_name``. With
    ``axis_name``, a bad value raises here, in the constructor, naming it.
    JAX runs it in ``shard_map`` and ``pmap``, not under ``vmap``.
  * Where flax raises, the drop-in raises the same exception type with a
    message that starts as flax's, gnorm's detail after it
    (``tests/test_compat_errors.py`` replays flax's cases). It also raises
    where flax does not: a ``TypeError`` for complex input, a ``ValueError``
    for a negative or non-finite ``epsilon`` or ``reduction_axes`` out of
    range.

  Args:
    num_features: the number of channels ``C`` of the input (its last axis).
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
      ``[[0, 1], [2, 3]]``; statistics within each group. Kept as given.
    use_fast_variance: accepted, no effect.
    promote_dtype: ``f((x, scale, bias), dtype=...)`` returning the three
      cast to a common dtype, applied before normalising (flax's default).
    rngs: an ``nnx.Rngs``; its ``params`` stream draws ``scale`` and then
      ``bias``.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from gnorm.compat import nnx as gnnx
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> layer = gnnx.GroupNorm(num_features=6, num_groups=3, rngs=nnx.Rngs(0))
    >>> jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(layer)))
    {'bias': (6,), 'scale': (6,)}
    >>> flax_layer = nnx.GroupNorm(num_features=6, num_groups=3, rngs=nnx.Rngs(0))
    >>> bool(jnp.allclose(layer(x), flax_layer(x), atol=1e-5))
    True

    flax's state loads as it is, and the layer works under ``nnx.jit``:

    >>> nnx.update(layer, nnx.state(flax_layer))
    >>> nnx.jit(lambda m, x: m(x))(layer, x.astype(jnp.bfloat16)).dtype
    dtype('float32')
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = jax.nn.initializers.zeros,
      scale_init: Initializer = jax.nn.initializers.ones,
      reduction_axes: Axes | None = None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    self.feature_axis = -1
    if (num_groups is None and isinstance(group_size, float) and group_size > 0
        and not num_features % group_size):
      # flax takes a float group size that divides the features, and fails
      # in a reshape at the call: so does this (the same attributes).
      self.num_groups: Any = num_features // group_size
      self.group_size: Any = group_size
    else:
      self.num_groups = flax_common.resolve_groups(num_groups, group_size, num_features,
                                                   features="features")
      self.group_size = num_features // self.num_groups
    # flax checks nothing here; a bad value would fail inside its pmean.
    validation.check_axis_index_groups(flax_common.index_groups(axis_name, axis_index_groups),
                                       axis_name)
    shape = (num_features,)
    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalises ``x`` (features last) by groups of channels.

    Args:
      x: the input, of shape ``(..., num_features)``; by default axis 0 is
        the batch and every other axis is reduced.
      mask: True where positions count in the statistics, broadcastable to
        ``x``; False positions (padding) output 0.

    Returns:
      The normalised input, of ``x``'s shape, in ``dtype`` (or the promotion
      of ``x``'s and the parameters' dtypes).
    """
    x = jnp.asarray(x)
    if isinstance(self.group_size, float):
      flax_common.resolve_groups(None, self.group_size, self.num_groups * self.group_size,
                                 shape=x.shape, features="features")
    features = self.num_groups * self.group_size
    if x.ndim < 1 or x.shape[-1] != features:  # flax fails reshaping x by groups
      grouped = (*x.shape[:-1], self.num_groups, self.group_size)
      raise TypeError(
          f"{originals.reshape(x.shape, grouped)}: the input of shape {x.shape} must have "
          f"num_features={features} channels on its last axis.")
    flax_common.reduction_layout(x.ndim, self.reduction_axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    with flax_common.flax_promotion():
      x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    return flax_common.normalize(
        x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon,
        reduction_axes=self.reduction_axes, dtype=self.dtype, mask=mask,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups)
