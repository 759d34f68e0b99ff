"""Keeps ``benchmarks/bench.py`` from rotting: its quick mode runs end to end.

No timing assertions: the quick mode's tiny shapes measure nothing useful.
It runs in a subprocess so that the suite's strict JAX configuration and
warning filters (and the benchmark's optional imports) stay apart.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def _expected_impls():
  names = ["gnorm", "flax"]
  for name, module in (("haiku", "haiku"), ("equinox", "equinox"), ("torch", "torch")):
    if importlib.util.find_spec(module) is not None:
      names.append(name)
  return names


def _run_bench(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(BENCH), "--quick", "--no-progress", "--out", str(tmp_path)]
    + list(args),
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]


def _check_fused_section(md, fused, expected):
  """The fused GroupNorm + SiLU table (issue #7): present, finite, plausible."""
  assert "## Fused GroupNorm + SiLU" in md
  header = next(line for line in md.splitlines() if line.startswith("| shape | pass"))
  titles = {"gnorm": ["gnorm fused", "gnorm + silu"], "flax": ["flax + silu"]}
  titles["torch"] = ["torch + silu", "torch/fused"]
  for name in expected:
    for title in titles.get(name, []):
      assert title in header, (title, header)
  assert "unfused/fused" in header
  assert "fused target" in md and "**WRONG**" not in md

  assert fused["activation"] == "silu" and fused["cases"], fused
  variants = ["gnorm_fused", "gnorm_unfused", "floor"]
  variants += [n for n in ("flax",) if n in expected]
  variants += ["torch_nchw", "torch_cl"] if "torch" in expected else []
  for case in fused["cases"]:
    for name in variants:
      for direction in ("fwd", "fwdbwd"):
        entry = case["times"][f"{name}/{direction}"]
        assert all(math.isfinite(t) and t > 0 for t in entry["samples_s"]), name
        assert 0 < entry["median_s"] < 60, name
    for name in [n for n in variants if not n.startswith("torch")]:
      assert case["memory"][name]["fwdbwd_temp_bytes"] >= 0, name
    for name, acc in case["accuracy"].items():
      assert acc["ok"], (name, acc)
    # Kept bytes: the fused backward holds x plus per-(N, G) statistics only;
    # silu applied after the norm keeps at least one more full-size array.
    fres = case["memory"]["gnorm_fused"]["residuals"]
    ures = case["memory"]["gnorm_unfused"]["residuals"]
    xb = fres["x_bytes"]
    assert xb > 0 and fres["total_bytes"] >= xb
    assert [s.endswith("(= x)") for s in fres["full_size_leaves"]] == [True], fres
    assert 0 < fres["bytes_excluding_x"] < xb / 4, fres
    assert ures["bytes_excluding_x"] >= xb, ures
    for name in variants:
      if name != "floor" and "residuals" in case["memory"].get(name, {}):
        assert case["memory"][name]["residuals"]["total_bytes"] > 0, name
  for key, entry in fused["summary"].items():
    assert entry["geomean"] > 0, key
  assert "gnorm_unfused/gnorm_fused/fwdbwd" in fused["summary"]
  checks = {c["target"]: c for c in fused["checks"]}
  assert checks["fused backward keeps only x and per-(N, G) statistics"]["met"]


def test_quick_benchmark_writes_sane_results(tmp_path):
  _run_bench(tmp_path)

  md = (tmp_path / "latest.md").read_text()
  results = json.loads((tmp_path / "latest.json").read_text())
  if importlib.util.find_spec("matplotlib") is not None:
    png = tmp_path / "latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  expected = _expected_impls()
  header = next(line for line in md.splitlines() if line.startswith("| shape | floor"))
  for name in expected:
    assert name in header, (name, header)
  assert "Machine:" in md and "jax " in md  # the machine it ran on

  assert results["cases"], results
  for case in results["cases"]:
    timed = {key.split("/")[0] for key in case["times"]}
    for name in expected + ["floor"]:
      assert name in timed or (
        name == "torch" and {"torch_nchw", "torch_cl"} <= timed
      ), name
    for key, entry in case["times"].items():
      assert all(math.isfinite(t) and t > 0 for t in entry["samples_s"]), key
      assert 0 < entry["median_s"] < 60, key
    for name in ("gnorm", "flax"):
      for direction in ("fwd", "fwdbwd"):
        assert 0 < case["compile_s"][name][direction] < 600
      assert case["memory"][name]["fwdbwd_temp_bytes"] >= 0
    # The numerical cross-check: every implementation agrees with the float64
    # reference, and gnorm's backward keeps x plus small statistics only.
    for name, acc in case["accuracy"].items():
      assert acc["ok"], (name, acc)
    gres = case["memory"]["gnorm"]["residuals"]
    assert 0 < gres["total_bytes"] and gres["x_bytes"] > 0
    # XLA's traffic estimate: the backward moves more bytes than the forward.
    for name in ("gnorm", "flax"):
      fwd = case["memory"][name]["fwd_bytes_accessed"]
      assert 0 < fwd < case["memory"][name]["fwdbwd_bytes_accessed"], name

  for key, entry in results["summary"].items():
    if key.startswith("compile/"):
      assert entry > 0, key
    else:
      assert entry["geomean"] > 0, key
  assert {"target", "met", "detail"} <= set(results["checks"][0])
  assert "## Memory traffic" in md and "traffic/flax/gnorm/fwdbwd" in results["summary"]
  # Two thread pools in one process: the run records how OpenMP threads idle.
  expected_policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
  assert results["machine"]["omp_wait_policy"] == expected_policy
  _check_fused_section(md, results["fused"], expected)


def test_quick_fused_section_alone(tmp_path):
  # The option to measure only the fused GroupNorm + SiLU section.
  _run_bench(tmp_path, "--sections", "fused", "--only", "gnorm")
  md = (tmp_path / "latest.md").read_text()
  results = json.loads((tmp_path / "latest.json").read_text())
  assert results["cases"] == [] and "## Forward" not in md
  assert results["settings"]["sections"] == ["fused"]
  _check_fused_section(md, results["fused"], ["gnorm"])
