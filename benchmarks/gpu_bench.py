"""Device time of gnorm's GroupNorm on a GPU against flax, equinox, haiku and torch (issues 19
and 20), and the issues' targets.

Usage::

  python benchmarks/gpu_bench.py [--quick] [--out DIR] [--budget-s S] [--only a,b,...]
                                 [--no-progress]
  python benchmarks/gpu_bench.py --summarize DIR   # every target, from DIR/gpu_bench.json
                                                   # and DIR/drop_in.json (drop_in.py's)

Writes ``gpu_bench.md`` and ``gpu_bench.json`` to ``--out`` (default
``benchmarks/results/gpu``), also while it runs; prints the target summary last. The
method is in ``gnorm_bench/device_loop.py`` (JAX), ``device_torch.py`` (torch) and the
report's "Method" section; the order of the work in ``device_cases.py``. ``--quick``: one
tiny bfloat16 shape, plain and with SiLU, for a dry run on the CPU (torch is timed on a
CUDA GPU only, gnorm's Pallas kernels off a GPU only when named in ``--only``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
from gnorm_bench import device_run
from gnorm_bench import machine
from gnorm_bench.device_cases import ALL_IMPLS
from gnorm_bench.device_cases import TORCH_IMPLS
from gnorm_bench.device_report import to_markdown
from gnorm_bench.device_targets import TARGETS
from gnorm_bench.device_targets import kernel_targets
from gnorm_bench.device_targets import model_targets
from gnorm_bench.device_targets import summary_lines
from gnorm_bench.device_timing import Budget
from gnorm_bench.device_timing import Settings
from gnorm_bench.device_timing import copy_bandwidth
from gnorm_bench.device_torch import COMPILE_LAYOUT

ROOT = pathlib.Path(__file__).resolve().parents[1]
_OUT = ROOT / "benchmarks" / "results" / "gpu"
_BUDGET_S = {"gpu": 150.0}  # elsewhere 600: a CPU run is a dry run


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="one tiny bfloat16 shape, few calls: a dry run, not a measurement")
  p.add_argument("--out", default=str(_OUT), help="output directory (default: %(default)s)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="seconds for the whole benchmark (default 150 on a GPU, 600 elsewhere);"
                 " what does not fit is listed as not measured")
  p.add_argument("--only", default=None,
                 help="comma-separated implementations (default all): " + ",".join(ALL_IMPLS)
                 + "; 'torch' means all three torch ones")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--summarize", metavar="DIR", default=None,
                 help="print every target from DIR/gpu_bench.json and DIR/drop_in.json, run"
                 " nothing")
  return p


def _load(path: pathlib.Path) -> tuple[dict | None, str]:
  """The results in ``path``, or None and why not (missing, or unreadable)."""
  if not path.exists():
    return None, f"no {path.name}"
  try:
    return json.loads(path.read_text()), ""
  except (OSError, ValueError) as e:
    return None, f"{path.name} unreadable ({type(e).__name__}: {e})"


def summarize(directory: str) -> int:
  """Prints every target of issues 19 and 20 from a GPU check's output directory."""
  d = pathlib.Path(directory)
  bench, why_bench = _load(d / "gpu_bench.json")
  drop_in, why_drop_in = _load(d / "drop_in.json")
  order = [tid for tid, _, _ in TARGETS]
  rows = kernel_targets(bench) if bench else []
  if not bench:
    rows = [{"id": t, "met": None, "summary": f"not measured ({why_bench})"}
            for t in order if not t.startswith(("19m", "20m"))]
  rows += model_targets(drop_in, f"{why_drop_in} (drop_in.py did not finish)")
  rows.sort(key=lambda r: order.index(r["id"]))
  print("Targets of issues 19 and 20 (met / NOT MET / n/a = not applicable or not decided):")
  for line in summary_lines(rows):
    print(line)
  if bench:
    nm, wall = len(bench.get("not_measured", [])), bench.get("wall_s", 0.0)
    print(f"gpu_bench: {bench['plan']['items'] - nm} of {bench['plan']['items']} items in"
          f" {wall:.0f} s on {bench['machine']['device']}; details in gpu_bench.md")
  return 0


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.summarize:
    return summarize(args.summarize)
  backend = machine.backend()
  explicit = set()
  for name in (s.strip() for s in (args.only or "").split(",")):
    if name:
      explicit |= set(TORCH_IMPLS) if name == "torch" else {name}
  unknown = explicit - set(ALL_IMPLS)
  if unknown:
    _parser().error(f"unknown implementation(s) {sorted(unknown)}; choose from {ALL_IMPLS}")
  names = [n for n in ALL_IMPLS if n in explicit] if explicit else list(ALL_IMPLS)
  skipped = device_run.skipped_impls(names, backend, explicit, args.quick)
  for name, why in skipped.items():
    print(f"skipping {name}: {why}", file=sys.stderr)
  impls = [n for n in names if n not in skipped]
  settings = Settings.for_run(args.quick, backend)
  budget = args.budget_s if args.budget_s is not None else _BUDGET_S.get(backend, 600.0)
  clock = Budget(budget)  # the whole benchmark's: the setup below counts too

  torch_dev = "cuda" if set(impls) & set(TORCH_IMPLS) else None
  info = machine.machine_info(machine.threads(), torch_dev)
  info["versions"].update(machine.dist_versions(("triton", "optax")))
  results = {
    "machine": info,
    "settings": {**dataclasses.asdict(settings), "budget_s": budget, "quick": args.quick,
                 "impls": impls},
    "skipped": skipped,
    "torch_compile_layout": COMPILE_LAYOUT,
    "copy_bandwidth": copy_bandwidth(settings),
  }
  command = "python benchmarks/gpu_bench.py " + " ".join(
    argv if argv is not None else sys.argv[1:])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  def write(r: dict) -> None:
    r["targets"] = kernel_targets(r)
    md = to_markdown(r, command.strip())
    machine.write_json(out / "gpu_bench.json", r)
    (out / "gpu_bench.md").write_text(md)

  cfg = device_run.RunConfig(impls, settings, args.quick,
                             not args.no_progress, write, clock)
  device_run.run(cfg, results)
  info["loadavg_end"] = machine.loadavg()
  write(results)
  print("\n".join(summary_lines(results["targets"])))
  print(f"wrote {out}/gpu_bench.{{md,json}} in {results['wall_s']:.0f} s"
        f" (JAX backend {jax.default_backend()})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
