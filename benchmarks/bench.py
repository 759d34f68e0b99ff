"""gnorm against flax, haiku, equinox, torch (where installed) and XLA's floor, by blocked
calls on JAX's default backend; writes latest.md, latest.json and latest.png.

  python benchmarks/bench.py [--quick] [--cases full|sd-unet|quick] [--rounds N]
                             [--only gnorm,gnorm_pallas,flax,haiku,equinox,torch]
                             [--sections main,fused] [--sample-ms MS] [--compile-reps N]
                             [--out DIR] [--no-progress]

Per case and implementation: the jitted forward and forward+backward (``jax.vjp`` and its
cotangent: y and three gradients) timed in interleaved rounds, compiled on fresh functions,
their temp bytes, XLA's bytes accessed, the residuals the backward keeps, and their outputs
against a float64 reference. The fused section does the same for GroupNorm + SiLU.

On the CPU torch's idle OpenMP threads spin by default and compete with XLA's thread pool
for few cores (results/omp_active/ is a run with OMP_WAIT_POLICY=ACTIVE): this sets
OMP_WAIT_POLICY=PASSIVE before torch is imported, unless the environment sets it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import types

import jax

if jax.default_backend() == "cpu":  # before torch loads its OpenMP runtime
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gnorm_bench import common  # noqa: E402
from gnorm_bench import impls  # noqa: E402
from gnorm_bench import report  # noqa: E402
from gnorm_bench.common import DIRECTIONS  # noqa: E402
from gnorm_bench.report import TORCH_LAYOUTS  # noqa: E402
from gnorm_bench.report import t  # noqa: E402

NAMES = ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "torch")
# The fused section: gnorm's fused SiLU against SiLU after gnorm, flax and torch.
FUSED_NAMES = ("gnorm", "gnorm_pallas", "gnorm_unfused", "flax", "torch")


def _residuals(leaves, x_size: int, x_itemsize: int) -> dict:
  """``leaves``: ``(dtype, shape, itemsize, is_x)`` of each array the backward keeps."""
  n = [int(np.prod(s)) for _, s, _, _ in leaves]
  return {"total_bytes": sum(k * it for k, (_, _, it, _) in zip(n, leaves, strict=True)),
          "bytes_excluding_x": sum(k * it for k, (_, _, it, is_x) in
                                   zip(n, leaves, strict=True) if not is_x),
          "x_bytes": x_size * x_itemsize,
          "full_size_leaves": [f"{d}{list(s)}" + (" (= x)" if is_x else "")
                               for k, (d, s, _, is_x) in zip(n, leaves, strict=True)
                               if k >= x_size]}


def prepare_jax(name: str, case, data: dict, activation):
  """``name`` on ``case``: blocking calls, outputs, compilation, residuals."""
  cf = name in impls.CHANNELS_FIRST
  x_np, ct_np = ((np.moveaxis(data[k], -1, 1) if cf else data[k]) for k in ("x", "ct"))
  x, ct = jnp.asarray(x_np, case.dtype), jnp.asarray(ct_np, case.dtype)
  pdt = case.dtype if name == "floor" else jnp.float32  # the floor writes x's dtype
  g, b = jnp.asarray(data["gamma"], pdt), jnp.asarray(data["beta"], pdt)
  progs = {"fwd": (lambda f: f, (x, g, b)), "fwdbwd": (impls.fwdbwd_of, (x, g, b, ct))}
  compiled = {}

  def compile_(d):  # a fresh function: no trace or compile cache hit
    wrap, args = progs[d]
    t0 = time.perf_counter()
    compiled[d] = jax.jit(wrap(impls.jax_fn(name, case.groups, activation))).lower(*args).compile()
    return time.perf_counter() - t0, compiled[d]

  def call(d):
    if d not in compiled:
      compile_(d)
    return jax.block_until_ready(compiled[d](*progs[d][1]))

  def outputs():
    out = [np.asarray(o, np.float64) for o in call("fwdbwd")]
    return tuple(np.moveaxis(o, 1, -1) if cf and o.ndim > 1 else o for o in out)

  def residuals():  # the leaves of jax.vjp's function, listed by tracing
    f = impls.jax_fn(name, case.groups, activation)
    jaxpr = jax.make_jaxpr(lambda *a: jax.tree_util.tree_leaves(jax.vjp(f, *a)[1]))(x, g, b).jaxpr
    return _residuals([(str(v.aval.dtype), v.aval.shape, v.aval.dtype.itemsize,
                        v is jaxpr.invars[0]) for v in jaxpr.outvars if hasattr(v.aval, "shape")],
                      x.size, x.dtype.itemsize)

  return types.SimpleNamespace(
    fwd=lambda: call("fwd"), fwdbwd=lambda: call("fwdbwd"), outputs=outputs, compile=compile_,
    io=lambda: (int(x.nbytes), int(call("fwd").nbytes)), residuals=residuals,
    note="NCHW input, vmapped over the batch" if cf else "")


def prepare_torch(name: str, case, data: dict, activation, device: str):
  """torch's ``F.group_norm`` in one layout; on CUDA every call ends with a synchronize."""
  import torch

  x, ct, w, b = impls.torch_inputs(data, case.dtype, TORCH_LAYOUTS[name], device)
  xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
  fn = impls.torch_fn(case.groups, activation)
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None

  def fwd():
    with torch.no_grad():
      y = fn(x, w, b)
    sync()
    return y

  def fwdbwd():
    y = fn(xl, wl, bl)
    out = (y, *torch.autograd.grad(y, (xl, wl, bl), ct))
    sync()
    return out

  def residuals():  # what autograd saves, through saved-tensor hooks (one tensor once)
    saved = {}

    def pack(t):
      saved[(t.data_ptr(), tuple(t.shape), t.dtype)] = (
        str(t.dtype)[6:], tuple(t.shape), t.element_size(),
        t.data_ptr() == xl.data_ptr() and t.shape == xl.shape)
      return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      fn(xl, wl, bl)
    return _residuals(list(saved.values()), xl.numel(), xl.element_size())

  return types.SimpleNamespace(
    fwd=fwd, fwdbwd=fwdbwd, compile=None, residuals=residuals,
    outputs=lambda: tuple(map(impls.torch_nhwc, fwdbwd())),
    io=lambda: (x.numel() * x.element_size(), (y := fwd()).numel() * y.element_size()),
    note="channels_last" if TORCH_LAYOUTS[name] else "contiguous NCHW")


