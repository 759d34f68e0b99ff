"""XLA:CPU: scheduling hints that make the maths fast on a CPU.

Each hook below is an optimization barrier, which copies nothing and leaves
every value unchanged; what it changes is what XLA:CPU may merge or rewrite.
They were measured on XLA:CPU (jax 0.10.2, 2-core AMD EPYC) and take effect
only when a program is lowered for the CPU: the barrier is a primitive of
gnorm's (``cpu_barrier_p``) whose lowering is ``stablehlo.optimization_barrier``
on the CPU and the identity on every other platform.

What they buy, in XLA's own count of the bytes a compiled program moves
(``cost_analysis``, in units of ``x``'s bytes), with these hints / with the
plain maths of ``xla_default.py`` on the same CPU:

=============================  ==========  ==============================
input, G=32                    forward     forward+backward
=============================  ==========  ==============================
2x32x32x128 float32            4.0 / 6.0   10.0 / 15.0
2x64x64x320 bfloat16           4.0 / 12.0  15.0 / 32.0 (temp 10 / 30 MiB)
=============================  ==========  ==============================

``tests/test_memory.py`` checks both sides of this table: if a jax release
makes the hints pointless, ``test_cpu_hints_cut_memory_traffic`` fails, and
they can go.
"""

from __future__ import annotations

from jax import lax

from gnorm._src.backends.barrier import platform_barrier
from gnorm._src.backends.hints import Hints

# ``lax.optimization_barrier``, but only in programs lowered for the CPU (see
# ``barrier.py``): one traced program carries the CPU's hints and, for every
# other platform, the plain maths.
cpu_barrier_p, _barrier = platform_barrier("gnorm_cpu_barrier", ("cpu",))


def _separate(*arrays):
  """Gives one full-size consumer its own handle on its operands (no copy).

  XLA's CPU backend runs each reduction as a library kernel that can fuse
  the elementwise prologue of its own input (a dtype convert, ``x - mean``)
  but not share it: when common-subexpression elimination merges the same
  prologue feeding several passes, XLA writes it out as a full-size float32
  temporary instead. A barrier over a tuple that is distinct for each
  consumer keeps the prologues apart, so every pass re-reads ``x`` itself.
  """
  return _barrier(arrays)


def _fence(t):
  """Keeps XLA:CPU from rewriting across a small partial result.

  On the ``(N, C)`` sums it keeps the small group combine that follows from
  being rewritten into further full-size passes; at the cotangent's entry it
  makes a half-precision cotangent be converted to float32 once, not once per
  backward pass (bfloat16 forward+backward temp: 10 MiB, was 20 MiB, for
  2x64x64x320).
  """
  return _barrier(t)


def _rsqrt(t):
  """``lax.rsqrt`` of a small ``(N, G)`` array, on a flat copy.

  XLA:CPU (jax 0.10) takes 150-200 ms longer to compile an ``rsqrt`` fused
  over some 2-D shapes, such as (8, 32), than over the same elements in one
  dimension; barriers keep the flat shape from being folded back. Forward
  compile of 8x14x14x1024 (N*G = 8x32): 272-289 ms before, 132 ms after when
  it was introduced; 136 ms with ``lax.rsqrt`` against 86 ms with this, median
  of 5, on 2026-11-27.
  """
  flat = _barrier(t.reshape(-1))
  return _barrier(lax.rsqrt(flat)).reshape(t.shape)


HINTS = Hints(name="xla:cpu", separate=_separate, fence=_fence, rsqrt=_rsqrt)
