"""``gnorm.compat.equinox``: a drop-in for ``equinox.nn.GroupNorm``.

Change ``eqx.nn.GroupNorm`` to ``gnorm.compat.equinox.GroupNorm``: the
constructor, the call, the fields and the leaves are equinox's (saved
leaves load either way), the maths is gnorm's. Importing this module imports
equinox; ``import gnorm`` does not.

Examples:
  >>> import jax
  >>> from gnorm.compat import equinox as gn_eqx
  >>> gn_eqx.GroupNorm(2, 4)(jax.numpy.ones((4, 3))).shape
  (4, 3)
"""

from gnorm._src.compat.equinox import GroupNorm as GroupNorm

__all__ = ("GroupNorm",)