def _compiled_memory(d: str, compiled) -> dict:
  """Temp bytes and XLA's estimate of the bytes accessed, where the backend reports them."""
  out = {}
  if (ma := compiled.memory_analysis()) is not None:
    out[f"{d}_temp_bytes"] = int(ma.temp_size_in_bytes)
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out[f"{d}_bytes_accessed"] = int(ca["bytes accessed"])
  except Exception:  # noqa: BLE001 - not every backend has it
    pass
  return out


def run_case(case, names, activation, args, reps: int, copy_gb_s: float, bar) -> dict:
  """Every implementation of ``names`` (torch: both layouts; the floor always) on ``case``."""
  data = common.make_data(case)
  prepared = {}
  for n in (*names, "floor"):
    for v in TORCH_LAYOUTS if n == "torch" else (n,):
      prepared[v] = (prepare_torch(v, case, data, activation, args.torch_device)
                     if n == "torch" else prepare_jax(v, case, data, activation))
  compile_s, memory, errors = {}, {}, {}
  for _ in range(reps):  # interleaved over implementations; the last compilation is timed
    for n, p in list(prepared.items()):
      try:
        for d in DIRECTIONS if p.compile else ():
          t, compiled = p.compile(d)
          compile_s.setdefault(n, {}).setdefault(d, []).append(t)
          memory.setdefault(n, {}).update(_compiled_memory(d, compiled))
      except Exception as e:  # noqa: BLE001 - the kernels compile on a GPU only: keep the rest
        if n != "gnorm_pallas":
          raise
        errors[n] = f"{type(e).__name__}: {e}"[:400]
        print(f"{n} failed to compile, dropped: {errors[n]}", file=sys.stderr)
        del prepared[n]
  ref = common.reference(case, data, activation)
  accuracy = {n: common.check(n, p.outputs(), ref, case.dtype)
              for n, p in prepared.items() if n != "floor"}
  for n, p in prepared.items():
    if n != "floor":
      memory.setdefault(n, {})["residuals"] = p.residuals()
  times = common.time_interleaved({n: {"fwd": p.fwd, "fwdbwd": p.fwdbwd}
                                   for n, p in prepared.items()}, args.rounds, args.sample_s, bar)
  bandwidth = {}
  for n, p in prepared.items():  # the bytes a pass must move: x and y; twice that fwd+bwd
    moved = sum(p.io())
    for d, k in (("fwd", 1), ("fwdbwd", 2)):
      gb_s = k * moved / times[f"{n}/{d}"]["median_s"] / 1e9
      bandwidth[f"{n}/{d}"] = {"bytes": k * moved, "gb_per_s": gb_s,
                               "fraction_of_copy": gb_s / copy_gb_s}
  jax.clear_caches()
  return {"label": case.label, "shape": list(case.shape), "groups": case.groups,
          "dtype": case.dtype, "times": times, "bandwidth": bandwidth, "memory": memory,
          "compile_s": {n: {d: float(np.median(v)) for d, v in dd.items()}
                        for n, dd in compile_s.items()},
          "accuracy": accuracy, "errors": errors,
          "notes": {n: p.note for n, p in prepared.items() if p.note}}


