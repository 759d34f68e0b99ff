"""``gnorm.nnx.GroupNorm``: the seed's layer as a thin ``flax.nnx`` module."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from gnorm._src import functional, initializers, modules, validation


class GroupNorm(nnx.Module):
  """Group Normalization layer (Wu & He, 2018) for ``flax.nnx``.

  The eager twin of ``gnorm.GroupNorm``: the same options, initializers and
  numbers for the same parameters, with ``gamma`` and ``beta`` created when
  the module is built (so the number of channels is an argument).

  Args:
    n_groups: the number of groups; must divide ``num_channels``.
    num_channels: the number of channels ``C`` of the input.
    gamma: the initial scale: a scalar, an array-like of shape ``(C,)`` or
      the seed's ``(1, 1, 1, C)``, a ``jax.Array``, a
      ``jax.nn.initializers``-style ``(key, shape, dtype)`` callable, one of
      ``gnorm.init.Constant``, ``Normal``, ``Uniform``, or ``None`` for no
      scale. Defaults to ``1.0``.
    beta: the initial offset, in the same forms; defaults to ``0.0``.
    epsilon: added to the variance inside the square root (default
      ``1e-5``; ``flax.nnx.GroupNorm`` uses ``1e-6``).
    channel_axis: the input axis holding the channels (default ``-1``).
    param_dtype: the dtype of ``gamma`` and ``beta`` (default float32).
    rngs: an ``nnx.Rngs``, needed only when ``gamma`` or ``beta`` is a
      random initializer (its ``params`` stream is used).

  Raises:
    TypeError: an argument of the wrong type.
    ValueError: ``n_groups`` or ``num_channels`` not positive, ``n_groups``
      not dividing ``num_channels``, ``gamma``/``beta`` of the wrong size
      (the message names both sizes), or no ``rngs`` for a random
      initializer.

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

  References:
    Yuxin Wu and Kaiming He, "Group Normalization", ECCV 2018,
    arXiv:1803.08494.
  """

  def __init__(
      self,
      n_groups: int,
      num_channels: int,
      *,
      gamma: Any = 1.0,
      beta: Any = 0.0,
      epsilon: float = 1e-5,
      channel_axis: int = -1,
      param_dtype: DTypeLike = jnp.float32,
      rngs: nnx.Rngs | None = None,
  ):
    # Plain Python values are static attributes of an nnx module.
    self.n_groups = n_groups
    self.num_channels = num_channels
    self.epsilon = epsilon
    self.channel_axis = channel_axis
    self.param_dtype = param_dtype
    modules.check_options(n_groups=n_groups, gamma=gamma, beta=beta,
                          epsilon=epsilon, channel_axis=channel_axis,
                          param_dtype=param_dtype)
    if isinstance(num_channels, (bool, np.bool_)) or not isinstance(
        num_channels, (numbers.Integral, np.integer)):
      raise TypeError(
          f"num_channels must be a positive int, got {num_channels!r} "
          f"(type {type(num_channels).__name__}).")
    if num_channels <= 0:
      raise ValueError(f"num_channels must be a positive int, got {num_channels}.")
    num_channels = self.num_channels = int(num_channels)
    validation.check_groups_divide(n_groups, num_channels, f"(..., {num_channels})")
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
    return {"channel_axis": self.channel_axis}

  def get_output_shape(self, input_shape: Sequence[int | None] | None):
    """Returns the output shape (the input's), as the seed; see ``gnorm.GroupNorm``.

    Examples:
      >>> import gnorm
      >>> gnorm.nnx.GroupNorm(4, 16).get_output_shape((None, 28, 28, 16))
      (None, 28, 28, 16)
    """
    shape = modules.output_shape(input_shape, self.n_groups, self.channel_axis,
                                 self._describe())
    if shape is not None:
      channels = shape[validation.check_channel_axis(self.channel_axis, shape)]
      if channels is not None and channels != self.num_channels:
        raise ValueError(
            f"{self._describe()} was built for {self.num_channels} channels, "
            f"but the input of shape {shape} has {channels} on channel_axis "
            f"{self.channel_axis}.")
    return shape

  def _describe(self) -> str:
    return (f"gnorm.nnx.GroupNorm(n_groups={self.n_groups}, "
            f"num_channels={self.num_channels})")

  def __call__(self, x: ArrayLike) -> jax.Array:
    """Normalises ``x``: ``gnorm.group_norm`` with this module's parameters."""
    if not isinstance(x, jax.Array):
      x = jnp.asarray(x)
    self.get_output_shape(x.shape)
    params = {}
    if self.gamma is not None:
      params["gamma"] = self.gamma[...]
    if self.beta is not None:
      params["beta"] = self.beta[...]
    return functional.group_norm(
        params, x, self.n_groups, self.epsilon, **self._function_kwargs())

