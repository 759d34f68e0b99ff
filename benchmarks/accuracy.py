"""Accuracy of gnorm.group_norm and flax.linen.GroupNorm against float64 NumPy.

Run ``python benchmarks/accuracy.py``; it prints a markdown table of the max
absolute error of each implementation on the same data (unit-scale gamma and
beta, eps 1e-5 for both) and writes it to ``benchmarks/results/accuracy.md``.
gnorm is measured with both of its reduction plans, whatever the backend:
``maths.py``'s (the CPU's, and TPU's) and ``backends/xla_gpu.py``'s (CUDA's and
ROCm's), each forced with ``dispatch.forced``.

gnorm returns the input's dtype, so its half-precision errors include one
rounding of the output (2^-8 relative for bfloat16); flax promotes to float32
by default, so its errors do not.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from gnorm_bench import common  # benchmarks/ is the script's directory

sys.path.insert(0, str(common.ROOT))

import gnorm  # noqa: E402
from gnorm._src import dispatch  # noqa: E402
from tests.reference import group_norm_ref  # noqa: E402

PLANS = {"xla": "gnorm, maths.py plan (CPU, TPU)", "xla_gpu": "gnorm, GPU plan (CUDA, ROCm)"}

CASES = [
    # name, shape, G, dtype, loc, scale
    ("N(0, 1), float32", (8, 32, 32, 64), 32, jnp.float32, 0.0, 1.0),
    ("N(100, 3^2), float32", (8, 32, 32, 64), 32, jnp.float32, 100.0, 3.0),
    ("randn*0.01 + 100 (pytorch#40302), float32", (8, 32, 32, 64), 32, jnp.float32,
     100.0, 0.01),
    ("N(300, 2^2), float16 (x^2 overflows)", (8, 32, 32, 64), 32, jnp.float16, 300.0, 2.0),
    ("N(0, 1), bfloat16", (8, 32, 32, 64), 32, jnp.bfloat16, 0.0, 1.0),
    ("N(100, 3^2), bfloat16", (8, 32, 32, 64), 32, jnp.bfloat16, 100.0, 3.0),
]


def measure(shape, g, dtype, loc, scale, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape) * scale + loc, dtype)
  c = shape[-1]
  gamma = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
  beta = rng.uniform(-1, 1, size=c).astype(np.float32)
  ref = group_norm_ref(np.asarray(x, np.float64), g, gamma, beta, 1e-5)

  def traced(plan):
    def f(x):
      with dispatch.forced(plan):
        return gnorm.group_norm({"gamma": gamma, "beta": beta}, x, g)
    return f

  ours = {plan: jax.jit(traced(plan))(x) for plan in PLANS}
  flax_gn = nn.GroupNorm(num_groups=g, epsilon=1e-5)
  theirs = jax.jit(lambda x: flax_gn.apply(
      {"params": {"scale": gamma, "bias": beta}}, x))(x)

  def err(y):
    y = np.asarray(y, np.float64)
    return float(np.nanmax(np.abs(y - ref))) if np.all(np.isfinite(y)) else float("inf")

  return [err(y) for y in ours.values()], err(theirs), ours["xla"].dtype, theirs.dtype


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"))
  args = parser.parse_args(argv)
  lines = [
      "| data (shape (8, 32, 32, 64), G=32) | " + " | ".join(PLANS.values()) +
      " | flax.linen.GroupNorm | output dtype (gnorm / flax) |",
      "|---|---|---|---|---|",
  ]
  for name, shape, g, dtype, loc, scale in CASES:
    ours, theirs, dt_ours, dt_theirs = measure(shape, g, dtype, loc, scale)
    cells = " | ".join(f"{e:.2e}" for e in ours)
    lines.append(f"| {name} | {cells} | {theirs:.2e} | {dt_ours} / {dt_theirs} |")
  table = "\n".join(lines)
  device = jax.devices()[0]
  where = device.platform + ("" if device.device_kind == device.platform
                             else f" ({device.device_kind})")
  header = (f"Max absolute error; measured {datetime.date.today().isoformat()} on"
            f" {where}, jax {jax.__version__},"
            f" gnorm {common.versions()['gnorm']} at commit {common.git_revision()}"
            " (`python benchmarks/accuracy.py`).")
  print(header + "\n")
  print(table)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "accuracy.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
  main()