def summarize(cases: list) -> dict:
  """Geometric means of other / gnorm (medians, and best-of-rounds as a second opinion),
  time / the floor's forward, fraction of the copy bandwidth, XLA's bytes and compile time."""
  s = {}
  names = list(dict.fromkeys(report.shown(k.split("/")[0]) for c in cases for k in c["times"]))
  for d in DIRECTIONS:
    for n in names:
      pairs = [(t(c, n, d), t(c, "gnorm", d), t(c, n, d, "min_s"), t(c, "gnorm", d, "min_s"),
                t(c, "floor", "fwd")) for c in cases]
      if n != "gnorm" and any(a and g for a, g, *_ in pairs):
        s[f"{n}/gnorm/{d}"] = {"per_case": [a / g if a and g else None for a, g, *_ in pairs],
                               "geomean": common.geomean(a / g for a, g, *_ in pairs if a and g),
                               "geomean_of_min": common.geomean(
                                 a / g for _, _, a, g, _ in pairs if a and g)}
      s[f"{n}/floor/{d}"] = {"geomean": common.geomean(a / f for a, *_, f in pairs if a)}
      fracs = [max((e["fraction_of_copy"] for v in (TORCH_LAYOUTS if n == "torch" else (n,))
                    if (e := c["bandwidth"].get(f"{v}/{d}"))), default=None) for c in cases]
      s[f"{n}/copy/{d}"] = {"geomean": common.geomean(fracs)}
    traffic = [(c["memory"].get("flax", {}).get(f"{d}_bytes_accessed"),
                c["memory"].get("gnorm", {}).get(f"{d}_bytes_accessed")) for c in cases]
    if cases and all(f and g for f, g in traffic):
      s[f"traffic/flax/gnorm/{d}"] = {"geomean": common.geomean(f / g for f, g in traffic)}
    comp = [(c["compile_s"].get("flax", {}).get(d), c["compile_s"].get("gnorm", {}).get(d))
            for c in cases]
    if cases and all(f and g for f, g in comp):
      s[f"compile/flax/gnorm/{d}"] = {"geomean": common.geomean(f / g for f, g in comp)}
  return s


