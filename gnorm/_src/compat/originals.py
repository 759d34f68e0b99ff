"""The originals' error messages, which the drop-ins raise first.

Code written for flax, equinox or haiku may catch their errors by message;
a drop-in raises the same exception type with a message that starts as the
original's, and adds gnorm's detail after it. Some originals fail without a
message of their own, inside a reshape or a modulo: those messages are
JAX's, Python's or NumPy's, built here the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FLAX_EITHER = ("Either `num_groups` or `group_size` should be specified. If `group_size` is to "
               "be specified, pass `num_groups=None` as argument to override the default "
               "`num_groups` value of 32.")
FLAX_REDUCTION_AXES = ("The reduction axes must include the final dimension as this is "
                       "assumed to be the feature axis.")
EQUINOX_GROUPS = "The number of groups must divide the number of channels."
EQUINOX_CHANNELS = "The number of channels should be specified if `channelwise_affine=True`"
HAIKU_AXIS = "`axis` should be an int, slice or iterable of ints."
MODULO_BY_ZERO = "integer modulo by zero"
INDEX = "tuple index out of range"


def flax_groups(num_groups, channels: int) -> str:
  return f"Number of groups ({num_groups}) does not divide the number of channels ({channels})."


def flax_group_size(channels: int, group_size, features: str = "channels") -> str:
  return f"Number of {features} ({channels}) is not multiple of the group size ({group_size})."


def flax_dtype(dtype) -> str:
  return f"Dtype must be inexact: {dtype}"


def haiku_groups(channels: int, groups) -> str:
  return ("The number of channels must be divisible by the number of groups, was "
          f"channels={channels}, groups={groups}")


def haiku_rank(first: int, now: int) -> str:
  return ("The rank of the inputs cannot change between calls, the original call was "
          f"rank={first} but this call was rank={now}.")


def reshape(shape: Sequence[int], new_shape: Sequence) -> str:
  """``jnp.reshape``'s error for a shape of another size."""
  return (f"cannot reshape array of shape {tuple(shape)} (size {math.prod(shape)}) into "
          f"shape {tuple(new_shape)} (size {math.prod(new_shape)})")


def integer_shape(shape: Sequence) -> str:
  """``jnp.reshape``'s error for a shape with a float in it."""
  return f"Shapes must be 1D sequences of concrete values of integer type, got {tuple(shape)}."


def broadcast(dtype, shape: Sequence[int], to: Sequence[int]) -> str:
  """``jnp.broadcast_to``'s error for shapes that do not broadcast."""
  name = np.dtype(dtype).name

  def typed(s):
    return f"{name}[{','.join(map(str, s))}]"

  return f"Incompatible types for broadcasting: input type={typed(shape)} and requested type={typed(to)}"


def comparison(a, b) -> str:
  """Python's error for ``a < b`` between types that do not compare."""
  return f"'<' not supported between instances of '{type(a).__name__}' and '{type(b).__name__}'"
