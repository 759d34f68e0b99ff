"""What flax's ``reduction_axes`` cost in gnorm's linen drop-in when a kept axis does not lead.

Usage::

  python benchmarks/reduction_axes_cost.py [--shape T,N,H,W,C] [--rounds N] [--sample-ms MS]

gnorm's batch axis is its first, so ``gnorm.compat.linen.GroupNorm`` moves the axes that
``reduction_axes`` leave out (the kept axes) to the front, folds them into that axis,
normalises and moves them back: a transpose of ``x`` and of the output (and of their
cotangents in the backward pass) when a kept axis is not already leading, none when the
kept axes lead. The same statistics, two layouts of the same data:

* ``leading``: ``x`` of shape ``(T, N, H, W, C)``, ``reduction_axes=(1, 2, 3, 4)``
  (axis 0 kept: a free reshape);
* ``interleaved``: the same values as ``(N, T, H, W, C)``, ``reduction_axes=(0, 2, 3, 4)``
  (axis 1 kept, between reduced axes: transposed to the front and back);

and flax's own ``flax.linen.GroupNorm`` on each, which reduces in place. Prints the median
time of the jitted forward and of the jitted forward + backward (``value_and_grad`` w.r.t.
``x`` and the parameters), medians over interleaved rounds, on this machine's default
backend.
"""

from __future__ import annotations

import argparse
import platform
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
from gnorm_bench.timing import time_interleaved

from gnorm.compat import linen as compat


def _prepare(module, x, variables, ct):
  fwd = jax.jit(module.apply)
  loss = jax.jit(jax.value_and_grad(lambda v, x: jnp.vdot(module.apply(v, x), ct),
                                    argnums=(0, 1)))
  return types.SimpleNamespace(fwd=lambda: jax.block_until_ready(fwd(variables, x)),
                               fwdbwd=lambda: jax.block_until_ready(loss(variables, x)))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="8,16,32,32,64", help="T,N,H,W,C (default %(default)s)")
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--sample-ms", type=float, default=200.0)
  args = ap.parse_args()
  t, n, h, w, c = (int(d) for d in args.shape.split(","))
  x_lead = jax.random.normal(jax.random.key(0), (t, n, h, w, c))
  x_inter = jnp.swapaxes(x_lead, 0, 1)  # the same values, kept axis second
  cases = {"leading": (x_lead, (1, 2, 3, 4)), "interleaved": (x_inter, (0, 2, 3, 4))}
  prepared = {}
  for name, (x, axes) in cases.items():
    variables = nn.GroupNorm(num_groups=32, reduction_axes=axes).init(jax.random.key(1), x)
    ct = jax.random.normal(jax.random.key(2), x.shape)
    for label, cls in (("gnorm drop-in", compat.GroupNorm), ("flax", nn.GroupNorm)):
      prepared[f"{label}, {name}"] = _prepare(cls(num_groups=32, reduction_axes=axes), x,
                                              variables, ct)
  times = time_interleaved(prepared, args.rounds, args.sample_ms / 1000)
  print(f"x {x_lead.shape} float32 ({x_lead.size * 4 / 2**20:.0f} MiB), GroupNorm(32); "
        f"jax {jax.__version__}, {jax.default_backend()} ({platform.processor() or 'cpu'}, "
        f"{jax.local_device_count()} device); medians of {args.rounds} interleaved rounds")
  print("| variant | forward | forward + backward |")
  print("|---|--:|--:|")
  for name in prepared:
    f, b = times[f"{name}/fwd"]["median_s"], times[f"{name}/fwdbwd"]["median_s"]
    print(f"| {name} | {f * 1e3:.2f} ms | {b * 1e3:.2f} ms |")
  for d in ("fwd", "fwdbwd"):
    lead = times[f"gnorm drop-in, leading/{d}"]["median_s"]
    inter = times[f"gnorm drop-in, interleaved/{d}"]["median_s"]
    print(f"drop-in interleaved / leading, {d}: {inter / lead:.2f}x")


if __name__ == "__main__":
  main()
