"""``gnorm.GroupNorm``: neupy's GroupNorm as a thin ``flax.linen`` module.

The module validates its own arguments, creates ``gamma`` and ``beta`` and
calls ``gnorm.group_norm``; all the maths is in the function.
"""

# No ``from __future__ import annotations``: Flax checks the annotation of the
# ``name`` field against the real ``Optional[str]``, not a string.

import dataclasses
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from gnorm._src import functional
from gnorm._src import initializers
from gnorm._src import neupy_constructor
from gnorm._src import module_options
from gnorm._src import naming
from gnorm._src import validation

Shape = module_options.Shape

def _describe(module: nn.Module) -> str:
  """A one-line description of a layer for error messages."""
  groups = (f"group_size={module.group_size!r}" if module.group_size is not None
            else f"n_groups={module.n_groups!r}")
  return f"gnorm.GroupNorm({groups}, name={module.name!r})"


class GroupNorm(nn.Module):
  """Group Normalization layer (Wu & He, 2018), neupy's ``GroupNorm`` in Flax.

  The channels of each sample are split into ``n_groups`` groups, each
  normalised by its own mean and variance, then scaled by ``gamma`` and
  shifted by ``beta`` per channel. It is a thin wrapper over
  ``gnorm.group_norm``: a good alternative to batch normalisation when the
  batch is small.

  neupy's API maps onto Flax as follows:

  ===================================================  ======================================
  ``neupy.layers.GroupNorm``                           ``gnorm.GroupNorm``
  ===================================================  ======================================
  ``GroupNorm(n_groups, gamma, beta, epsilon, name)``  the same fields, same defaults, same
                                                       positions; options are keyword-only
  ``variables``                                        Flax's ``variables`` (of a bound
                                                       module) or ``model.init(...)``
  ``create_variables(input_shape)``                    ``create_variables(input_shape, key)``
  ``get_output_shape(input_shape)``                    ``get_output_shape(input_shape)``
  ``output(input)``                                    ``__call__(x)``
  ===================================================  ======================================

  Attributes:
    n_groups: the number of groups; must divide the number of channels.
      ``None`` when ``group_size`` is given (exactly one of the two).
    gamma: the initial scale: a scalar, an array-like of shape ``(C,)`` or
      neupy's ``(1, 1, 1, C)``, a ``jax.Array``, an initializer, either a
      ``jax.nn.initializers``-style ``(key, shape, dtype)`` callable or one
      of ``gnorm.init.Constant``, ``Normal``, ``Uniform``; or ``None`` for
      no scale. Defaults to ``1.0`` (neupy's ``Constant(value=1)``).
    beta: the initial offset, in the same forms; defaults to ``0.0``.
    epsilon: added to the variance inside the square root; defaults to
      ``1e-5`` as in neupy and PyTorch (``flax.linen.GroupNorm`` uses
      ``1e-6``; see ``gnorm.DEFAULT_EPSILON`` when porting weights).
    name: the layer's name, as in neupy: a literal string (``"gn"``) is
      used as is; a format pattern with one replacement field is filled with
      a counter starting at 1 in creation order within the parent module
      (``"gn{}"`` gives ``gn1``, ``gn2``; ``"fc-{:>03d}"`` gives ``fc-001``),
      or from a process-wide counter per pattern for a module built outside
      any parent; ``None`` keeps Flax's automatic ``GroupNorm_0``. Python's
      formatting rules apply, so neupy's example ``"fc-{:<03d}"``
      (left-aligned fill) gives ``fc-100``, not ``fc-001``.
    channel_axis: the input axis holding the channels (keyword-only;
      default ``-1``, channels-last; ``1`` for NCHW).
    param_dtype: the dtype of ``gamma`` and ``beta`` (keyword-only; default
      float32).
    group_size: channels per group, instead of ``n_groups`` (keyword-only).
    activation: fused after the affine transform (keyword-only): ``"relu"``,
      ``"silu"``/``"swish"``, ``"gelu"`` (exact), ``"gelu_tanh"``, a
      callable, or ``None`` (default).
    axis_name: a mesh axis name or tuple of names (keyword-only): inside
      ``shard_map`` or ``pmap``, the statistics cover the shards along it.
    axis_index_groups: with ``axis_name`` (keyword-only): groups of its
      indices, such as ``((0, 1), (2, 3))``; the statistics are combined
      within each group (see ``gnorm.group_norm``).
    implementation: ``"auto"`` (default), ``"xla"`` or ``"pallas"``
      (keyword-only); see ``gnorm.group_norm``.

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
    TypeError: ``n_groups``, ``group_size``, ``channel_axis``, ``epsilon``,
      ``param_dtype``, ``gamma``, ``beta``, ``activation``, ``axis_name`` or
      ``name`` of the wrong type.
    ValueError: neither or both of ``n_groups`` and ``group_size``, either
      not positive, ``epsilon`` negative, an unknown activation name, a name
      pattern with more than one replacement field; at init, an input of
      rank < 2, ``n_groups`` or ``group_size`` not dividing the channels, or
      ``gamma``/``beta`` of the wrong size (the message names both sizes); at
      a call, ``mask``, ``scale`` or ``shift`` of the wrong shape.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm
    >>> layer = gnorm.GroupNorm(4)
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'beta': (16,), 'gamma': (16,)}
    >>> y = layer.apply(variables, x)
    >>> bool(jnp.allclose(y, gnorm.group_norm(variables["params"], x, 4)))
    True

    Groups of 4 channels, fused SiLU and AdaGN conditioning from an
    embedding, as in a diffusion UNet:

    >>> layer = gnorm.GroupNorm(group_size=4, activation="silu")
    >>> variables = layer.init(jax.random.key(1), x)  # gamma = 1, beta = 0
    >>> emb = jax.random.normal(jax.random.key(2), (2, 32))
    >>> scale, shift = jnp.split(emb, 2, axis=-1)  # each (N, C) = (2, 16)
    >>> y = layer.apply(variables, x, scale=scale, shift=shift)
    >>> xhat = gnorm.group_norm(None, x, group_size=4)
    >>> ref = jax.nn.silu(xhat * (1 + scale[:, None, None]) + shift[:, None, None])
    >>> bool(jnp.allclose(y, ref, atol=1e-5))
    True

    neupy's example CNN, with pattern names:

    >>> import flax.linen as nn
    >>> class CNN(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for _ in range(2):
    ...       x = nn.Conv(16, (3, 3), padding="VALID")(x)
    ...       x = nn.relu(gnorm.GroupNorm(4, name="gn{}")(x))
    ...     return nn.Dense(10)(x.reshape(x.shape[0], -1))
    >>> x = jnp.ones((1, 28, 28, 1))
    >>> # Shapes only, nothing is computed:
    >>> params = jax.eval_shape(CNN().init, jax.random.key(0), x)["params"]
    >>> sorted(params)
    ['Conv_0', 'Conv_1', 'Dense_0', 'gn1', 'gn2']
    >>> sum(p.size for p in jax.tree.leaves(params))
    94714

    neupy's methods:

    >>> layer.get_output_shape((None, 28, 28, 16))
    (None, 28, 28, 16)
    >>> layer.create_variables((None, 28, 28, 16))["gamma"].shape
    (16,)

  References:
    Yuxin Wu and Kaiming He, "Group Normalization", ECCV 2018,
    arXiv:1803.08494.
  """

  n_groups: int | None = None
  gamma: Any = 1.0
  beta: Any = 0.0
  epsilon: float = 1e-5
  # Keyword options; each one that ``group_norm`` takes is passed through in
  # ``_function_kwargs``.
  channel_axis: int = dataclasses.field(default=-1, kw_only=True)
  param_dtype: DTypeLike = dataclasses.field(default=jnp.float32, kw_only=True)
  group_size: int | None = dataclasses.field(default=None, kw_only=True)
  activation: str | Callable[[jax.Array], jax.Array] | None = dataclasses.field(
      default=None, kw_only=True)
  axis_name: Hashable | tuple[Hashable, ...] | None = dataclasses.field(
      default=None, kw_only=True)
  axis_index_groups: Sequence[Sequence[int]] | None = dataclasses.field(
      default=None, kw_only=True)
  implementation: str = dataclasses.field(default="auto", kw_only=True)

  def __post_init__(self) -> None:
    if naming.is_pattern(self.name):
      neupy_constructor.fill_name_pattern(self, self.name)
    module_options.check_options(n_groups=self.n_groups, gamma=self.gamma, beta=self.beta,
                  epsilon=self.epsilon, channel_axis=self.channel_axis,
                  param_dtype=self.param_dtype, group_size=self.group_size,
                  activation=self.activation, axis_name=self.axis_name,
                  axis_index_groups=self.axis_index_groups,
                  implementation=self.implementation)
    super().__post_init__()

  def _function_kwargs(self) -> dict[str, Any]:
    """The keyword options passed through to ``gnorm.group_norm``."""
    return {"channel_axis": self.channel_axis, "group_size": self.group_size,
            "activation": self.activation, "axis_name": self.axis_name,
            "axis_index_groups": self.axis_index_groups,
            "implementation": self.implementation}

  # The one compact method: ``__call__`` and ``create_variables`` both create
  # the parameters here, so they draw the same keys in the same order.
  @nn.compact
  def _make_params(self, channels: int) -> dict[str, jax.Array]:
    params = {}
    for name in ("gamma", "beta"):
      init = initializers.resolve(name, getattr(self, name))
      if init is not None:
        params[name] = self.param(name, init, (channels,), self.param_dtype)
    return params

  def get_output_shape(
      self, input_shape: Shape | None) -> tuple[int | None, ...] | None:
    """Returns the output shape for ``input_shape`` (the same), as neupy's.

    Args:
      input_shape: the input's shape, batch first; ``None`` for an unknown
        dimension, or ``None`` for an unknown rank.

    Returns:
      ``input_shape`` as a tuple (``None`` if it is ``None``).

    Raises:
      ValueError: neupy's two errors: a rank < 2 (or a channel axis out
        of range), and a known number of channels that ``n_groups`` does not
        divide.

    Examples:
      >>> import gnorm
      >>> gnorm.GroupNorm(4).get_output_shape((None, 28, 28, 16))
      (None, 28, 28, 16)
      >>> gnorm.GroupNorm(3).get_output_shape((None, 28, 28, 16))
      Traceback (most recent call last):
      ...
      ValueError: Cannot divide 16 input channels into 3 groups ...
    """
    return module_options.output_shape(input_shape, self.n_groups, self.channel_axis,
                        _describe(self), self.group_size)

  def create_variables(self, input_shape: Shape,
                       key: jax.Array | int | None = None) -> dict[str, jax.Array]:
    """Creates ``{"gamma": ..., "beta": ...}`` without running a network.

    For a top-level module this returns the same values as
    ``module.init(key, x)["params"]``.

    Args:
      input_shape: the input's shape; only the channel dimension must be
        known.
      key: a PRNG key (or an int seed), needed only when ``gamma`` or
        ``beta`` is a random initializer.

    Returns:
      A dict with ``gamma`` and ``beta`` of shape ``(C,)`` (a key is absent
      when its field is ``None``).

    Raises:
      ValueError: the errors of ``get_output_shape``, an unknown channel
        dimension, a value of the wrong size, or no ``key`` for a random
        initializer.

    Examples:
      >>> import jax, gnorm
      >>> layer = gnorm.GroupNorm(2, gamma=gnorm.init.Normal(1.0, 0.02))
      >>> v = layer.create_variables((None, 8), key=jax.random.key(0))
      >>> v["gamma"].shape, v["beta"].tolist()
      ((8,), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    """
    shape = self.get_output_shape(input_shape)
    if shape is None:
      raise ValueError(
          f"create_variables needs the input shape, got None; layer {_describe(self)}.")
    channels = shape[validation.check_channel_axis(self.channel_axis, shape)]
    if channels is None:
      raise ValueError(
          f"create_variables needs the number of channels, but input_shape "
          f"{shape} leaves it unknown (None) on channel_axis "
          f"{self.channel_axis}; layer {_describe(self)}.")
    if key is None:
      random = [n for n in ("gamma", "beta")
                if initializers.needs_key(getattr(self, n))]
      if random:
        raise ValueError(
            f"{' and '.join(random)} of layer {_describe(self)} "
            f"{'is' if len(random) == 1 else 'are'} set by an initializer that "
            "may be random; pass key=jax.random.key(...).")
      key = jax.random.key(0)  # unused: every value is deterministic
    elif isinstance(key, int):
      key = jax.random.key(key)
    unbound = self.clone(parent=None)
    variables = unbound.init({"params": key}, channels, method=GroupNorm._make_params)
    return dict(variables.get("params", {}))

  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None,
               scale: ArrayLike | None = None,
               shift: ArrayLike | None = None) -> jax.Array:
    """Normalises ``x`` (neupy's ``output``).

    Args:
      x: input of rank >= 2, batch first, channels on ``channel_axis``.
      mask: optional boolean array broadcastable to ``x``; positions where it
        is False are padding: left out of the statistics, output 0, and given
        no gradient (see ``gnorm.group_norm``).
      scale: optional AdaGN / FiLM scale, per sample: shape ``(N, C)``, or
        ``(C,)``, a scalar, or anything that broadcasts against ``x`` with
        ``C`` on the channel axis and ``N`` (or 1) on the batch axis, such as
        ``(N, 1, 1, C)``. The output is
        ``act((xhat * gamma + beta) * (1 + scale) + shift)``.
      shift: optional AdaGN / FiLM shift, in the same shapes.

    Returns:
      ``gnorm.group_norm(params, x, n_groups, epsilon, ...)``, of ``x``'s
      shape and dtype, with ``params`` the layer's ``gamma`` and ``beta``
      combined with ``scale`` and ``shift``.

    Raises:
      ValueError: the errors of ``get_output_shape`` and
        ``gnorm.group_norm``, or ``scale``/``shift`` of a shape that is not
        per-sample-and-channel (the message names it and the input shape).
    """
    if not isinstance(x, jax.Array):
      x = jnp.asarray(x)
    # The shape of an array is known, so the checked shape is neither None nor
    # has a None dimension (get_output_shape's type allows both).
    shape = cast(tuple[int, ...], self.get_output_shape(x.shape))
    axis = validation.check_channel_axis(self.channel_axis, shape)
    params = self._make_params(shape[axis])
    params = module_options.condition(params, shape, axis, scale, shift, _describe(self))
    return functional.group_norm(
        params, x, self.n_groups, self.epsilon, mask=mask,
        **self._function_kwargs())


neupy_constructor.positional_name_init(GroupNorm)
