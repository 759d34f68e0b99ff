"""Keeps ``benchmarks/bench.py`` working: its quick mode runs end to end (in a subprocess, apart
from the suite's strict JAX configuration) and writes sane reports. No timing comparisons: the
quick shape measures nothing useful."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gnorm_bench import common  # noqa: E402

sys.path.pop(0)


def _run_bench(tmp_path, *args):
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--no-progress", "--out",
     str(tmp_path), *args],
    cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
    timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return (tmp_path / "latest.md").read_text(), json.loads((tmp_path / "latest.json").read_text())


def _expected():
  return ["gnorm", "flax"] + [n for n, m in (("haiku", "haiku"), ("equinox", "equinox"),
                                             ("torch", "torch")) if importlib.util.find_spec(m)]


def _check_case(case, names):
  """Every variant timed, checked, measured; the bandwidth is bytes / median time."""
  x_bytes = math.prod(case["shape"]) * {"float32": 4, "bfloat16": 2}[case["dtype"]]
  variants = [v for n in names for v in (("torch_nchw", "torch_cl") if n == "torch" else (n,))]
  assert sorted(k.split("/")[0] for k in case["times"]) == sorted(2 * (variants + ["floor"]))
  for key, e in case["times"].items():
    assert all(math.isfinite(t) and t > 0 for t in e["samples_s"]) and 0 < e["median_s"] < 60
    bw = case["bandwidth"][key]
    assert math.isclose(bw["gb_per_s"], bw["bytes"] / e["median_s"] / 1e9), key
    # x and y (in the dtype each writes: flax promotes bfloat16 to float32); fwd+bwd twice that.
    one = case["bandwidth"][key.split("/")[0] + "/fwd"]["bytes"]
    assert one in (2 * x_bytes, 3 * x_bytes) and bw["bytes"] in (one, 2 * one), key
  for name in variants:
    acc = case["accuracy"][name]
    assert acc["ok"], (name, acc)
    assert acc["bound"] == ("docs/accuracy.md" if common.documented(name) else "sanity")
    assert case["memory"][name]["residuals"]["total_bytes"] > 0
  for name in (v for v in variants if not v.startswith("torch")):
    mem = case["memory"][name]
    assert mem["fwdbwd_temp_bytes"] >= 0 and 0 < mem["fwd_bytes_accessed"] < mem[
      "fwdbwd_bytes_accessed"], name
    assert 0 < case["compile_s"][name]["fwd"] < 600 and 0 < case["compile_s"][name]["fwdbwd"]
  assert case["errors"] == {}


def test_quick_benchmark_writes_sane_results(tmp_path):
  md, r = _run_bench(tmp_path)
  names = _expected()
  m = r["machine"]
  assert m["jax_backend"] == "cpu" and m["device"] == "cpu"
  assert f"gnorm {m['versions']['gnorm']} at commit {m['git']}" in "\n".join(md.splitlines()[:4])
  assert "Machine: " in md and "Copy bandwidth: **" in md
  assert m["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
  cb = m["copy_bandwidth"]  # 64 MiB on the CPU, read + written
  assert cb["bytes_moved"] == 2 * cb["buffer_bytes"] == 2**27
  assert math.isclose(cb["gb_per_s"], cb["bytes_moved"] / cb["median_s"] / 1e9)
  assert "interpreter on cpu" in r["skipped"]["gnorm_pallas"]

  [case] = r["cases"]
  _check_case(case, names)
  # gnorm's backward keeps x and per-(N, G) statistics; flax's at least one more full-size array.
  kept = case["memory"]["gnorm"]["residuals"]
  assert kept["full_size_leaves"] == ["bfloat16[2, 8, 8, 64] (= x)"], kept
  assert 0 < kept["bytes_excluding_x"] < kept["x_bytes"] / 4
  assert case["memory"]["flax"]["residuals"]["bytes_excluding_x"] >= kept["x_bytes"]
  s = r["summary"]
  for name in names:
    for d in ("fwd", "fwdbwd"):
      assert s[f"{name}/floor/{d}"]["geomean"] > 0 and s[f"{name}/copy/{d}"]["geomean"] > 0
      if name != "gnorm":
        assert math.isclose(s[f"{name}/gnorm/{d}"]["geomean"],
                            s[f"{name}/gnorm/{d}"]["per_case"][0]), name
  assert s["traffic/flax/gnorm/fwdbwd"]["geomean"] > 1  # flax moves more bytes
  assert s["compile/flax/gnorm/fwd"]["geomean"] > 0

  fused = r["fused"]
  [fcase] = fused["cases"]
  _check_case(fcase, ["gnorm", "gnorm_unfused", "flax"] + [n for n in names if n == "torch"])
  fkept = fcase["memory"]["gnorm"]["residuals"]  # the fused SiLU keeps nothing more
  assert fkept["full_size_leaves"] == kept["full_size_leaves"]
  assert fcase["memory"]["gnorm_unfused"]["residuals"]["bytes_excluding_x"] >= kept["x_bytes"]
  assert fused["summary"]["gnorm_unfused/gnorm/fwdbwd"]["geomean"] > 0

  lines = md.splitlines()
  for title in ("## Forward", "## Bandwidth", "## Compile time", "## Memory", "## Memory traffic",
                "## Accuracy", "## Fused GroupNorm + SiLU", "## Fused: Forward + backward",
                "## Fused: Memory"):
    assert any(line.startswith(title) for line in lines), title
  header = next(line for line in lines if line.startswith("| shape | floor |"))
  assert all(f"| {n} |" in header or f"| {n} " in header for n in names), header
  fused_header = lines[lines.index("## Fused: Forward") + 2]
  assert "| gnorm fused | gnorm + silu | flax + silu |" in fused_header
  assert "**WRONG**" not in md and "target" not in md.lower()  # the targets are in the docs
  if importlib.util.find_spec("matplotlib"):
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_pallas_named_runs_in_the_interpreter(tmp_path):
  # Named, the Pallas kernels run off a GPU (in Pallas's interpreter): their plumbing.
  md, r = _run_bench(tmp_path, "--only", "gnorm,gnorm_pallas")
  assert r["skipped"] == {} and r["settings"]["sections"] == ["main", "fused"]
  for section in (r, r["fused"]):
    _check_case(section["cases"][0], ["gnorm", "gnorm_pallas"] + (
      ["gnorm_unfused"] if section is not r else []))
    assert section["summary"]["gnorm_pallas/gnorm/fwdbwd"]["geomean"] > 0
  assert "gnorm pallas fused" in md and "gnorm_pallas/gnorm" in md


def test_case_sets():
  main, fused = common.CASE_SETS["sd-unet"]
  assert main == fused and [c.label for c in main] == [
    f"{s} G=32{d}" for s in ("2x64x64x320", "2x32x32x640", "2x16x16x1280", "8x56x56x256")
    for d in ("", " bfloat16")]
  assert [c.label for c in common.CASE_SETS["full"][0]][0] == "128x26x26x16 G=4"
  assert common.GPU_SHAPES[4:] == ((16, 64, 64, 320), (32, 32, 32, 640), (1, 512, 512, 128))


def test_reference_and_bounds():
  from tests.reference import group_norm_ref  # noqa: PLC0415 - an independent reference

  case = common.Case((2, 4, 4, 8), 4, "bfloat16")
  data = common.make_data(case)
  ref = common.reference(case, data)
  y, dx, dg, db = ref
  np.testing.assert_allclose(y, group_norm_ref(data["x"], 4, data["gamma"], data["beta"]),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(db, data["ct"].sum(axis=(0, 1, 2)), rtol=1e-6)
  silu = common.reference(case, data, "silu")[0]
  np.testing.assert_allclose(silu, y / (1 + np.exp(-y)), rtol=1e-12)
  assert common.check("gnorm", ref, ref, "bfloat16")["ok"]
  bad = common.check("gnorm", (y + 0.1, dx, dg, db), ref, "bfloat16")
  assert not bad["ok"] and bad["bound"] == "docs/accuracy.md"
  # The same error is within the sanity bound everyone else is held to; a NaN is not.
  assert common.check("flax", (y + 0.01, dx, dg, db), ref, "bfloat16")["ok"]
  assert not common.check("flax", (y, dx * np.nan, dg, db), ref, "bfloat16")["ok"]
