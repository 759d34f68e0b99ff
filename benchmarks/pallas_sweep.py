"""The Pallas kernels' tile sweep on a GPU: which blocks are fastest per shape class, and
whether the kernels beat XLA there; writes a candidate ``tuning_table.json``.

Usage::

  python benchmarks/pallas_sweep.py [--out DIR] [--budget-s S] [--layouts last,first]
                                    [--dtypes bfloat16,float32] [--quick]
  python benchmarks/pallas_sweep.py --install FILE [--table PATH]

Per shape class of ``gnorm/_src/backends/tuning.py`` (one representative shape each,
``gnorm_bench/sweep_plan.py``): ``implementation="xla"``, and ``implementation="pallas"``
under each candidate block (``pallas_triton.forced_block``), forward and forward+backward,
timed in ``gpu_bench``'s loop form (device time per call, the loop's own cost measured and
subtracted) and checked against the float64 reference. A class gets the kernels only if
their forward+backward beats XLA's by 5% in this run (``sweep_plan.MIN_SPEEDUP``).

Writes ``pallas_sweep.md`` (every time, the decisions), ``pallas_sweep.json`` (the raw
results) and ``tuning_table.json`` (the candidate table, schema ``tuning.validate``) to
``--out`` (default ``benchmarks/results/pallas_sweep``), after every item. The budget
(default 60 s on a GPU) bounds the whole run; what does not fit is listed as not swept.
``--quick``: one tiny bfloat16 shape and two blocks, a dry run (on the CPU through
Pallas's interpreter): its times mean nothing and ``--install`` refuses its table.
``--install FILE`` validates a candidate table and puts it into the package's table
(``--table``, default ``gnorm/_src/backends/tuning_table.json``), replacing any
measurement of the same device and keeping the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import pathlib
import platform
import sys
import time

import jax
import jaxlib.version
from gnorm_bench import machine
from gnorm_bench import sweep_plan
from gnorm_bench.device_timing import Budget
from gnorm_bench.device_timing import Settings
from gnorm_bench.device_timing import copy_bandwidth
from gnorm_bench.sweep_report import summary_lines
from gnorm_bench.sweep_report import to_markdown
from gnorm_bench.sweep_run import Sweep

from gnorm._src.backends import tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUT = ROOT / "benchmarks" / "results" / "pallas_sweep"
_BUDGET_S = {"gpu": 60.0}  # elsewhere (a dry run) 300
# Past budget + this, the process dumps its threads' stacks and exits: a compiler that
# hangs must not hold the GPU session (the results so far are already written).
_WATCHDOG_GRACE_S = 120.0
_VERSIONS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "triton", "numpy")

METHOD = (
  "Device time per call of a compiled loop of `1 + n*u` chained calls (`gnorm_bench/"
  "device_loop.py`, as gpu_bench.py), median of the samples, minus the loop's own cost"
  " measured in the same run for the same shape and direction (net; raw in parentheses)."
  " Pallas: `implementation=\"pallas\"` lowered inside `pallas_triton.forced_block(block)`,"
  " one block for every kernel of the program (forward and backward alike); the forward"
  " block is the fastest correct forward, the backward block that of the fastest correct"
  " forward+backward. XLA: `implementation=\"xla\"`. Every program's first call is checked"
  " against the float64 reference (docs/accuracy.md's bounds; **WRONG** otherwise), and each"
  " Pallas program's Triton calls must run over the forced block's grid. A class runs Pallas"
  " only if its forward+backward is at least `min_speedup` x faster than XLA's (or the spread"
  " between two timings of XLA's program, if larger) and its forward no slower beyond the"
  " same margin."
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="one tiny bfloat16 shape, two blocks: a dry run, not a measurement")
  p.add_argument("--out", default=str(_OUT), help="output directory (default: %(default)s)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="seconds for the whole sweep (default 60 on a GPU, 300 elsewhere)")
  p.add_argument("--dtypes", default=",".join(sweep_plan.DTYPES),
                 help="comma-separated, most important first (default: %(default)s)")
  p.add_argument("--layouts", default="last",
                 help="'last', 'first' or both, comma-separated (default: %(default)s)")
  p.add_argument("--min-speedup", type=float, default=sweep_plan.MIN_SPEEDUP,
                 help="XLA time / Pallas time a class needs to run Pallas (default: %(default)s)")
  p.add_argument("--install", metavar="FILE", default=None,
                 help="validate a candidate table and install it into --table; run nothing")
  p.add_argument("--table", default=str(tuning.TABLE_PATH),
                 help="the table --install writes (default: the package's)")
  return p


def install(candidate: str, target: str) -> int:
  """Validates ``candidate`` and merges it into ``target`` (by device kind)."""
  src = pathlib.Path(candidate)
  try:
    data = json.loads(src.read_text())
  except (OSError, ValueError) as e:
    print(f"error: {src}: cannot read a table ({e})", file=sys.stderr)
    return 2
  try:
    tuning.check_installable(data, str(src))
    tuning.clear_cache()
    current = tuning.load(target)
  except tuning.TableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  new_kinds = {m["device_kind"] for m in data["measurements"]}
  kept = [m for m in current["measurements"] if m["device_kind"] not in new_kinds]
  measurements = kept + data["measurements"]
  merged = {
    "schema_version": tuning.SCHEMA_VERSION,
    "provenance": {
      "measured_on_gpu": bool(measurements),
      "note": ("Measured by benchmarks/pallas_sweep.py on the GPUs named in each measurement;"
               " each measurement's provenance says how and when."),
      "written": time.strftime("%Y-%m-%d", time.gmtime()),
      "by": f"benchmarks/pallas_sweep.py --install {src.name}",
    },
    "measurements": measurements,
  }
  try:
    tuning.check_installable(merged, f"{target} (merged)")
  except tuning.TableError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = pathlib.Path(target)
  machine.write_json(out, merged)
  tuning.clear_cache()
  tuning.load(out)
  replaced = sorted(new_kinds & {m["device_kind"] for m in current["measurements"]})
  print(f"installed {src} into {out}: {', '.join(sorted(new_kinds))}"
        + (f" (replacing the previous {', '.join(replaced)})" if replaced else "")
        + f"; the table now holds {len(measurements)} measurement(s)")
  return 0


def _versions() -> dict:
  out = machine.dist_versions(_VERSIONS)
  # jaxlib's own module knows its version where its metadata is missing (a source build).
  out["jax"], out["jaxlib"] = jax.__version__, out["jaxlib"] or jaxlib.version.__version__
  out["python"] = platform.python_version()
  return out


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.install:
    return install(args.install, args.table)
  out = pathlib.Path(args.out).resolve()
  if out == ROOT / "gnorm" or (ROOT / "gnorm") in out.parents:
    _parser().error(f"--out {out} is inside the package: write elsewhere, then --install")
  backend = machine.backend()
  if backend != "gpu" and not args.quick:
    _parser().error(f"JAX's backend is {backend!r}: the sweep times Triton kernels on a CUDA"
                    " GPU (--quick runs a dry run here)")
  layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
  dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
  if not set(layouts) <= {"last", "first"} or not layouts:
    _parser().error(f"--layouts: 'last' and/or 'first', got {args.layouts!r}")
  if not set(dtypes) <= set(sweep_plan.DTYPES) or not dtypes:
    _parser().error(f"--dtypes: from {sweep_plan.DTYPES}, got {args.dtypes!r}")
  budget_s = args.budget_s if args.budget_s is not None else _BUDGET_S.get(backend, 300.0)
  clock = Budget(budget_s)
  faulthandler.dump_traceback_later(budget_s + _WATCHDOG_GRACE_S, exit=True)

  settings = Settings.for_run(args.quick, backend)
  info = machine.machine_info(machine.threads())
  info["table_versions"] = _versions()
  case_list = sweep_plan.cases(args.quick, dtypes, layouts)
  items = sweep_plan.work(case_list, args.quick)
  command = "python benchmarks/pallas_sweep.py " + " ".join(
    argv if argv is not None else sys.argv[1:])
  results = {
    "machine": info, "quick": args.quick, "budget_s": budget_s, "command": command.strip(),
    "method": METHOD, "min_speedup": args.min_speedup, "settings": dataclasses.asdict(settings),
    "plan": {"items": len(items), "cases": len(case_list),
             "candidates": sum(i.block is not None for i in items),
             "estimated_s": sum(sweep_plan.estimate_s(i) for i in items)},
  }
  results["copy_bandwidth"] = copy_bandwidth(settings)
  out.mkdir(parents=True, exist_ok=True)

  def write(r: dict) -> None:
    machine.write_json(out / "pallas_sweep.json", r)
    (out / "pallas_sweep.md").write_text(to_markdown(r))
    table = sweep_plan.candidate_table(r)
    try:  # never write a table that fails, nor lose the measurements for it
      tuning.validate(table, str(out / "tuning_table.json"))
    except tuning.TableError as e:
      print(f"error: the candidate table is not written: {e}", file=sys.stderr)
      return
    machine.write_json(out / "tuning_table.json", table)

  sweep = Sweep(case_list, settings, clock, results, write,
                results["copy_bandwidth"]["gb_per_s"])
  write(results)
  sweep.run(items)
  faulthandler.cancel_dump_traceback_later()
  print("\n".join(summary_lines(results)))
  print(f"wrote {out}/pallas_sweep.{{md,json}} and tuning_table.json in"
        f" {results['wall_s']:.0f} s (JAX backend {jax.default_backend()})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