def copy_bandwidth(rounds: int, sample_s: float) -> dict:
  """``jax.jit(lambda x: x + 0)`` (nothing donated: a new buffer written) on a float32 buffer
  far beyond the caches, bytes read + written: the bandwidth table's yardstick. On the CPU
  64 MiB, where the page faults of each fresh output set its time (fractions above 100% are
  normal there)."""
  mib = 64 if jax.default_backend() == "cpu" else 256
  x = jax.random.uniform(jax.random.key(0), (mib * 2**18,), jnp.float32)
  f = jax.jit(lambda x: x + 0)
  st = common.time_interleaved({"copy": {"fwd": lambda: f(x).block_until_ready()}},
                               max(3, min(rounds, 10)), sample_s)["copy/fwd"]
  return {"function": "jax.jit(lambda x: x + 0)", "buffer_bytes": int(x.nbytes),
          "bytes_moved": 2 * int(x.nbytes), "gb_per_s": 2 * x.nbytes / st["median_s"] / 1e9, **st}


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shape, 2 rounds: a smoke test")
  p.add_argument("--cases", choices=sorted(common.CASE_SETS), default=None,
                 help="full (default), sd-unet (the SD-UNet shapes in float32 and bfloat16, in"
                 " both sections) or quick (the default with --quick)")
  p.add_argument("--rounds", type=int, default=None, help="default 20; 2 with --quick")
  p.add_argument("--sample-ms", type=float, default=None, help="default 25; 2 with --quick")
  p.add_argument("--compile-reps", type=int, default=None, help="default 3; 1 with --quick")
  p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(NAMES)
                 + " (default all; off a GPU gnorm_pallas runs only when named: in the"
                 " interpreter); the floor always runs")
  p.add_argument("--sections", default="main,fused", help="main, fused or both (default)")
  p.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results"))
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  sections = [s for s in ("main", "fused") if s in args.sections.split(",")]
  named = {s for s in (args.only or "").split(",") if s}
  if not sections or set(args.sections.split(",")) - {"main", "fused"} or named - set(NAMES):
    p.error(f"--sections from main,fused; --only from {','.join(NAMES)}")
  backend = jax.default_backend()
  asked = [n for n in NAMES if n in (named or NAMES)]
  skipped = {n: why for n in asked if (why := impls.skip_reason(n, backend, n in named))}
  names = [n for n in asked if n not in skipped]
  for n, why in skipped.items():
    print(f"skipping {n}: {why}", file=sys.stderr)
  args.torch_device = ("cuda" if backend == "gpu" else "cpu") if "torch" in names else None
  if args.torch_device == "cpu":
    import torch

    torch.set_num_threads(common.threads())
  main_cases, fused_cases = common.CASE_SETS[args.cases or ("quick" if args.quick else "full")]
  args.rounds = args.rounds or (2 if args.quick else 20)
  args.sample_s = (args.sample_ms or (2.0 if args.quick else 25.0)) / 1e3
  args.compile_reps = args.compile_reps or (1 if args.quick else 3)

  t0 = time.perf_counter()
  info = common.machine_info(args.torch_device)
  info["copy_bandwidth"] = copy_bandwidth(args.rounds, args.sample_s)
  results = {"machine": info, "skipped": skipped, "cases": []}
  todo = [("main", c, names, None) for c in main_cases if "main" in sections]
  fused = [n for n in FUSED_NAMES if n in names or (n == "gnorm_unfused" and "gnorm" in names)]
  todo += [("fused", c, fused, "silu") for c in fused_cases if "fused" in sections
           and "gnorm" in names]
  if "fused" in sections and "gnorm" not in names:
    print("skipping the fused section: it needs gnorm", file=sys.stderr)
  bar = common.progress_bar(len(todo) * args.rounds, "rounds", not args.no_progress)
  for section, case, todo_names, activation in todo:  # the fused section compiles once
    entry = run_case(case, todo_names, activation, args, args.compile_reps if section == "main"
                     else 1, info["copy_bandwidth"]["gb_per_s"], bar)
    (results["cases"] if section == "main" else results.setdefault(
      "fused", {"activation": "silu", "cases": []})["cases"]).append(entry)
  if bar:
    bar.close()
  results["summary"] = summarize(results["cases"])
  if "fused" in results:
    results["fused"]["summary"] = summarize(results["fused"]["cases"])
  info["loadavg_end"] = common.loadavg()
  results["settings"] = {"rounds": args.rounds, "sample_s": args.sample_s, "quick": args.quick,
                         "compile_reps": args.compile_reps, "sections": sections,
                         "cases": args.cases or ("quick" if args.quick else "full"),
                         "wall_s": time.perf_counter() - t0}
  command = " ".join(["python benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  md = report.to_markdown(results, command)
  (out / "latest.md").write_text(md)
  common.write_json(out / "latest.json", results)
  png = report.to_png(results, out / "latest.png")
  print(md)
  print(f"wrote {out}/latest.{{md,json{',png' if png else ''}}} in"
        f" {results['settings']['wall_s']:.0f} s", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
