"""Drop-in replacements for other libraries' GroupNorm layers.

Each class takes exactly its original's constructor and call, and creates
exactly the same parameters (names, shapes, dtypes, tree structure), so that
changing one import is the whole migration and existing checkpoints load
unchanged; only the maths is gnorm's (exact statistics, never
E[x^2] - E[x]^2, a backward that keeps only ``x`` and per-group statistics,
NaN-safe masks):

* ``gnorm.compat.linen.GroupNorm`` for ``flax.linen.GroupNorm``;
* ``gnorm.compat.nnx.GroupNorm`` for ``flax.nnx.GroupNorm``;
* ``gnorm.compat.equinox.GroupNorm`` for ``equinox.nn.GroupNorm``;
* ``gnorm.compat.haiku.GroupNorm`` for ``haiku.GroupNorm``.

Import the submodule you need: ``from gnorm.compat import linen``. Each one
imports its framework (equinox and dm-haiku are optional dependencies of
gnorm, so nothing here is imported by ``import gnorm``). Where a drop-in
does not reproduce an option of its original, its class docstring says so
and what it does instead.
"""
