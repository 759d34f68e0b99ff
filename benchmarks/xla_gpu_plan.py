"""Kernels and modelled memory traffic of XLA's compiled GroupNorm programs.

  python benchmarks/xla_gpu_plan.py [--out DIR] [--deviceless h200] [--quick]

For the GPU case set in float32 and bfloat16, compiles the forward and the forward+backward
(``jax.vjp``: y, dx, dgamma, dbeta) of gnorm's default, ``gnorm_prev`` (the previous XLA
program, forced), gnorm's Pallas kernels, ``flax.linen.GroupNorm``, and the same with SiLU
(fused in gnorm; ``jax.nn.silu`` after flax), and reads off each optimized program the kernels
it launches and the bytes they move (``gnorm_bench/hlo_structure.py``) in x-sizes, and the
arrays of x's size or more it writes. By default it compiles for JAX's default backend (on a
CPU-only machine that proves the plumbing only); ``--deviceless h200`` compiles with XLA's GPU
compiler for an H200 without one (a CUDA build of jaxlib, run with ``JAX_PLATFORMS=cpu
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``). Writes xla_gpu_plan.md and xla_gpu_plan.json to --out
after each case. A model, not a timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from gnorm_bench import common
from gnorm_bench import hlo_structure
from gnorm_bench import impls

# An H200 as XLA's GPU compiler sees it: a GpuTargetConfig in text format.
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H200"
"""
DEVICELESS = {"h200": H200}


# Columns: name -> (implementation, activation).
IMPLS = {"gnorm": ("gnorm", None), "gnorm_prev": ("gnorm_prev", None),
         "gnorm_pallas": ("gnorm_pallas", None), "flax": ("flax", None),
         "gnorm_silu": ("gnorm", "silu"), "pallas_silu": ("gnorm_pallas", "silu"),
         "flax_silu": ("flax", "silu")}


def _compiler(deviceless: str | None):
  """``lower(fn, *ShapeDtypeStructs) -> Lowered`` and the target's name."""
  if deviceless is None:
    device = jax.devices()[0]
    return (lambda f, *args: jax.jit(f).lower(*args)), (
        f"{jax.default_backend()}: {device.device_kind}")
  from jax.experimental import topologies  # noqa: PLC0415 - only for this mode

  topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                          target_config=DEVICELESS[deviceless])
  mesh = topologies.make_mesh(topology, (1,), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def lower(f, *args):
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))

  return lower, f"cuda (deviceless, {deviceless})"


def run(shapes, deviceless: str | None, out: pathlib.Path) -> dict:
  """Compiles and reads every program (traced one at a time, compiled on worker threads);
  rewrites the reports after each case, so that a run stopped early leaves what it had."""
  lower, target = _compiler(deviceless)
  results = {"target": target, "jax": jax.__version__, "gnorm": common.versions()["gnorm"],
             "commit": common.git_revision(),
             "date": datetime.date.today().isoformat(), "rows": []}
  pool = concurrent.futures.ThreadPoolExecutor(max(1, min(8, common.threads() - 1)))
  for dtype in ("bfloat16", "float32"):
    for shape in shapes:
      case = common.Case(shape, 32, dtype)
      x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
      p = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
      x_bytes = math.prod(shape) * x.dtype.itemsize
      jobs = []
      for name, (impl, activation) in IMPLS.items():
        f = impls.jax_fn(impl, case.groups, activation)
        for direction, fn, args in (("fwd", f, (x, p, p)),
                                    ("fwdbwd", impls.fwdbwd_of(f), (x, p, p, x))):
          jobs.append((name, direction, pool.submit(lower(fn, *args).compile)))
      for name, direction, job in jobs:
        s = hlo_structure.summary(job.result(), x_bytes)
        results["rows"].append({"case": case.label, "impl": name, "direction": direction, **s})
        print(f"{case.label:28s} {name:11s} {direction:7s} {s['kernels']:3d} kernels "
              f"{s['traffic_x']:6.2f} x-sizes", file=sys.stderr, flush=True)
      _write(results, out)
  return results


def _write(results: dict, out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "xla_gpu_plan.json").write_text(json.dumps(results, separators=(",", ":")))
  (out / "xla_gpu_plan.md").write_text(to_markdown(results))


def to_markdown(results: dict) -> str:
  lines = [
      "# XLA's compiled GroupNorm programs: kernels and modelled traffic",
      "",
      f"Compiled for {results['target']}, jax {results['jax']}, gnorm {results['gnorm']} "
      f"(commit {results['commit']}), {results['date']} (`python benchmarks/xla_gpu_plan.py`). "
      "Each cell: kernels / bytes moved in x-sizes (read + written, from the optimized "
      "HLO's shapes; `gnorm_bench/hlo_structure.py`). A model of memory traffic, not a timing.",
      "",
  ]
  impls = list(IMPLS)
  for direction, title in (("fwd", "Forward"), ("fwdbwd", "Forward+backward")):
    lines += [f"## {title}", "", "| case | " + " | ".join(impls) + " |",
              "|---" * (len(impls) + 1) + "|"]
    cases = dict.fromkeys(r["case"] for r in results["rows"])
    for case in cases:
      cell = {r["impl"]: r for r in results["rows"]
              if r["case"] == case and r["direction"] == direction}
      lines.append(f"| {case} | " + " | ".join(
          f"{cell[i]['kernels']} / {cell[i]['traffic_x']:.1f}" for i in impls) + " |")
    lines.append("")
  writes = [(r["case"], r["impl"], r["direction"], len(r["full_size_writes"]))
            for r in results["rows"] if r["impl"] in ("gnorm", "gnorm_silu")]
  extra = [w for w in writes if w[3] > (1 if w[2] == "fwd" else 2)]
  lines += ["## Full-size arrays gnorm writes besides its outputs", "",
            "None." if not extra else "\n".join(f"- {c} {i} {d}: {n}" for c, i, d, n in extra), ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"))
  p.add_argument("--deviceless", choices=sorted(DEVICELESS), default=None,
                 help="compile for this GPU without one (needs a CUDA build of jaxlib)")
  p.add_argument("--quick", action="store_true", help="one tiny shape: a smoke test")
  args = p.parse_args(argv)
  results = run(common.QUICK_SHAPES if args.quick else common.GPU_SHAPES, args.deviceless,
                pathlib.Path(args.out))
  print(to_markdown(results))
  return 0


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  sys.exit(main())
