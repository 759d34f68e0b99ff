"""``gnorm.compat.linen``: a drop-in for ``flax.linen.GroupNorm``.

Change ``flax.linen.GroupNorm`` to ``gnorm.compat.linen.GroupNorm``: the
constructor, the call and the parameters are flax's, the maths is gnorm's.
"""

from gnorm._src.compat.linen import GroupNorm as GroupNorm

__all__ = ("GroupNorm",)
