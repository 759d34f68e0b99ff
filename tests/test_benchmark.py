"""Keeps ``benchmarks/`` from rotting: the benchmark's quick mode and the GPU
check's CPU dry run run end to end.

No timing assertions: the quick mode's tiny shapes measure nothing useful.
They run in subprocesses so that the suite's strict JAX configuration and
warning filters (and the benchmark's optional imports) stay apart.
"""

import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from gnorm._src.backends import tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


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


def _check_bandwidth(case, variants):
  """Bytes = x and y (forward), twice that (forward+backward), in the dtypes each
  variant reads and writes; bandwidth = bytes / median time."""
  x_bytes = math.prod(case["shape"]) * {"float32": 4, "bfloat16": 2}[case["dtype"]]
  for name in variants:
    fwd, fwdbwd = case["bandwidth"][f"{name}/fwd"], case["bandwidth"][f"{name}/fwdbwd"]
    # y is x's dtype, or float32 where flax promotes to its parameters' dtype.
    assert fwd["bytes"] in (2 * x_bytes, 3 * x_bytes), (name, fwd)
    assert fwdbwd["bytes"] == 2 * fwd["bytes"], (name, fwdbwd)
    for d, e in (("fwd", fwd), ("fwdbwd", fwdbwd)):
      t = case["times"][f"{name}/{d}"]["median_s"]
      assert math.isclose(e["gb_per_s"], e["bytes"] / t / 1e9, rel_tol=1e-9), (name, d)
      assert math.isfinite(e["fraction_of_copy"]) and e["fraction_of_copy"] > 0, (name, d)
  if "flax" in variants and case["dtype"] == "bfloat16":
    assert case["bandwidth"]["flax/fwd"]["bytes"] == 3 * x_bytes


def _check_copy_bandwidth(results):
  cb = results["machine"]["copy_bandwidth"]
  assert cb["bytes_moved"] == 2 * cb["buffer_bytes"] == 2 * 2**26, cb  # 64 MiB on the CPU
  assert math.isclose(cb["gb_per_s"], cb["bytes_moved"] / cb["median_s"] / 1e9), cb
  assert cb["samples_s"] and all(t > 0 for t in cb["samples_s"]), cb


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
    _check_bandwidth(case, variants)
  for key, entry in fused["summary"].items():
    assert entry["geomean"] > 0, key
  assert "gnorm_unfused/gnorm_fused/fwdbwd" in fused["summary"]
  assert "gnorm_fused/copy/fwdbwd" in fused["summary"] and "### Fused bandwidth" in md
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
  assert "JAX backend `cpu`, device `cpu`" in md and "Copy bandwidth: **" in md
  machine = results["machine"]
  # The code it measured: the version, which changes only at a release, and the commit.
  assert machine["git"] and f"gnorm {machine['versions']['gnorm']} at commit {machine['git']}" in md
  assert machine["jax_backend"] == "cpu" and machine["device"] == "cpu"
  _check_copy_bandwidth(results)

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
    # Achieved bandwidth, for every timed variant.
    _check_bandwidth(case, sorted({key.split("/")[0] for key in case["times"]}))

  for key, entry in results["summary"].items():
    if key.startswith("compile/"):
      assert entry > 0, key
    else:
      assert entry["geomean"] > 0, key
  assert {"target", "met", "detail"} <= set(results["checks"][0])
  assert "## Memory traffic" in md and "traffic/flax/gnorm/fwdbwd" in results["summary"]
  assert "## Bandwidth" in md
  for name in expected + ["floor"]:
    assert f"{name}/copy/fwd" in results["summary"], name
  # Two thread pools in one process: the run records how OpenMP threads idle.
  expected_policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
  assert results["machine"]["omp_wait_policy"] == expected_policy
  _check_fused_section(md, results["fused"], expected)
  # Off a GPU the Pallas kernels run in the interpreter: skipped unless named.
  assert "interpreter on cpu" in results["skipped"]["gnorm_pallas"], results["skipped"]
  for case in results["cases"] + results["fused"]["cases"]:
    assert not any(key.startswith("gnorm_pallas") for key in case["times"]), case["label"]
  _check_pallas_targets_not_applicable(md, results)


def _check_pallas_targets_not_applicable(md, results):
  """Issue #13's four targets: rows of the two sections' checks, n/a on the CPU."""
  rows = [
    c for c in results["checks"] + results["fused"]["checks"] if c["target"].startswith("issue #13")
  ]
  assert len(rows) == 4, rows
  for row in rows:
    assert row["met"] is None and row["detail"].startswith("not applicable: not on a GPU"), row
    assert f"| {row['target']} | n/a | {row['detail']} |" in md, row


