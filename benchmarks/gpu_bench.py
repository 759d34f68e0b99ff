"""Device time of GroupNorm on one GPU: gnorm's default (``implementation="auto"``), its GPU
plan, its previous XLA program and its Pallas kernels against flax.linen.GroupNorm, torch eager
and torch.compile; the copy bandwidth; every ratio to flax; the fastest implementation per case.

  python benchmarks/gpu_bench.py [--quick] [--budget-s S] [--only a,b] [--out DIR]

The case set: the SD-UNet shapes plus three larger ones, G = 32, bfloat16 and float32, plain
and with SiLU (fused into gnorm's pass, ``jax.nn.silu`` / ``F.silu`` after everyone else's),
forward and forward+backward. The method is in ``gnorm_bench/device.py``; every timed
program's first call is checked against the float64 reference (on large cases, on three
groups' channels: a group's statistics are its own). Work items go in a fixed order, most
important first, and one runs only if the time the last one like it took is left in the
budget; JAX programs are traced one at a time and compiled on worker threads ahead of the one
being timed. Writes gpu_bench.md and gpu_bench.json, also while it runs. ``--quick``: one
tiny shape, a dry run on the CPU (torch runs on a CUDA GPU only).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import pathlib
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from gnorm_bench import common
from gnorm_bench import device
from gnorm_bench import impls
from gnorm_bench.common import DIRECTIONS

from gnorm._src import dispatch

IMPLS = ("gnorm", "flax", "gnorm_gpu_plan", "gnorm_prev", "gnorm_pallas", "torch",
         "torch_compile")
# The order of a run: gnorm against flax on every case, then gnorm's other implementations,
# then torch.
PHASES = (("gnorm", "flax"), ("gnorm_gpu_plan", "gnorm_prev", "gnorm_pallas"), ("torch",),
          ("torch_compile",))
# gnorm's variants by the name dispatch gives the implementation they run.
IMPLEMENTATION = {"gnorm_gpu_plan": "xla_gpu", "gnorm_prev": "xla", "gnorm_pallas": "pallas"}
TITLES = {"gnorm": "gnorm (auto)", "gnorm_gpu_plan": "GPU plan", "gnorm_prev": "prev XLA",
          "gnorm_pallas": "Pallas", "flax": "flax", "torch": "torch eager",
          "torch_compile": "torch.compile"}
# Seconds an item is expected to take before one like it ran (then: what the last one took).
EST_S = {"loop": 1.0, "torch": 5.0, "torch_compile": 40.0}
RESERVE_S = 3.0  # kept for the last reports


class Bench:
  """One run: the plan, the compile workers, the data, the results."""

  def __init__(self, impl_names, cases, s, budget_s, results, write):
    self.s, self.results, self.write = s, results, write
    self.t0, self.budget_s = time.perf_counter(), budget_s
    self.copy_gb_s = results["copy_bandwidth"]["gb_per_s"]
    self.entries = {c: {"label": c.label, "shape": list(c.shape), "dtype": c.dtype,
                        "activation": c.activation, "x_bytes": c.x_bytes, "overhead": {},
                        "times": {}, "accuracy": {}, "errors": {}} for c in cases}
    results["cases"] = list(self.entries.values())
    results["not_measured"] = []
    self.items, seen = [], set()
    for phase in PHASES:  # the loop's own cost before the first program of its shape
      for c in cases:
        for impl in (i for i in phase if i in impl_names):
          for d in DIRECTIONS:
            if not impl.startswith("torch") and (c.shape, c.dtype, d) not in seen:
              seen.add((c.shape, c.dtype, d))
              self.items.append((device.GpuCase(c.shape, c.dtype), "loop", d))
            self.items.append((c, impl, d))
    results["plan"] = {"items": len(self.items), "order": list(dict.fromkeys(
      i[1] for i in self.items))}
    self.workers = max(1, min(8, common.threads() - 1))
    self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)
    # Tracing one program at a time (dispatch.forced is process-wide), never while a program
    # is timed (a tracing thread holding the GIL would delay the timed runs' dispatch).
    self.lock = threading.Lock()
    self.futures, self.data, self.refs, self.observed = {}, {}, {}, {}

  def _compile(self, case: device.GpuCase, impl: str, d: str):
    n, u = device.loop_size(device.est_call_s(case, d, self.copy_gb_s, self.s), self.s)
    x = jax.ShapeDtypeStruct(case.shape, jnp.dtype(case.dtype))
    p = jax.ShapeDtypeStruct(case.shape[-1:], jnp.float32)
    if impl == "loop":
      fn, args = device.overhead_loop(n), (x if d == "fwd" else (x, x, p, p),
                                           jax.ShapeDtypeStruct((), jnp.float32))
    elif d == "fwd":
      fn, args = device.fwd_loop(impls.jax_fn(impl, case.groups, case.activation), n, u), (x, p, p)
    else:
      f = impls.fwdbwd_of(impls.jax_fn(impl, case.groups, case.activation))
      fn, args = device.fwdbwd_loop(f, n, u), (x, p, p, x)
    t0 = time.perf_counter()
    with self.lock:
      lowered = jax.jit(fn).lower(*args)
    return lowered.compile(), device.calls(n, u), time.perf_counter() - t0

  def _arrays(self, case: device.GpuCase):
    key = (case.shape, case.dtype)
    if key not in self.data:
      host = common.make_data(common.Case(case.shape, case.groups, case.dtype))
      dev = {k: jnp.asarray(v, case.dtype if k in ("x", "ct") else jnp.float32)
             for k, v in host.items()}
      self.data[key] = (host, dev)
    return self.data[key]

  def _reference(self, case: device.GpuCase) -> tuple:
    if case not in self.refs:
      ch, host = case.channels(), self._arrays(case)[0]
      sub = {k: np.ascontiguousarray(device.take(v, ch)) for k, v in host.items()}
      nc = sub["gamma"].shape[0]
      sub_case = common.Case(case.shape[:-1] + (nc,), nc // (case.shape[-1] // case.groups),
                             case.dtype)
      self.refs[case] = common.reference(sub_case, sub, case.activation)
    return self.refs[case]

  def _jax(self, i: int, case: device.GpuCase, impl: str, d: str):
    compiled, n_calls, compile_s = self.futures.pop(i).result()
    dev = self._arrays(case)[1]
    x, g, b, ct = dev["x"], dev["gamma"], dev["beta"], dev["ct"]
    if impl == "loop":
      carry, one = (x if d == "fwd" else (x, ct, g, g)), jnp.float32(1.0)
      with self.lock:
        st, _ = device.time_runs(lambda: compiled(carry, one), n_calls, self.s)
      for c, e in self.entries.items():  # the same loop for either activation
        if (c.shape, c.dtype) == (case.shape, case.dtype):
          e["overhead"][d] = st["median_s"]
      return None
    args = (x, g, b) if d == "fwd" else (x, g, b, ct)
    with self.lock:
      st, out = device.time_runs(lambda: compiled(*args), n_calls, self.s)
    return st, compile_s, ((out[0],) if d == "fwd" else out[0])

  def _torch(self, case: device.GpuCase, impl: str, d: str):
    import torch

    x, ct, w, b = impls.torch_inputs(self._arrays(case)[0], case.dtype, False, "cuda")
    xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    fn = impls.torch_fn(case.groups, case.activation, compiled=impl == "torch_compile")

    def fwd():
      with torch.no_grad():
        return (fn(x, w, b),)

    def fwdbwd():
      y = fn(xl, wl, bl)
      return (y, *torch.autograd.grad(y, (xl, wl, bl), ct))

    step = fwd if d == "fwd" else fwdbwd
    t0 = time.perf_counter()
    outputs = step()  # compiles torch.compile's kernels
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    n, u = device.loop_size(device.est_call_s(case, d, self.copy_gb_s, self.s), self.s)
    with self.lock:
      return device.time_graph(step, device.calls(n, u), self.s), compile_s, outputs

  def measure(self, i: int, case: device.GpuCase, impl: str, d: str) -> None:
    got = self._torch(case, impl, d) if impl.startswith("torch") else self._jax(i, case, impl, d)
    if got is None:
      return
    st, compile_s, outputs = got
    ch = case.channels()  # cut on the host before the float64 conversion: large outputs
    acc = common.check(impl, tuple(device.take(impls.torch_nhwc(o), ch) if impl.startswith(
      "torch") else device.take(np.asarray(o), ch).astype(np.float64) for o in outputs),
      self._reference(case), case.dtype)
    e = self.entries[case]
    overhead = None if impl.startswith("torch") else e["overhead"].get(d)
    net = max(st["median_s"] - (overhead or 0.0), 1e-12)
    e["times"][f"{impl}/{d}"] = {
      "net_s": net, "raw_s": st["median_s"], "overhead_s": overhead, "compile_s": compile_s,
      "pct_copy": {"fwd": 2, "fwdbwd": 5}[d] * case.x_bytes / net / (self.copy_gb_s * 1e9), **st}
    e["accuracy"][f"{impl}/{d}"] = acc
    if not acc["ok"]:
      print(f"WRONG: {impl} {d} on {case.label}: {acc}", file=sys.stderr)

  def left(self) -> float:
    return self.budget_s - (time.perf_counter() - self.t0)

  def run(self) -> None:
    ahead, last_write = 2 * self.workers, 0.0
    for i, (case, impl, d) in enumerate(self.items):
      for j in range(i, min(i + ahead, len(self.items))):  # compile ahead of the timing
        c, im, dj = self.items[j]
        if not im.startswith("torch") and j not in self.futures:
          self.futures[j] = self.pool.submit(self._compile, c, im, dj)
      est = self.observed.get(impl, EST_S.get(impl, 3.0))
      if self.left() < est + RESERVE_S:
        self.results["not_measured"].append(
          {"case": case.label, "impl": impl, "direction": d, "reason": f"time budget:"
           f" {max(self.left(), 0):.0f} s of {self.budget_s:.0f} s left, ~{est:.0f} s needed"})
        if i in self.futures:
          self.futures.pop(i).cancel()
        continue
      t0 = time.perf_counter()
      try:
        self.measure(i, case, impl, d)
      except Exception as e:  # noqa: BLE001 - one failing item must not end a GPU session
        msg = f"{type(e).__name__}: {str(e).strip()[:400]}"
        self.entries[case]["errors"][f"{impl}/{d}"] = msg
        print(f"error: {impl} {d} on {case.label}: {msg}", file=sys.stderr)
      self.observed[impl] = time.perf_counter() - t0
      print(f"{time.perf_counter() - self.t0:6.1f} s  {case.label:22s} {impl:14s} {d}",
            file=sys.stderr, flush=True)
      if time.perf_counter() - last_write > 3.0:
        self.write()
        last_write = time.perf_counter()
    self.pool.shutdown(wait=False, cancel_futures=True)


def derive(r: dict) -> None:
  """Ratios to flax, the fastest implementation per case and direction, the geomeans."""
  default = dispatch.DEFAULT.get(r["platform"], "xla")
  summary = {}
  for c in r["cases"]:
    c["fastest"] = {}
    for d in DIRECTIONS:
      ok = {k.split("/")[0]: t["net_s"] for k, t in c["times"].items()
            if k.endswith("/" + d) and c["accuracy"][k]["ok"]}
      gn = {IMPLEMENTATION.get(i, default): v for i, v in ok.items() if i.startswith("gnorm")}
      c["fastest"][d] = {"gnorm": min(gn, key=gn.get) if gn else None,
                         "of_all": min(ok, key=ok.get) if ok else None}
      for impl, v in ok.items():
        c["times"][f"{impl}/{d}"]["vs_flax"] = ok["flax"] / v if "flax" in ok else None
  for impl in IMPLS:
    for d in DIRECTIONS:
      ts = [t for c in r["cases"] if (t := c["times"].get(f"{impl}/{d}"))]
      if ts:
        summary[f"{impl}/{d}"] = {
          "cases": len(ts), "vs_flax_geomean": common.geomean(t.get("vs_flax") for t in ts),
          "pct_copy_geomean": common.geomean(t["pct_copy"] for t in ts)}
  for d in DIRECTIONS:
    summary[f"fastest/{d}"] = {n: sum(c["fastest"][d]["gnorm"] == n for c in r["cases"])
                               for n in ("xla_gpu", "xla", "pallas")}
  r["summary"] = summary


def _cell(r: dict, c: dict, impl: str, d: str) -> str:
  key = f"{impl}/{d}"
  if impl in r["same_as"]:
    return "= gnorm"
  if key in c["errors"]:
    return "error"
  if not (t := c["times"].get(key)):
    return "—"
  us = f"{t['net_s'] * 1e6:.1f}" + (f" ({t['vs_flax']:.2f}×)" if t.get("vs_flax") else "")
  return us + ("" if c["accuracy"][key]["ok"] else " **WRONG**")


def _g(e: dict | None, key: str, fmt: str) -> str:
  return fmt.format(e[key]) if e and e[key] else "—"


def summary_table(r: dict) -> list[str]:
  s, g = r["summary"], _g
  rows = ["| implementation | ×flax fwd | ×flax fwd+bwd | % of copy fwd / fwd+bwd | cases |",
          "|---|--:|--:|--:|--:|"]
  for impl in IMPLS:
    f, b = s.get(f"{impl}/fwd"), s.get(f"{impl}/fwdbwd")
    if f or b:
      rows.append(f"| {TITLES[impl]} | {g(f, 'vs_flax_geomean', '{:.2f}×')} |"
                  f" {g(b, 'vs_flax_geomean', '{:.2f}×')} | {g(f, 'pct_copy_geomean', '{:.0%}')}"
                  f" / {g(b, 'pct_copy_geomean', '{:.0%}')} | {(f or b)['cases']} |")
  fastest = "; ".join(f"{'forward' if d == 'fwd' else 'forward+backward'}: " + ", ".join(
    f"{n} on {k}" for n, k in s[f"fastest/{d}"].items()) for d in DIRECTIONS)
  return rows + ["", f"Fastest of gnorm's implementations, cases: {fastest}."]


def to_markdown(r: dict, command: str) -> str:
  m, cb, st = r["machine"], r["copy_bandwidth"], r["settings"]
  impl_cols = [i for i in IMPLS if i in r["settings"]["impls"] or i in r["same_as"]]
  lines = [
    "# gnorm device-time benchmark", "",
    f"`{command}` — {m['date_utc']}, {common.provenance(m)}, {r['wall_s']:.0f} s", "",
    f"Device: **{m['device']}** (JAX backend `{m['jax_backend']}`, gnorm lowers for"
    f" `{r['platform']}`; torch: {m.get('torch_device_name') or 'not run'});"
    f" {common.machine_line(m)}", "",
    "Device time per call in µs, **net** of the loop's own cost (column `loop`), with ×flax ="
    " flax's time / this one (> 1: faster than flax). JAX: chained calls in one jitted"
    f" `lax.fori_loop` with an optimization barrier between calls, median of {st['samples']}"
    " samples (`gnorm_bench/device.py`); torch: calls captured in one CUDA graph (contiguous"
    " NCHW, weight and bias in x's dtype), replays timed with CUDA events. `+silu`: gnorm"
    ' fuses it (`activation="silu"`), the others apply SiLU after. Copy bandwidth:'
    f" **{cb['gb_per_s']:.0f} GB/s** ({cb['function']}, {cb['buffer_bytes'] / 2**20:.0f} MiB);"
    " % of copy = the least bytes a pass moves (2 x-sizes forward, 5 forward+backward) / net"
    " time / copy bandwidth. Every timed program's first call is checked against the float64"
    f" reference ({common.BOUNDS_TEXT}; **WRONG** otherwise). `= gnorm`: the same program as"
    f" the default on this platform. Budget {st['budget_s']:.0f} s:"
    f" {r['plan']['items'] - len(r['not_measured'])} of {r['plan']['items']} items measured,"
    f" in this order: {', '.join(r['plan']['order'])}.", ""]
  for d, title in (("fwd", "Forward"), ("fwdbwd", "Forward+backward")):
    lines += [f"## {title} (µs per call, ×flax)", "",
              "| case | loop | " + " | ".join(TITLES[i] for i in impl_cols)
              + " | fastest gnorm | fastest |", "|---|" + "--:|" * (len(impl_cols) + 3)]
    for c in r["cases"]:
      if c["times"]:
        oh, f = c["overhead"].get(d), c.get("fastest", {}).get(d, {})
        lines.append(f"| {c['label']} | {'—' if oh is None else f'{oh * 1e6:.1f}'} | "
                     + " | ".join(_cell(r, c, i, d) for i in impl_cols)
                     + f" | {f.get('gnorm') or '—'} | {f.get('of_all') or '—'} |")
    lines.append("")
  lines += ["## Summary (geometric means over the cases measured)", "", *summary_table(r), "",
            "## Not measured, errors, accuracy", ""]
  lines += [f"* skipped {n}: {why}" for n, why in r["skipped"].items()]
  lines += [f"* error {c['label']} {k}: {e}" for c in r["cases"] for k, e in c["errors"].items()]
  lines += [f"* **WRONG** {c['label']} {k}: {a}" for c in r["cases"]
            for k, a in c["accuracy"].items() if not a["ok"]]
  if nm := r["not_measured"]:
    lines.append(f"* not measured: {len(nm)} items (time budget), the first {nm[0]['case']}"
                 f" {nm[0]['impl']} {nm[0]['direction']}")
  worst = {}
  for c in r["cases"]:
    for k, a in c["accuracy"].items():
      worst[k.split("/")[0]] = max(worst.get(k.split("/")[0], 0.0), a["y_vs_ref"],
                                   a.get("grad_vs_ref", 0.0))
  lines.append("* worst max|error|/max|ref| (y and gradients): "
               + (", ".join(f"{i} {e:.1e}" for i, e in worst.items()) or "none measured"))
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="one tiny shape: a dry run")
  p.add_argument("--budget-s", type=float, default=None,
                 help="seconds for the whole run (default 170 on a GPU, 600 elsewhere)")
  p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(IMPLS))
  p.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results" / "gpu"))
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  named = {n for n in (args.only or "").split(",") if n}
  if named - set(IMPLS):
    p.error(f"--only from {','.join(IMPLS)}")
  backend, plat = jax.default_backend(), device.platform()
  s = device.QUICK if args.quick else device.GPU if backend == "gpu" else device.CPU
  twin = {n: "gnorm" for n, i in IMPLEMENTATION.items() if i == dispatch.DEFAULT.get(plat, "xla")}
  skipped = {}
  for n in (n for n in IMPLS if n in (named or IMPLS)):
    if n in twin:
      skipped[n] = f"the same program as gnorm: \"auto\" runs {IMPLEMENTATION[n]} on {plat}"
    elif n.startswith("torch") and backend != "gpu":
      skipped[n] = "torch is timed on a CUDA GPU only"
    elif why := impls.skip_reason(n, backend, n in named):
      skipped[n] = why
  names = [n for n in IMPLS if n in (named or IMPLS) and n not in skipped]
  for n, why in skipped.items():
    print(f"skipping {n}: {why}", file=sys.stderr)
  shapes, dtypes = ((common.QUICK_SHAPES, ("bfloat16",)) if args.quick
                    else (common.GPU_SHAPES, ("bfloat16", "float32")))
  cases = device.case_set(shapes, dtypes)
  budget = args.budget_s if args.budget_s is not None else 170.0 if backend == "gpu" else 600.0
  info = common.machine_info("cuda" if any(n.startswith("torch") for n in names) else None)
  r = {"machine": info, "platform": plat, "skipped": skipped,
       "same_as": {n: g for n, g in twin.items() if n in (named or IMPLS)},
       "settings": {**dataclasses.asdict(s), "budget_s": budget, "quick": args.quick,
                    "impls": names}, "copy_bandwidth": device.copy_bandwidth(s)}
  command = " ".join(["python benchmarks/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  def write():
    r["wall_s"] = time.perf_counter() - t0
    derive(r)
    common.write_json(out / "gpu_bench.json", r)
    (out / "gpu_bench.md").write_text(to_markdown(r, command))

  Bench(names, cases, s, budget - (time.perf_counter() - t0), r, write).run()
  info["loadavg_end"] = common.loadavg()
  write()
  print("\n".join(summary_table(r)))
  print(f"wrote {out}/gpu_bench.{{md,json}} in {r['wall_s']:.0f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
