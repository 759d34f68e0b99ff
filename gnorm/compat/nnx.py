"""``gnorm.compat.nnx``: a drop-in for ``flax.nnx.GroupNorm``.

Change ``flax.nnx.GroupNorm`` to ``gnorm.compat.nnx.GroupNorm``: the
constructor, the call, the attributes and the state are flax's, the maths is
gnorm's.
"""

from gnorm._src.compat.nnx import GroupNorm as GroupNorm

__all__ = ("GroupNorm",)
