"""``gnorm.compat.haiku``: a drop-in for ``haiku.GroupNorm``.

Change ``hk.GroupNorm`` to ``gnorm.compat.haiku.GroupNorm``: the
constructor, the call, the module name and the parameters are haiku's (the
``params`` of either apply to the other), the maths is gnorm's. Importing
this module imports haiku; ``import gnorm`` does not.

Examples:
  >>> import haiku as hk, jax.numpy as jnp
  >>> from gnorm.compat import haiku as gn_hk
  >>> f = hk.transform(lambda x: gn_hk.GroupNorm(2)(x))
  >>> list(f.init(None, jnp.ones((1, 3, 4))))
  ['group_norm']
"""

from gnorm._src.compat.haiku import GroupNorm as GroupNorm

__all__ = ("GroupNorm",)
