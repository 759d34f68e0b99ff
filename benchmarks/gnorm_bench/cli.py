"""The command line: flags, the order of the run, and the files it writes."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import gnorm_bench

from . import machine
from .cases import CASE_SETS
from .cases import SECTIONS
from .report_md import to_markdown
from .report_png import to_png
from .run import ALL_IMPLS
from .run import available
from .run import run
from .run import run_fused

_RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=gnorm_bench.__doc__.split("\n\n", 1)[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="tiny shapes, 2 rounds: a smoke test (< 30 s), not a measurement"
    " (with --cases: those shapes, with the quick settings)",
  )
  p.add_argument(
    "--cases",
    choices=sorted(CASE_SETS),
    default=None,
    help="shapes of both sections: full (9 shapes; the fused section 4), sd-unet (the"
    " SD-UNet shapes 2x64x64x320, 2x32x32x640, 2x16x16x1280 and 8x56x56x256, G=32, in"
    " float32 and bfloat16, in both sections), quick (one tiny bfloat16 shape);"
    " default full, quick with --quick",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="timing rounds per shape (default 20; 2 with --quick)",
  )
  p.add_argument(
    "--out",
    default=str(_RESULTS),
    help="output directory (default: benchmarks/results)",
  )
  p.add_argument(
    "--only",
    default=None,
    help="comma-separated implementations: gnorm,gnorm_pallas,flax,haiku,equinox,torch"
    " (the floor always runs; default all of them). gnorm_pallas (gnorm's Pallas"
    " kernels; in the fused section gnorm_pallas_fused) is timed on a GPU only, unless"
    " named here: elsewhere the kernels run in Pallas's interpreter",
  )
  p.add_argument(
    "--sample-ms",
    type=float,
    default=None,
    help="target duration of one timing sample (default 25; 2 with --quick)",
  )
  p.add_argument(
    "--compile-reps",
    type=int,
    default=None,
    help="fresh compiles per function, median taken (default 3; 1 with --quick)",
  )
  p.add_argument(
    "--sections",
    default=",".join(SECTIONS),
    help="comma-separated sections to run: main (the GroupNorm comparison),"
    " fused (GroupNorm + SiLU, fused vs unfused); default both",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark as ``argv`` says and writes ``latest.{md,json,png}``."""
  p = _parser()
  args = p.parse_args(argv)

  sections = {s.strip() for s in args.sections.split(",") if s.strip()}
  if not sections or sections - set(SECTIONS):
    p.error(f"unknown section(s) {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")

  # Named implementations run even where they would be skipped by default
  # (the Pallas kernels off a GPU).
  explicit = {s.strip() for s in (args.only or "").split(",") if s.strip()}
  only = explicit or {n for n in ALL_IMPLS if n != "floor"}
  unknown = only - set(ALL_IMPLS)
  if unknown:
    p.error(f"unknown implementation(s) {sorted(unknown)}; choose from {ALL_IMPLS}")
  jax_backend = machine.backend()
  # Only look for torch (importing it) where it was asked for.
  torch_dev, torch_why = machine.torch_device(jax_backend) if "torch" in only else (None, "")
  impls, skipped = available(only, torch_dev, torch_why, backend=jax_backend, explicit=explicit)
  for n, why in skipped.items():
    print(f"skipping {n}: {why}", file=sys.stderr)
  torch_dev = torch_dev if "torch" in impls else None

  case_set = args.cases or ("quick" if args.quick else "full")
  cases, fused_cases = CASE_SETS[case_set]
  rounds = args.rounds or (2 if args.quick else 20)
  sample_s = (args.sample_ms or (2.0 if args.quick else 25.0)) / 1e3
  compile_reps = args.compile_reps or (1 if args.quick else 3)
  progress = not args.no_progress

  t0 = time.perf_counter()
  n_threads = machine.threads()
  machine.configure_torch(torch_dev, n_threads)
  info = machine.machine_info(n_threads, torch_dev)
  # Measured once, before the sections: every bandwidth figure is a fraction of it.
  info["copy_bandwidth"] = machine.copy_bandwidth(jax_backend, max(3, min(rounds, 10)), sample_s)
  copy_gb_s = info["copy_bandwidth"]["gb_per_s"]
  results = {"machine": info, "cases": [], "summary": {}, "checks": []}
  if "main" in sections:
    results.update(
      run(
        cases,
        impls,
        rounds,
        sample_s,
        compile_reps,
        copy_gb_s=copy_gb_s,
        torch_device=torch_dev,
        progress=progress,
        backend=jax_backend,
      )
    )
  if "fused" in sections:
    if "gnorm" in impls:
      results["fused"] = run_fused(
        fused_cases,
        impls,
        rounds,
        sample_s,
        copy_gb_s=copy_gb_s,
        torch_device=torch_dev,
        progress=progress,
        backend=jax_backend,
      )
    else:
      print("skipping the fused section: it needs gnorm", file=sys.stderr)
  info["loadavg_end"] = machine.loadavg()
  results["skipped"] = skipped
  results["settings"] = {
    "rounds": rounds,
    "sample_s": sample_s,
    "compile_reps": compile_reps,
    "quick": args.quick,
    "sections": [s for s in SECTIONS if s in sections],
    "wall_s": time.perf_counter() - t0,
    "cases": case_set,
  }
  command = (
    "python benchmarks/bench.py"
    + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
  )
  os.makedirs(args.out, exist_ok=True)
  md = to_markdown(results, command.strip())
  with open(os.path.join(args.out, "latest.md"), "w") as fh:
    fh.write(md)
  machine.write_json(pathlib.Path(args.out) / "latest.json", results)
  png = to_png(results, os.path.join(args.out, "latest.png"))
  print(md)
  print(
    f"\nwrote {args.out}/latest.{{md,json{',png' if png else ''}}} "
    f"in {results['settings']['wall_s']:.0f} s",
    file=sys.stderr,
  )
  return results
