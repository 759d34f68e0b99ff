"""``gnorm.nnx.GroupNorm``: neupy's GroupNorm as a thin ``flax.nnx`` module."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from gnorm._src import functional
from gnorm._src import initializers
from gnorm._src import module_options
from gnorm._src import validation


class GroupNorm(nnx.Module):
  """Group Normalization layer (Wu & He, 2018) for ``flax.nnx``.

  The eager twin of ``gnorm.GroupNorm``: the same options, initializers and
  numbers for the same parameters, with ``gamma`` and ``beta`` created when
  the module is built (so the number of channels is an argument).

  Args:
    n_groups: the number of groups; must divide ``num_channels``. ``None``
      when ``group_size`` is given (exactly one of the two).
    num_channels: the number of channels ``C`` of the input (required).
    gamma: the initial scale: a scalar, an array-like of shape ``(C,)`` or
      neupy's ``(1, 1, 1, C)``, a ``jax.Array``, a
      ``jax.nn.initializers``-style ``(key, shape, dtype)`` callable, one of
      ``gnorm.init.Constant``, ``Normal``, ``Uniform``, or ``None`` for no
      scale. Defaults to ``1.0``.
    beta: the initial offset, in the same forms; defaults to ``0.0``.
    epsilon: added to the variance inside the square root (default
      ``1e-5``; ``flax.nnx.GroupNorm`` uses ``1e-6``).
    channel_axis: the input axis holding the channels (default ``-1``).
    param_dtype: the dtype of ``gamma`` and ``beta`` (default float32).
    group_size: channels per group, instead of ``n_groups``; must divide
      ``num_channels``.
    activation: fused after the affine transform: ``"relu"``,
      ``"silu"``/``"swish"``, ``"gelu"`` (exact), ``"gelu_tanh"``, a
      callable, or ``None`` (default).
    axis_name: a mesh axis name or tuple of names: inside ``shard_map`` or
      ``pmap``, the statistics cover the shards along it.
    axis_index_groups: with ``axis_name``: groups of its indices, such as
      ``((0, 1), (2, 3))``; the statistics are combined within each group
      (see ``gnorm.group_norm``). Kept as a tuple of tuples.
    implementation: ``"auto"`` (default), ``"xla"`` or ``"pallas"``; see
      ``gnorm.group_norm``.
    rngs: an ``nnx.Rngs``, needed only when ``gamma`` or ``beta`` is a
      random initializer (its ``params`` stream is used).

  The call takes ``x`` and three optional keyword arguments: ``mask``
  (positions where it is False are padding: left out of the statistics,
  output 0, no gradient, whatever they hold), and
  ``scale`` and ``shift``, per-sample conditioning as in the AdaGN of
  diffusion UNets (guided-diffusion) or FiLM, of shape ``(N, C)`` (or
  ``(N, 1, 1, C)``, ``(C,)``, a scalar)::

    y = act((xhat * gamma + beta) * (1 + scale) + shift)

  where ``xhat`` is ``x`` normalised; ``gamma`` counts as 1 and ``beta`` as
  0 when the layer has none. They fold into per-sample parameters
  ``gamma * (1 + scale)`` and ``beta * (1 + scale) + shift``, so the
  activation stays fused and gradients reach ``gamma``, ``beta``, ``scale``
  and ``shift``.

  Raises:
    TypeError: an argument of the wrong type, or no ``num_channels``.
    ValueError: neither or both of ``n_groups`` and ``group_size``, either
      or ``num_channels`` not positive, ``n_groups`` or ``group_size`` not
      dividing ``num_channels``, ``gamma``/``beta`` of the wrong size (the
      message names both sizes), an unknown activation name,
      ``axis_index_groups`` without ``axis_name`` or not groups of one size
      holding each index once, or no ``rngs`` for a random initializer.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import gnorm
    >>> layer = gnorm.nnx.GroupNorm(4, 16, gamma=gnorm.init.Normal(1.0, 0.02),
    ...                             rngs=nnx.Rngs(0))
    >>> layer.gamma.shape, layer.beta.shape
    ((16,), (16,))
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    >>> y = nnx.jit(lambda m, x: m(x))(layer, x)
    >>> params = {"gamma": layer.gamma[...], "beta": layer.beta[...]}
    >>> bool(jnp.allclose(y, gnorm.group_norm(params, x, 4)))
    True

    Groups of 4 channels, fused SiLU and AdaGN conditioning from an
    embedding, as in a diffusion UNet:

    >>> layer = gnorm.nnx.GroupNorm(num_channels=16, group_size=4,
    ...                             activation="silu")
    >>> emb = jax.random.normal(jax.random.key(2), (2, 32))
    >>> scale, shift = jnp.split(emb, 2, axis=-1)  # each (N, C) = (2, 16)
    >>> y = layer(x, scale=scale, shift=shift)
    >>> xhat = gnorm.group_norm(None, x, group_size=4)
    >>> ref = jax.nn.silu(xhat * (1 + scale[:, None, None]) + shift[:, None, None])
    >>> bool(jnp.allclose(y, ref, atol=1e-5))
    True

  References:
    Yuxin Wu and Kaiming He, "Group Normalization", ECCV 2018,
    arXiv:1803.08494.
  """

  def __init__(
      self,
      n_groups: int | None = None,
      num_channels: int | None = None,
      *,
      gamma: Any = 1.0,
      beta: Any = 0.0,
      epsilon: float = 1e-5,
      channel_axis: int = -1,
      param_dtype: DTypeLike = jnp.float32,
      group_size: int | None = None,
      activation: str | Callable[[jax.Array], jax.Array] | None = None,
      axis_name: Hashable | tuple[Hashable, ...] | None = None,
      axis_index_groups: Sequence[Sequence[int]] | None = None,
      implementation: str = "auto",
      rngs: nnx.Rngs | None = None,
  ):
    # Plain Python values are static attributes of an nnx module.
    self.n_groups = n_groups
    self.num_channels = num_channels
    self.epsilon = epsilon
    self.channel_axis = channel_axis
    self.param_dtype = param_dtype
    self.group_size = group_size
    self.activation = activation
    self.implementation = implementation
    module_options.check_options(n_groups=n_groups, gamma=gamma, beta=beta,
                          epsilon=epsilon, channel_axis=channel_axis,
                          param_dtype=param_dtype, group_size=group_size,
                          activation=activation, axis_name=axis_name,
                          axis_index_groups=axis_index_groups,
                          implementation=implementation)
    # A list of names becomes a tuple: static attributes must be hashable.
    self.axis_name = validation.check_axis_name(axis_name)
    self.axis_index_groups = validation.check_axis_index_groups(
        axis_index_groups, self.axis_name)
    if num_channels is None:
      raise TypeError(
          "gnorm.nnx.GroupNorm needs num_channels, the number of input "
          "channels: GroupNorm(n_groups, num_channels) or "
          "GroupNorm(num_channels=C, group_size=...).")
    num_channels = self.num_channels = validation.check_n_groups(
        num_channels, what="num_channels")
    if group_size is None:
      assert n_groups is not None  # check_options: exactly one of the two is given
      validation.check_groups_divide(n_groups, num_channels, f"(..., {num_channels})")
    elif num_channels % group_size:
      raise ValueError(
          f"group_size ({group_size}) must divide num_channels ({num_channels}).")
    # Declared for type checkers; set by name below.
    self.gamma: nnx.Param[jax.Array] | None
    self.beta: nnx.Param[jax.Array] | None
    for name, value in (("gamma", gamma), ("beta", beta)):
      init = initializers.resolve(name, value)
      if init is None:
        setattr(self, name, None)
        continue
      if initializers.needs_key(value):
        if rngs is None:
          raise ValueError(
              f"{name} is set by the initializer {value!r}, which may be "
              "random: pass rngs=nnx.Rngs(...).")
        key = rngs.params()
      else:
        key = None
      setattr(self, name, nnx.Param(init(key, (num_channels,), param_dtype)))

  def _function_kwargs(self) -> dict[str, Any]:
    """The keyword options passed through to ``gnorm.group_norm``."""
    return {"channel_axis": self.channel_axis, "group_size": self.group_size,
            "activation": self.activation, "axis_name": self.axis_name,
            "axis_index_groups": self.axis_index_groups,
            "implementation": self.implementation}

  def get_output_shape(self, input_shape: Sequence[int | None] | None):
    """Returns the output shape (the input's), as neupy's; see ``gnorm.GroupNorm``.

    Examples:
      >>> import gnorm
      >>> gnorm.nnx.GroupNorm(4, 16).get_output_shape((None, 28, 28, 16))
      (None, 28, 28, 16)
    """
    shape = module_options.output_shape(input_shape, self.n_groups, self.channel_axis,
                                 self._describe(), self.group_size)
    if shape is not None:
      channels = shape[validation.check_channel_axis(self.channel_axis, shape)]
      if channels is not None and channels != self.num_channels:
        raise ValueError(
            f"{self._describe()} was built for {self.num_channels} channels, "
            f"but the input of shape {shape} has {channels} on channel_axis "
            f"{self.channel_axis}.")
    return shape

  def _describe(self) -> str:
    groups = (f"group_size={self.group_size}" if self.group_size is not None
              else f"n_groups={self.n_groups}")
    return f"gnorm.nnx.GroupNorm({groups}, num_channels={self.num_channels})"

  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None,
               scale: ArrayLike | None = None,
               shift: ArrayLike | None = None) -> jax.Array:
    """Normalises ``x``: ``gnorm.group_norm`` with this module's parameters.

    Args:
      x: input of rank >= 2, batch first, ``num_channels`` on
        ``channel_axis``.
      mask: optional boolean array broadcastable to ``x``; positions where it
        is False are padding: left out of the statistics, output 0, and given
        no gradient (see ``gnorm.group_norm``).
      scale: optional AdaGN / FiLM scale of shape ``(N, C)`` (or
        ``(N, 1, 1, C)``, ``(C,)``, a scalar); see the class docstring:
        ``y = act((xhat * gamma + beta) * (1 + scale) + shift)``.
      shift: optional AdaGN / FiLM shift, in the same shapes.
    """
    if not isinstance(x, jax.Array):
      x = jnp.asarray(x)
    shape = self.get_output_shape(x.shape)
    axis = validation.check_channel_axis(self.channel_axis, shape)
    params = {}
    if self.gamma is not None:
      params["gamma"] = self.gamma[...]
    if self.beta is not None:
      params["beta"] = self.beta[...]
    params = module_options.condition(params, shape, axis, scale, shift, self._describe())
    return functional.group_norm(
        params, x, self.n_groups, self.epsilon, mask=mask,
        **self._function_kwargs())
