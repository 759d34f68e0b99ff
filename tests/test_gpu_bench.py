"""Keeps the GPU tools honest on the CPU: ``benchmarks/gpu_bench.py``'s quick mode and
``benchmarks/gpu_check.sh``'s dry run end to end (subprocesses, apart from the suite's strict
JAX configuration), and the loop form really chains its calls. No timing assertions: a tiny
shape on the CPU measures nothing useful."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gnorm_bench import device  # noqa: E402
from gnorm_bench import impls  # noqa: E402

sys.path.pop(0)
ALL = "gnorm,flax,gnorm_gpu_plan,gnorm_prev,gnorm_pallas,torch,torch_compile"


def _bench(tmp_path, *args):
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--quick", "--out", str(tmp_path),
     *args], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
    timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc, json.loads((tmp_path / "gpu_bench.json").read_text()), (
    tmp_path / "gpu_bench.md").read_text()


def test_quick_run_on_cpu(tmp_path):
  proc, r, md = _bench(tmp_path, "--only", ALL)
  timed = ["gnorm", "flax", "gnorm_gpu_plan", "gnorm_pallas"]
  assert r["machine"]["jax_backend"] == "cpu" and r["platform"] == "cpu"
  assert r["settings"]["impls"] == timed and r["not_measured"] == []
  # On the CPU "auto" runs "xla": the previous XLA program is gnorm's own, not timed twice.
  assert r["same_as"] == {"gnorm_prev": "gnorm"} and "gnorm_prev" in r["skipped"]
  for name in ("torch", "torch_compile"):
    assert r["skipped"][name] == "torch is timed on a CUDA GPU only"
  cb = r["copy_bandwidth"]  # 16 MiB in the quick mode, read + written per call
  assert cb["buffer_bytes"] == 2**24 and cb["calls_per_run"] == 11
  assert math.isclose(cb["gb_per_s"], 2 * cb["buffer_bytes"] / cb["median_s"] / 1e9)
  # The plan: each shape's loop cost before its first program, then phase by phase.
  assert r["plan"]["order"] == ["loop", "gnorm", "flax", "gnorm_gpu_plan", "gnorm_pallas"]
  assert r["plan"]["items"] == 2 + 2 * 2 * len(timed)

  assert [(c["label"], c["activation"]) for c in r["cases"]] == [
    ("2x8x8x64 bf16", None), ("2x8x8x64 bf16 +silu", "silu")]
  for c in r["cases"]:
    assert c["errors"] == {} and set(c["overhead"]) == {"fwd", "fwdbwd"}
    for d, moves in (("fwd", 2), ("fwdbwd", 5)):
      flax = c["times"][f"flax/{d}"]["net_s"]
      for name in timed:
        t = c["times"][f"{name}/{d}"]
        assert all(s > 0 and math.isfinite(s) for s in t["samples_s"]), (name, d)
        assert t["overhead_s"] == c["overhead"][d] > 0 and t["raw_s"] == t["median_s"]
        assert math.isclose(t["net_s"], max(t["raw_s"] - t["overhead_s"], 1e-12))
        assert t["calls_per_run"] == 5 and t["compile_s"] > 0
        assert math.isclose(t["pct_copy"], moves * c["x_bytes"] / t["net_s"] / (
          cb["gb_per_s"] * 1e9))
        assert math.isclose(t["vs_flax"], flax / t["net_s"])
        acc = c["accuracy"][f"{name}/{d}"]
        assert acc["ok"] and ("grad_vs_ref" in acc) == (d == "fwdbwd"), (name, d, acc)
        assert acc["bound"] == ("sanity" if name == "flax" else "docs/accuracy.md")
      fastest = c["fastest"][d]
      best = min(timed, key=lambda n: c["times"][f"{n}/{d}"]["net_s"])
      assert fastest["of_all"] == best
      gn = {"gnorm": "xla", "gnorm_gpu_plan": "xla_gpu", "gnorm_pallas": "pallas"}
      assert fastest["gnorm"] == gn[min(gn, key=lambda n: c["times"][f"{n}/{d}"]["net_s"])]
  s = r["summary"]
  for d in ("fwd", "fwdbwd"):
    assert sum(s[f"fastest/{d}"].values()) == 2
    assert math.isclose(s[f"flax/{d}"]["vs_flax_geomean"], 1.0)
  for title in ("## Forward (µs per call", "## Forward+backward", "## Summary", "| = gnorm |",
                "| Pallas |", "Copy bandwidth: **"):
    assert title in md, title
  assert " **WRONG** |" not in md and "target" not in md.lower()
  assert proc.stdout.startswith("| implementation | ×flax fwd |")  # the summary, last


def test_no_budget_measures_nothing_and_says_so(tmp_path):
  _, r, md = _bench(tmp_path, "--budget-s", "0", "--only", "gnorm,flax")
  assert r["plan"]["items"] == len(r["not_measured"]) == 10  # 2 loops + 2 cases x 2 x 2
  assert all(n["reason"].startswith("time budget") for n in r["not_measured"])
  assert all(c["times"] == {} for c in r["cases"]) and "not measured: 10 items" in md


def test_gpu_check_dry_run_on_cpu(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], cwd=ROOT,
                        env=dict(os.environ, PYTHON=sys.executable, GNORM_GPU_CHECK_DRY_RUN="1"),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  # The device machine returns at most 8 files, directly in OUT_DIR.
  assert sorted(f.name for f in out.iterdir()) == [
    "drop_in.json", "gpu_bench.json", "gpu_bench.md", "pytest.log", "steps.log", "summary.txt",
    "xla_gpu_plan.json"]
  summary = (out / "summary.txt").read_text()
  assert "jax backend cpu" in summary and "FAILED" not in summary
  for step in ("tests", "accuracy", "plan", "bench", "drop_in"):
    assert f"== {step}: ok, " in summary, step
  assert "| N(0, 1), float32 |" in summary and " passed" in (out / "pytest.log").read_text()
  steps = (out / "steps.log").read_text()
  assert "== xla_gpu_plan.md" in steps and "# gnorm drop-in model benchmark" in steps
  bench = json.loads((out / "gpu_bench.json").read_text())
  assert bench["settings"]["quick"] and bench["not_measured"] == [] and bench["cases"]
  assert json.loads((out / "drop_in.json").read_text())["model"]["quick"]
  plan = json.loads((out / "xla_gpu_plan.json").read_text())
  assert {r["impl"] for r in plan["rows"]} >= {"gnorm", "gnorm_prev", "flax", "gnorm_silu"}
  assert proc.stdout.rstrip().endswith("== all steps passed (tests: see above)")
  assert "| gnorm (auto) |" in proc.stdout.split("== total")[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="needs a machine without GPU")
def test_gpu_check_fails_loudly_without_a_gpu(tmp_path):
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                        cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "JAX sees no GPU" in proc.stdout
  assert [f.name for f in tmp_path.iterdir()] == ["summary.txt"]  # no step ran


def _f(x, g, b):
  return impls.jax_fn("gnorm", 4, "silu")(x, g, b)


def test_loop_chains_its_calls():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16), jnp.float32) + 0.5
  ct = jax.random.normal(jax.random.key(1), (2, 4, 4, 16), jnp.float32)
  g, b = jnp.full((16,), 1.1), jnp.full((16,), 0.1)
  n, u = 3, 2
  y0, last = jax.jit(device.fwd_loop(_f, n, u))(x, g, b)
  f, chained = jax.jit(_f), x
  for _ in range(device.calls(n, u)):
    chained = f(chained, g, b)
  np.testing.assert_allclose(y0, f(x, g, b), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(last, chained, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(last - y0))) > 1e-2  # not one call's result

  fb = impls.fwdbwd_of(_f)
  first, (xn, ctn, sg, sb) = jax.jit(device.fwdbwd_loop(fb, n, u))(x, g, b, ct)
  xc, cc, dgs, dbs = x, ct, 0.0, 0.0
  for _ in range(device.calls(n, u)):
    xc, cc, dg, db = jax.jit(fb)(xc, g, b, cc)
    dgs, dbs = dgs + dg, dbs + db
  for got, want in ((xn, xc), (ctn, cc), (sg, dgs), (sb, dbs)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(ctn - first[1]))) > 1e-2
  # Neither loop is folded away; the trivial one sets one element of each carried array.
  for fn, args in ((device.fwd_loop(_f, n, u), (x, g, b)),
                   (device.overhead_loop(n), ((x, ct), jnp.float32(1.0)))):
    assert "while" in jax.jit(fn).lower(*args).compile().as_text()
  same = jax.jit(device.overhead_loop(n))((x, ct), jnp.float32(2.0))
  np.testing.assert_array_equal(same[0], x.at[0, 0, 0, 0].set(2.0))
  np.testing.assert_array_equal(same[1], ct.at[0, 0, 0, 0].set(2.0))


def test_loop_sizes_and_forced_programs():
  s = device.GPU
  for est in (1e-7, 1e-5, 3e-4, 1.0):
    n, u = device.loop_size(est, s)
    assert u == s.unroll and s.min_calls <= device.calls(n, u) <= s.max_calls + u
  assert device.calls(*device.loop_size(5e-5, s)) == 101  # 5 ms of 50 us calls
  assert device.loop_size(1.0, device.QUICK) == (2, 2)
  # gnorm's variants compile different programs: the forced implementation applies.
  x, p = jax.ShapeDtypeStruct((2, 8, 8, 64), jnp.float32), jax.ShapeDtypeStruct((64,), jnp.float32)
  text = {n: jax.jit(impls.fwdbwd_of(impls.jax_fn(n, 32)))
          .lower(x, p, p, x).compile().as_text() for n in ("gnorm", "gnorm_gpu_plan", "gnorm_prev")}
  assert text["gnorm"] == text["gnorm_prev"] != text["gnorm_gpu_plan"]  # on the CPU: "xla"
