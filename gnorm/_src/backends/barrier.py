"""Optimization barriers that exist only on some platforms.

``platform_barrier("gnorm_cpu_barrier", ("cpu",))`` is a primitive whose
lowering is ``stablehlo.optimization_barrier`` in programs lowered for those
platforms and the identity everywhere else. One traced program can therefore
carry one platform's scheduling hints without changing any other platform's
program, and without tracing the maths once per platform
(``lax.platform_dependent`` does, and doubled the time to trace and lower a
training step). The primitive's derivative rules are the barrier's own: the
tangents and the cotangents pass through the same primitive, so a backward
pass gets its barriers on those platforms too. Public JAX APIs only
(``jax.extend``, ``jax.interpreters``), which move less between releases than
``jax._src``; checked on jax 0.10.2.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

from jax import lax
from jax import tree_util
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir


def _identity_lowering(ctx, *args):
  del ctx
  return list(args)


_barrier_lowering = mlir.lower_fun(lambda *args: lax.optimization_barrier(args),
                                   multiple_results=True)


def platform_barrier(name: str, platforms: Sequence[str]) -> tuple[Primitive, Callable]:
  """A barrier primitive lowered as such on ``platforms`` only.

  Returns:
    ``(primitive, barrier)``: ``barrier(tree)`` passes a pytree of arrays
    through the primitive and returns it, values unchanged.
  """
  p = Primitive(name)
  p.multiple_results = True
  p.def_impl(lambda *args: args)  # eagerly, a barrier has nothing to order
  p.def_abstract_eval(lambda *avals: avals)

  def barrier(tree):
    flat, treedef = tree_util.tree_flatten(tree)
    return tree_util.tree_unflatten(treedef, p.bind(*flat))

  def jvp(primals, tangents):
    return barrier(list(primals)), barrier([ad.instantiate_zeros(t) for t in tangents])

  def transpose(cts, *primals):
    del primals
    return barrier([ad.instantiate_zeros(ct) for ct in cts])

  mlir.register_lowering(p, _identity_lowering)
  for platform in platforms:
    mlir.register_lowering(p, _barrier_lowering, platform=platform)
  batching.primitive_batchers[p] = lambda args, dims, **params: (p.bind(*args, **params), dims)
  ad.primitive_jvps[p] = jvp
  ad.primitive_transposes[p] = transpose
  return p, barrier
