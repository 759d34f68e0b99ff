"""The loop form of a JAX timing: many chained calls inside one jitted program.

A jitted call timed on its own measures the host's launch latency as much as the device:
on an H200 a small GroupNorm's kernels take tens of microseconds, its dispatch about as
long. Here ``1 + n * u`` calls run inside one program: one call before a ``lax.fori_loop``
of ``n`` iterations (a static trip count: XLA then runs the loop without reading a
predicate back to the host each iteration), each iteration ``u`` calls (unrolled by hand,
to amortise the loop's own cost per iteration). Each call's output is the next call's input
(forward: ``x <- y``; forward+backward: ``x <- y``, ``ct <- dx``, and the parameters'
gradients summed into the carry), so XLA can neither hoist a call out of the loop nor drop
one. Between calls an ``optimization_barrier`` keeps XLA from fusing one call's last
kernel with the next call's first, which two real layers (a convolution between them)
never allow: each call compiles as it would alone.

The first call's outputs are returned for the accuracy check; the loop's final carry too
(the test that the chain is real compares it with the same calls made one by one).

Where XLA keeps the old carry alive while it writes the new one (on the CPU it copies one
x-sized array per iteration of a forward+backward loop), the copy is a cost of the loop
form, not of a call: ``body_copies`` counts such copies in the compiled program, and the
reports list them beside the times.

The loop's own cost is measured by ``overhead_loop``: the same trip count and carry, with a
body that sets one element of each carried array in place (one tiny kernel per
iteration; the real loop has none, so this slightly overstates the loop's cost). Both
start from a copy: the overhead loop of its input (an argument, which the loop may not
overwrite), the real loop of the first call's outputs (returned as well; see
``device_impls``), so that subtracting one from the other also takes the copy out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def calls(n: int, u: int) -> int:
  """Calls per run of a loop of ``n`` iterations of ``u`` calls: one more is made before it."""
  return 1 + n * u


def fwd_loop(f: Callable, n: int, u: int) -> Callable:
  """``run(x, *args) -> (y0, x_final)``: ``calls(n, u)`` chained calls of ``f(x, *args)``.

  ``y0`` is the first call's output (in ``f``'s dtype); each later call gets the previous
  output cast to ``x``'s dtype (flax's bfloat16 input gives float32 output: the cast then
  fuses into its last kernel, which writes bfloat16, as flax with ``dtype=bfloat16`` would).
  """

  def run(x, *args):
    y0 = f(x, *args)

    def body(_, x):
      for _ in range(u):
        x = lax.optimization_barrier(f(x, *args).astype(x.dtype))
      return x

    return y0, lax.fori_loop(0, n, body, y0.astype(x.dtype))

  return run


def fwdbwd_of(f: Callable) -> Callable:
  """``fb(x, ct, g, b) -> (y, dx, dg, db)``: ``f``'s output and its vjp for cotangent ``ct``."""

  def fb(x, ct, g, b):
    y, vjp = jax.vjp(f, x, g, b)
    return (y, *vjp(ct.astype(y.dtype)))

  return fb


def fwdbwd_loop(f: Callable, n: int, u: int) -> Callable:
  """``run(x, ct, g, b) -> ((y0, dx0, dg0, db0), (x, ct, sum_dg, sum_db))``.

  ``calls(n, u)`` chained forward+backward calls: the next input is this output, the next
  cotangent this ``dx`` (both cast to their carried dtypes), and the gradients of ``g`` and
  ``b`` are summed into the carry (float32) so that none of them is dead code.
  """
  fb = fwdbwd_of(f)

  def run(x, ct, g, b):
    first = fb(x, ct, g, b)
    y0, dx0, dg0, db0 = first

    def body(_, carry):
      for _ in range(u):
        x, ct, sg, sb = carry
        y, dx, dg, db = fb(x, ct, g, b)
        carry = lax.optimization_barrier((
          y.astype(x.dtype),
          dx.astype(ct.dtype),
          sg + dg.astype(jnp.float32),
          sb + db.astype(jnp.float32),
        ))
      return carry

    init = (y0.astype(x.dtype), dx0.astype(ct.dtype), dg0.astype(jnp.float32),
            db0.astype(jnp.float32))
    return first, lax.fori_loop(0, n, body, init)

  return run


def overhead_carry(direction: str, x, ct, g) -> tuple:
  """The carry of ``direction``'s loop: x, or x, ct and the parameters' gradient sums."""
  return x if direction == "fwd" else (x, ct, g, g)


def overhead_loop(n: int) -> Callable:
  """``run(carry, one)``: the loop of ``n`` iterations with a trivial body on ``carry``.

  Each iteration sets one element of every carried array to ``one``, an argument, so that
  XLA can neither fold the body nor drop the loop. Set, not multiplied: an update that
  reads the carry may be given a copy of the whole array.
  """

  def run(carry, one):
    def body(_, c):
      return jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(one.astype(a.dtype)), c)

    return lax.fori_loop(0, n, body, carry)

  return run


def body_copies(hlo_text: str, min_elements: int) -> int:
  """Copies of arrays of at least ``min_elements`` in the while loops' bodies of a compiled
  program's HLO text: a cost of the loop form (reported beside the times), not of a call."""
  bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo_text))
  count, current = 0, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      head = line.split()[0]
      current = head[1:] if head.startswith("%") else head
      continue
    if current not in bodies:
      continue
    m = re.search(r"= \w+\[([\d,]*)\]\S* copy\(", line)
    if m and math.prod(int(d) for d in m.group(1).split(",") if d) >= min_elements:
      count += 1
  return count


def named(fn: Callable, name: str) -> Callable:
  """``fn`` renamed: its jitted program is the module ``jit_<name>``, which is how a
  profiler trace's kernel events are attributed to it."""
  fn.__name__ = fn.__qualname__ = name
  return fn
