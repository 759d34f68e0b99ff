"""Parameter initializers and the rules for turning ``gamma``/``beta`` into one.

neupy's GroupNorm (``neupy.layers.GroupNorm``) takes ``gamma`` and ``beta`` as a
scalar, an array-like, a variable or an initializer. This module holds the
neupy's three small initializer classes (``Constant``, ``Normal``, ``Uniform``)
and ``resolve``, which turns any accepted form into a JAX-style initializer
``(key, shape, dtype) -> array`` of shape ``(C,)``, so that the linen and nnx
modules create their parameters the same way.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

Initializer = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Constant:
  """Fills the parameter with one value, as ``neupy.init.Constant``.

  A gnorm initializer follows ``jax.nn.initializers``: it is called as
  ``init(key, shape, dtype)``; ``Constant`` ignores the key.

  Args:
    value: the value of every element (default ``0``, neupy's default).

  Examples:
    >>> import jax
    >>> from gnorm import init
    >>> init.Constant(0.5)(jax.random.key(0), (3,))
    Array([0.5, 0.5, 0.5], dtype=float32)
  """

  value: float = 0.0

  needs_key = False

  def __call__(self, key: Any, shape, dtype: DTypeLike = jnp.float32) -> jax.Array:
    del key  # deterministic
    return jnp.full(shape, self.value, dtype)


@dataclasses.dataclass(frozen=True)
class Normal:
  """Samples from a normal distribution, as ``neupy.init.Normal``.

  Args:
    mean: the mean (default ``0``).
    std: the standard deviation (default ``0.01``, neupy's default).

  Examples:
    >>> import jax
    >>> from gnorm import init
    >>> w = init.Normal(mean=1.0, std=0.02)(jax.random.key(0), (1000,))
    >>> bool(abs(w.mean() - 1.0) < 0.01), bool(abs(w.std() - 0.02) < 0.005)
    (True, True)
  """

  mean: float = 0.0
  std: float = 0.01

  needs_key = True

  def __call__(self, key: jax.Array, shape,
               dtype: DTypeLike = jnp.float32) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Samples uniformly from ``[minval, maxval)``, as ``neupy.init.Uniform``.

  Args:
    minval: the lower bound (default ``0``).
    maxval: the upper bound (default ``1``, neupy's default).

  Examples:
    >>> import jax
    >>> from gnorm import init
    >>> w = init.Uniform(-1.0, 1.0)(jax.random.key(0), (1000,))
    >>> bool(w.min() >= -1.0), bool(w.max() < 1.0)
    (True, True)
  """

  minval: float = 0.0
  maxval: float = 1.0

  needs_key = True

  def __call__(self, key: jax.Array, shape,
               dtype: DTypeLike = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, self.minval, self.maxval)


def _is_scalar(value: Any) -> bool:
  return isinstance(value, (numbers.Real, np.number)) or (
      isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0)


def check_value(name: str, value: Any) -> None:
  """Checks the form of ``gamma``/``beta`` when a module is built.

  The size can only be checked once the number of channels is known (see
  ``resolve``); here only the type and the layout are checked.

  Raises:
    TypeError: ``value`` is none of the accepted forms.
    ValueError: an array-like with more than one axis of size other than 1.
  """
  if value is None or callable(value):
    return
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(
        f"{name} must be a number, an array-like of shape (C,), an initializer "
        f"or None, got {value!r} (type {type(value).__name__}).")
  if _is_scalar(value):
    return
  try:
    if isinstance(value, jax.Array):
      shape, dtype = value.shape, value.dtype
    else:
      arr = np.asarray(value)
      shape, dtype = arr.shape, arr.dtype
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"{name} must be a number, an array-like of shape (C,), an initializer "
        f"or None, got {type(value).__name__}: {e}") from None
  if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
    raise TypeError(
        f"{name} must hold real numbers, got dtype {dtype} "
        f"(type {type(value).__name__}).")
  if sum(d != 1 for d in shape) > 1:
    raise ValueError(
        f"{name} has shape {shape}; an array-like {name} must have shape (C,) "
        "or a shape whose axes are all 1 but the channel axis, such as "
        "neupy's (1, 1, 1, C).")


def needs_key(value: Any) -> bool:
  """Whether creating a parameter from ``value`` may need a random key."""
  if value is None or not callable(value):
    return False
  return getattr(value, "needs_key", True)


def resolve(name: str, value: Any) -> Initializer | None:
  """Turns ``gamma``/``beta`` into a ``(key, shape, dtype)`` initializer.

  The returned initializer is called with ``shape == (C,)``; it checks that
  an array-like (or what a user initializer returns) has ``C`` elements and
  returns it with shape ``(C,)``. ``None`` stays ``None`` (no parameter).
  """
  check_value(name, value)
  if value is None:
    return None

  def init(key, shape, dtype=jnp.float32):
    (c,) = shape
    if callable(value):
      arr = value(key, shape, dtype)
      what = f"the initializer {value!r} returned shape"
    elif _is_scalar(value):
      return jnp.full(shape, value, dtype)
    else:
      arr = value
      what = "the given array has shape"
    arr_shape = np.shape(arr)
    size = int(np.prod(arr_shape))
    if size != c or sum(d != 1 for d in arr_shape) > 1:
      raise ValueError(
          f"{name} has {size} value(s) ({what} {arr_shape}), but the input has "
          f"{c} channels: {name} must have shape ({c},) or, as in neupy, "
          f"{(1,) * 3 + (c,)}.")
    return jnp.asarray(arr, dtype).reshape(shape)

  return init
