"""XLA:CPU's scheduling hooks, which the maths calls where XLA:CPU needs steering.

Each is an optimization barrier in programs lowered for the CPU and the
identity on every other platform (``barrier.py``), so one traced program
serves every backend. A barrier copies nothing and changes no value; what it
changes is what XLA:CPU may merge or rewrite. They were measured on XLA:CPU
only, and ``tests/test_memory.py`` fails if a JAX release makes them
pointless (docs/performance.md gives the bytes they save).
"""

from __future__ import annotations

from jax import lax

from gnorm._src.backends.barrier import platform_barrier

cpu_barrier_p, _barrier = platform_barrier("gnorm_cpu_barrier", ("cpu",))


def pass_inputs(*arrays):
  """Gives one full-size pass its own handle on its operands (no copy).

  XLA:CPU runs each reduction as a library kernel that can fuse the
  elementwise prologue of its own input (a convert, ``x - mean``) but not
  share it: when common-subexpression elimination merges one prologue that
  feeds several passes, XLA writes it out as a full-size float32 temporary.
  A barrier over a tuple that differs for each pass keeps them apart.
  """
  return _barrier(arrays)


def barrier(t):
  """Keeps XLA:CPU from rewriting across a small partial result.

  On the ``(N, C)`` sums it keeps the small group combine from being turned
  into further full-size passes; at the cotangent's entry it makes a
  half-precision cotangent be converted to float32 once, not once per pass.
  """
  return _barrier(t)


def rsqrt(t):
  """``lax.rsqrt`` of a small ``(N, G)`` array, on a flat copy: XLA:CPU takes
  far longer to compile an ``rsqrt`` fused over some 2-D shapes, such as
  (8, 32), than over the same elements in one dimension."""
  flat = _barrier(t.reshape(-1))
  return _barrier(lax.rsqrt(flat)).reshape(t.shape)
