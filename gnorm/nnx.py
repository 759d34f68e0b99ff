"""gnorm's ``flax.nnx`` module: ``gnorm.nnx.GroupNorm``."""

from gnorm._src.nnx_module import GroupNorm as GroupNorm

__all__ = (
    "GroupNorm",
)
