"""Initializers for ``gamma`` and ``beta``, as neupy's ``neupy.init``.

Each is a ``jax.nn.initializers``-style callable ``init(key, shape, dtype)``,
so any JAX initializer works in their place too.
"""

from gnorm._src.initializers import Constant as Constant
from gnorm._src.initializers import Normal as Normal
from gnorm._src.initializers import Uniform as Uniform

__all__ = (
    "Constant",
    "Normal",
    "Uniform",
)
