"""What the linen and nnx modules share: neupy's shape checks, the option
checks made at construction, and AdaGN/FiLM conditioning folded into
``gamma``/``beta``. The modules themselves are ``modules.py`` (linen) and
``nnx_module.py``.
"""

import numbers
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gnorm._src import initializers
from gnorm._src import maths
from gnorm._src import validation

Shape = Sequence[int | None]


def output_shape(input_shape: Shape | None, n_groups: int | None,
                 channel_axis: int, layer: Any,
                 group_size: int | None = None) -> tuple[int | None, ...] | None:
  """neupy's ``get_output_shape`` checks, shared by the linen and nnx modules."""
  if input_shape is None:
    return None  # unknown rank: nothing to check
  try:
    shape = tuple(None if d is None else operator.index(d) for d in input_shape)
  except TypeError:
    raise TypeError(
        f"input_shape must be a sequence of ints (None for an unknown "
        f"dimension), got {input_shape!r}; layer {layer}.") from None
  if any(d is not None and d < 0 for d in shape):
    raise ValueError(f"input_shape {shape} has a negative dimension; layer {layer}.")
  if len(shape) < 2:
    raise ValueError(
        f"Group normalization expects an input of rank >= 2 (batch axis first, "
        f"channels on channel_axis={channel_axis}), got shape {shape} of rank "
        f"{len(shape)}; layer {layer}.")
  axis = validation.check_channel_axis(channel_axis, shape)
  channels = shape[axis]
  if channels is not None and group_size is not None:
    if channels % group_size:
      raise ValueError(
          f"Cannot divide {channels} input channels into groups of {group_size} "
          f"(group_size must divide the channels); input shape {shape}, layer "
          f"{layer}.")
  elif channels is not None:
    assert n_groups is not None  # check_grouping: exactly one of the two is given
    if channels % n_groups:
      raise ValueError(
          f"Cannot divide {channels} input channels into {n_groups} groups "
          f"(n_groups must divide the channels); input shape {shape}, layer "
          f"{layer}.")
  return shape


def check_grouping(n_groups: Any, group_size: Any) -> None:
  """Exactly one of ``n_groups`` and ``group_size``, a positive int."""
  if (n_groups is None) == (group_size is None):
    raise ValueError(
        f"give exactly one of n_groups and group_size, got n_groups={n_groups!r} "
        f"and group_size={group_size!r}.")
  if n_groups is not None:
    validation.check_n_groups(n_groups)
  else:
    validation.check_n_groups(group_size, what="group_size")


def check_options(*, n_groups: Any, gamma: Any, beta: Any, epsilon: Any,
                  channel_axis: Any, param_dtype: Any, group_size: Any = None,
                  activation: Any = None, axis_name: Any = None,
                  axis_index_groups: Any = None, implementation: Any = "auto") -> None:
  """Validates the arguments shared by the linen and nnx modules."""
  check_grouping(n_groups, group_size)
  validation.check_eps(epsilon)
  initializers.check_value("gamma", gamma)
  initializers.check_value("beta", beta)
  if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(
      channel_axis, (numbers.Integral, np.integer)):
    raise TypeError(
        f"channel_axis must be an int, got {channel_axis!r} "
        f"(type {type(channel_axis).__name__}).")
  try:
    dtype = jnp.dtype(param_dtype)
  except TypeError:
    raise TypeError(f"param_dtype must be a dtype, got {param_dtype!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"param_dtype must be a floating dtype, got {dtype}.")
  validation.check_activation(activation, maths.ACTIVATIONS)
  validation.check_axis_index_groups(
      axis_index_groups, validation.check_axis_name(axis_name))
  validation.check_implementation_name(implementation)


def _conditioning(name: str, value: Any, shape: tuple[int, ...], axis: int,
                  layer: str) -> jax.Array | None:
  """``scale`` or ``shift`` as a ``(1, C)`` or ``(N, C)`` array (or None)."""
  if value is None:
    return None
  try:
    return validation.check_affine(name, value, shape, axis)
  except (TypeError, ValueError) as e:
    raise type(e)(f"{e} (call of layer {layer})") from None


def condition(params: dict[str, Any], shape: tuple[int, ...], axis: int,
              scale: Any, shift: Any, layer: str) -> dict[str, Any]:
  """Folds AdaGN ``scale``/``shift`` into the layer's ``gamma``/``beta``.

  ``act((xhat * gamma + beta) * (1 + scale) + shift)`` is
  ``act(xhat * gamma' + beta')`` with ``gamma' = gamma * (1 + scale)`` and
  ``beta' = beta * (1 + scale) + shift``: per-sample ``(N, C)`` parameters
  that ``group_norm`` takes directly, so the activation stays fused. A missing
  ``gamma`` counts as 1 and a missing ``beta`` as 0.
  """
  if scale is None and shift is None:
    return params
  scale = _conditioning("scale", scale, shape, axis, layer)
  shift = _conditioning("shift", shift, shape, axis, layer)
  gamma = params.get("gamma")
  beta = params.get("beta")
  if gamma is not None:
    gamma = validation.check_affine("gamma", gamma, shape, axis)
  if beta is not None:
    beta = validation.check_affine("beta", beta, shape, axis)
  if scale is not None:
    factor = 1 + scale
    gamma = factor if gamma is None else gamma * factor
    beta = None if beta is None else beta * factor
  if shift is not None:
    beta = shift if beta is None else beta + shift
  out = {}
  for name, value in (("gamma", gamma), ("beta", beta)):
    if value is not None:
      # (1, C) -> (C,): a 2-D (1, C) value would be read against x's trailing
      # axes, which are not the channels for channels-first input.
      out[name] = value.reshape(-1) if value.shape[0] == 1 else value
  return out