def test_quick_pallas_named_explicitly_runs_on_cpu(tmp_path):
  # Named in --only, gnorm's Pallas kernels run in the interpreter: the
  # plumbing (columns, ratios, accuracy, targets) on one tiny shape.
  _run_bench(tmp_path, "--only", "gnorm,gnorm_pallas", "--sections", "main,fused")
  md = (tmp_path / "latest.md").read_text()
  results = json.loads((tmp_path / "latest.json").read_text())
  assert "gnorm_pallas" not in results["skipped"], results["skipped"]
  for section, name in ((results, "gnorm_pallas"), (results["fused"], "gnorm_pallas_fused")):
    base = "gnorm" if section is results else "gnorm_fused"
    for case in section["cases"]:
      for d in ("fwd", "fwdbwd"):
        assert case["times"][f"{name}/{d}"]["median_s"] > 0, (name, d)
      acc = case["accuracy"][name]
      assert acc["ok"] and acc["max_abs_dy_vs_gnorm"] < 1e-2, (name, acc)
      assert case["errors"] == {} and case["memory"][name]["fwdbwd_temp_bytes"] >= 0
      _check_bandwidth(case, [name])
    for d in ("fwd", "fwdbwd"):
      assert section["summary"][f"{name}/{base}/{d}"]["geomean"] > 0, (name, d)
  header = next(line for line in md.splitlines() if line.startswith("| shape | floor"))
  assert "| gnorm_pallas |" in header and "gnorm_pallas/gnorm" in header, header
  fused_header = next(line for line in md.splitlines() if line.startswith("| shape | pass"))
  assert "gnorm pallas fused" in fused_header and "pallas/fused" in fused_header
  assert md.count("< 1 means the kernels are faster") == 2
  _check_fused_section(md, results["fused"], ["gnorm"])
  _check_pallas_targets_not_applicable(md, results)


def test_quick_fused_section_alone(tmp_path):
  # The option to measure only the fused GroupNorm + SiLU section.
  _run_bench(tmp_path, "--sections", "fused", "--only", "gnorm")
  md = (tmp_path / "latest.md").read_text()
  results = json.loads((tmp_path / "latest.json").read_text())
  assert results["cases"] == [] and "## Forward" not in md
  assert results["settings"]["sections"] == ["fused"]
  _check_fused_section(md, results["fused"], ["gnorm"])


def _bench_package():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import gnorm_bench.cases
  finally:
    sys.path.pop(0)
  return gnorm_bench.cases


def test_sd_unet_cases():
  # What a GPU check measures (--cases sd-unet), in both sections.
  cases = _bench_package()
  main, fused = cases.CASE_SETS["sd-unet"]
  assert main == fused
  assert [c.label for c in main] == [
    f"{s} G=32{d}"
    for s in ("2x64x64x320", "2x32x32x640", "2x16x16x1280", "8x56x56x256")
    for d in ("", " bfloat16")
  ]
  assert cases.CASE_SETS["quick"] == (cases.QUICK_CASES, cases.QUICK_FUSED_CASES)


def _gpu_check(out, **env):
  return subprocess.run(
    ["bash", str(GPU_CHECK), str(out)],
    cwd=ROOT,
    env=dict(os.environ, PYTHON=sys.executable, **env),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_on_cpu(tmp_path):
  # Every step of the GPU check, on the CPU with tiny settings.
  out = tmp_path / "gpu_check_out"
  proc = _gpu_check(out, GNORM_GPU_CHECK_DRY_RUN="1")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "== all steps passed" in proc.stdout
  # The machine that runs it takes back at most 8 files, 2 folder levels deep.
  files = list(out.rglob("*"))
  assert len(files) <= 8 and all(f.is_file() and f.parent == out for f in files), files
  names = {f.name for f in files}
  assert {"summary.txt", "pytest.log", "steps.log", "gpu_bench.md", "gpu_bench.json",
          "drop_in.json", "xla_gpu_plan.json", "tuning_table.json"} == names, names
  summary = (out / "summary.txt").read_text()
  assert "jax backend cpu" in summary and "FAILED" not in summary
  assert " passed" in (out / "pytest.log").read_text()
  assert "| N(0, 1), float32 |" in summary  # the accuracy table
  # Each step's time, the xla_gpu_plan step run beside the tests.
  for step in ("tests (pytest)", "accuracy table", "XLA's GPU programs", "Pallas tile sweep",
               "device-time benchmark", "drop-in model benchmark", "targets of issues 19 and 20"):
    assert f"== {step}" in summary and f"{step}" in summary.split("== step seconds:")[1], step
  steps_log = (out / "steps.log").read_text()
  for step in ("device-time benchmark", "drop-in model benchmark", "Pallas tile sweep",
               "xla_gpu_plan.md", "pallas_sweep.md"):
    assert f"== {step}" in steps_log, step
  # The sweep's decisions in the summary; its candidate table a valid dry run's.
  assert "2x8x8x64 bf16 NHWC [<1M, tiled]: " in summary
  table = json.loads((out / "tuning_table.json").read_text())
  tuning.validate(table)
  assert [m["dry_run"] for m in table["measurements"]] == [True]
  bench = json.loads((out / "gpu_bench.json").read_text())
  assert bench["settings"]["quick"] and bench["not_measured"] == [] and bench["cases"]
  assert json.loads((out / "drop_in.json").read_text())["model"]["quick"]
  # Every target of issues 19 and 20, last on stdout: not applicable off a GPU.
  tail = proc.stdout[proc.stdout.index("Targets of issues 19 and 20"):]
  for tid in ("19a-fwd", "19a-fwdbwd", "19b", "19c-fwd", "19c-fwdbwd", "19d", "19m-memory",
              "19m-speed", "20a", "20b", "20c", "20d", "20e", "20f", "20m"):
    assert f"\n{tid} " in tail and f"\n{tid} " in summary, tid
  assert "targets: 0 met, 0 NOT MET, 15 not applicable or not decided" in tail


@pytest.mark.skipif(
  shutil.which("bash") is None or shutil.which("nvidia-smi") is not None,
  reason="needs bash and a machine without a GPU",
)
def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
  proc = _gpu_check(tmp_path, GNORM_GPU_CHECK_DRY_RUN="0")
  assert proc.returncode != 0
  assert "JAX sees no GPU" in proc.stdout
  assert [f.name for f in tmp_path.iterdir()] == ["summary.txt"]  # no step ran
