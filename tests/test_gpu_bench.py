"""Keeps ``benchmarks/gpu_bench.py`` (issues 19 and 20's device-time benchmark) honest on the
CPU: its quick mode runs end to end, the target logic is right on synthetic timings, and
the timed loop really chains its calls.

No timing assertions: the quick mode's tiny shape on the CPU measures nothing useful. The
runs are subprocesses, so that the suite's strict JAX configuration stays apart.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gnorm_bench import device_loop  # noqa: E402
from gnorm_bench import device_profile  # noqa: E402
from gnorm_bench import device_targets  # noqa: E402
from gnorm_bench.device_timing import Settings  # noqa: E402
from gnorm_bench.device_timing import loop_size  # noqa: E402

sys.path.pop(0)

GNORM_VARIANTS = ("gnorm", "gnorm_prev", "gnorm_pallas")
KERNEL_IDS = [t for t, _, _ in device_targets.TARGETS if t not in device_targets.MODEL_IDS]


def _run(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(tmp_path), *args],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((tmp_path / "gpu_bench.json").read_text())
  return proc, results, (tmp_path / "gpu_bench.md").read_text()


def _torch_reason():
  if importlib.util.find_spec("torch") is None:
    return "torch not importable"
  return "torch.cuda.is_available() is False"


def test_quick_run_on_cpu(tmp_path):
  names = "gnorm,gnorm_pallas,gnorm_prev,flax,equinox,haiku,torch"
  proc, r, md = _run(tmp_path, "--only", names)
  haiku = importlib.util.find_spec("haiku") is not None
  expected = [*GNORM_VARIANTS, "flax", "equinox"] + (["haiku"] if haiku else [])
  assert r["machine"]["jax_backend"] == "cpu" and r["not_measured"] == []
  # torch: timed on a CUDA GPU only, and why not here is recorded.
  for name in ("torch_nchw", "torch_cl", "torch_compile"):
    assert r["skipped"][name].startswith(_torch_reason()), r["skipped"]
  if not haiku:
    assert r["skipped"]["haiku"] == "haiku not importable"
  # The copy bandwidth of the same run: 16 MiB in the quick mode, read + written.
  cb = r["copy_bandwidth"]
  assert cb["bytes_moved_per_call"] == 2 * cb["buffer_bytes"] == 2 * 2**24, cb
  assert math.isclose(cb["gb_per_s"], cb["bytes_moved_per_call"] / cb["median_s"] / 1e9)

  assert [c["activation"] for c in r["cases"]] == [None, "silu"]
  for case in r["cases"]:
    assert case["errors"] == {}, case["errors"]
    for d, moves in (("fwd", 2), ("fwdbwd", 5)):
      overhead = case["overhead"][d]["per_call_s"]
      assert overhead > 0
      for name in expected:
        t = case["times"][f"{name}/{d}"]
        assert all(s > 0 and math.isfinite(s) for s in t["samples_s"]), (name, d)
        # Raw and net beside each other; the loop's own cost measured in the same run.
        assert t["overhead_s"] == overhead and t["raw_s"] == t["median_s"], (name, d)
        assert math.isclose(t["net_s"], max(t["raw_s"] - overhead, 1e-12)), (name, d)
        assert t["calls_per_run"] == 5 and t["loop"] == [2, 2] and t["carry"]["finite"]
        pct = moves * case["x_bytes"] / t["net_s"] / (cb["gb_per_s"] * 1e9)
        assert math.isclose(t["pct_copy"], pct), (name, d)
        acc = case["accuracy"][f"{name}/{d}"]
        assert acc["ok"] and acc["y_vs_ref"] < 3e-2, (name, d, acc)
        assert ("grad_vs_ref" in acc) == (d == "fwdbwd")
      assert case["accuracy"][f"gnorm/{d}"]["bound"] == "docs/accuracy.md"
  # The kernel profile: kernel events per program, or the reason there are none.
  prof = r["profile"]
  assert "error" in prof or all(m["kernels_per_call"] for m in prof["modules"].values()), prof
  # Targets: every kernel-level one, not applicable off a GPU, but computed.
  assert [t["id"] for t in r["targets"]] == KERNEL_IDS
  for t in r["targets"]:
    assert t["met"] is None and t["detail"].startswith("not applicable: not on a GPU"), t
  assert r["targets"][0]["value"] > 0  # flax/gnorm, forward
  # The report's last lines and stdout's: the short summary.
  summary = device_targets.summary_lines(r["targets"])
  assert md.rstrip().endswith("\n".join(summary) + "\n```")
  assert proc.stdout.strip().splitlines()[-len(summary):] == summary
  for title in ("## Method", "## Forward (µs", "## Forward+backward — GroupNorm + SiLU",
                "## Targets", "gnorm prev", "gnorm pallas", "loop"):
    assert title in md, title


def test_no_budget_measures_nothing_and_says_so(tmp_path):
  _, r, md = _run(tmp_path, "--budget-s", "0", "--only", "gnorm,flax")
  assert r["plan"]["items"] == 8 and len(r["not_measured"]) == 8
  assert all(n["reason"].startswith("time budget") for n in r["not_measured"])
  assert all(c["times"] == {} for c in r["cases"])
  assert "not measured (8 items, time budget)" in md
  assert all(t["met"] is None for t in r["targets"])


def test_deadline_plugin_skips_with_the_reason(tmp_path):
  (tmp_path / "test_one.py").write_text("def test_one():\n  pass\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks"), GNORM_TEST_DEADLINE_S="0")
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
     "gnorm_bench.device_pytest_deadline", str(tmp_path / "test_one.py")],
    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "past its 0 s test deadline" in proc.stdout and "1 skipped" in proc.stdout


# The target logic, on synthetic timings (seconds per call, net of the loop).


def _case(label, shape, times, dtype="bfloat16", activation=None, pct=None, wrong=()):
  t = {k: {"net_s": v, "pct_copy": (pct or {}).get(k)} for k, v in times.items()}
  acc = {k: {"ok": k.split("/")[0] not in wrong} for k in times}
  return {"label": label, "shape": list(shape), "dtype": dtype, "activation": activation,
          "elements": math.prod(shape), "times": t, "accuracy": acc}


def _results(cases, backend="gpu"):
  return {"machine": {"jax_backend": backend}, "cases": cases}


def _rows(cases, backend="gpu"):
  return {r["id"]: r for r in device_targets.kernel_targets(_results(cases, backend))}


def _both(impls, fwd, bwd):
  out = {}
  for impl, (f, b) in zip(impls, zip(fwd, bwd, strict=True), strict=True):
    out[f"{impl}/fwd"], out[f"{impl}/fwdbwd"] = f, b
  return out


SMALL, BIG = (2, 64, 64, 320), (16, 64, 64, 320)  # 2.6M and 21M elements


def test_every_case_and_geomean_targets():
  a = _case("a", SMALL, _both(("gnorm", "flax"), (1.0, 1.2), (1.0, 1.2)))
  b = _case("b", BIG, _both(("gnorm", "flax"), (1.0, 1.5), (1.0, 1.5)))
  rows = _rows([a, b])
  assert rows["19a-fwd"]["met"] is True and rows["19a-fwdbwd"]["met"] is True
  assert math.isclose(rows["19a-fwd"]["value"], 1.2)
  assert math.isclose(rows["19b"]["value"], math.sqrt(1.2 * 1.5))  # 1.34 >= 1.3
  assert rows["19b"]["met"] is True
  b = _case("b", BIG, _both(("gnorm", "flax"), (1.0, 0.9), (1.0, 1.3)))
  rows = _rows([a, b])
  assert rows["19a-fwd"]["met"] is False and "b 0.90x" in rows["19a-fwd"]["detail"]
  assert rows["19b"]["met"] is False and math.isclose(rows["19b"]["value"], math.sqrt(1.56))
  # A case without flax leaves a target undecided unless a measured case fails it.
  c = _case("c", SMALL, {"gnorm/fwd": 1.0, "gnorm/fwdbwd": 1.0})
  rows = _rows([a, c])
  assert rows["19a-fwdbwd"]["met"] is None and "not decided" in rows["19a-fwdbwd"]["detail"]
  assert rows["19b"]["met"] is None
  assert _rows([b, c])["19a-fwd"]["met"] is False
  # A fast but wrong gnorm fails.
  w = _case("w", SMALL, _both(("gnorm", "flax"), (0.5, 1.0), (0.5, 1.0)), wrong=("gnorm",))
  rows = _rows([a, w])
  assert rows["19a-fwd"]["met"] is False and "w WRONG" in rows["19a-fwd"]["detail"]
  assert rows["19b"]["met"] is False
  # Off a GPU, not applicable, with the numbers still in the detail.
  row = _rows([a, b], backend="cpu")["19a-fwd"]
  assert row["met"] is None and row["detail"].startswith("not applicable: not on a GPU")


def test_silu_and_prev_targets():
  s = _case("s", SMALL, _both(("gnorm", "flax"), (1.0, 1.1), (1.0, 2.5)), activation="silu")
  rows = _rows([s])
  assert rows["19c-fwd"]["met"] is True and rows["19c-fwdbwd"]["met"] is True
  assert rows["20f"]["met"] is True and math.isclose(rows["20f"]["value"], 2.5)
  assert rows["19a-fwd"]["met"] is None  # no plain case
  # 19d: only where gnorm_prev beat flax; there gnorm may be at most 5% slower.
  impls = ("gnorm", "gnorm_prev", "flax")
  ahead = _case("ahead", BIG, _both(impls, (1.04, 1.0, 1.2), (1.0, 2.0, 1.5)))
  assert _rows([ahead])["19d"]["met"] is True  # fwd: 1.04x; fwd+bwd: prev behind flax
  slower = _case("slower", BIG, _both(impls, (1.10, 1.0, 1.2), (1.0, 2.0, 1.5)))
  row = _rows([slower])["19d"]
  assert row["met"] is False and math.isclose(row["value"], 1.10)
  behind = _case("behind", BIG, _both(impls, (3.0, 2.0, 1.0), (3.0, 2.0, 1.0)))
  assert _rows([behind])["19d"]["met"] is True  # prev ahead nowhere: nothing to keep
  assert _rows([s])["19d"]["met"] is None  # gnorm_prev not measured


def test_kernel_targets_either_subject():
  impls = ("gnorm", "gnorm_pallas", "flax", "torch_compile")
  times = _both(impls, (1.0, 0.5, 1.0, 0.6), (1.0, 0.4, 1.0, 0.5))
  pct = {"gnorm_pallas/fwd": 0.75, "gnorm_pallas/fwdbwd": 0.65, "gnorm/fwd": 0.3,
         "gnorm/fwdbwd": 0.2}
  big = _case("big", BIG, times, pct=pct)
  rows = _rows([big])
  # Pallas: 2.5x flax fwd+bwd, faster than torch.compile, 65% / 75% of copy.
  for tid in ("20a", "20b", "20c", "20d", "20e"):
    assert rows[tid]["met"] is True, rows[tid]
  assert "gnorm_pallas: geomean 2.50x" in rows["20a"]["summary"]
  pct["gnorm_pallas/fwdbwd"] = 0.55
  rows = _rows([_case("big", BIG, times, pct=pct)])
  assert rows["20d"]["met"] is False and math.isclose(rows["20d"]["value"], 0.55)
  # Bandwidth and torch.compile targets ignore small and float32 cases.
  small = _case("small", SMALL, {**times, "torch_compile/fwd": 0.1}, pct={
    "gnorm_pallas/fwd": 0.1, "gnorm_pallas/fwdbwd": 0.1})
  rows = _rows([big, small])
  assert rows["20c"]["met"] is True and rows["20e"]["met"] is True
  f32 = _case("f32", BIG, {**times, "torch_compile/fwd": 0.1}, dtype="float32",
              pct={**pct, "gnorm_pallas/fwdbwd": 0.7})
  assert _rows([big, f32])["20c"]["met"] is True
  # Neither subject as fast as torch.compile: not met.
  slow = _case("slow", BIG, {**times, "torch_compile/fwd": 0.3})
  assert _rows([slow])["20c"]["met"] is False


def test_model_targets_and_summary():
  def variant(step, temp):
    return {"step_ratio_vs_flax": step, "temp_step_ratio_vs_flax": temp,
            "temp_bytes_step": int(temp * 1000)}

  drop = {"machine": {"jax_backend": "gpu"}, "variants": {
    "flax": variant(1.0, 1.0), "drop_in": variant(0.95, 1.0), "gnorm_fused": variant(0.8, 0.7)}}
  rows = {r["id"]: r for r in device_targets.model_targets(drop)}
  assert rows["19m-memory"]["met"] is True and rows["19m-speed"]["met"] is True
  assert rows["20m"]["met"] is True and math.isclose(rows["20m"]["value"], 1.25)
  drop["variants"]["gnorm_fused"] = variant(0.9, 0.7)  # 1.11x: under 1.15x
  drop["variants"]["drop_in"] = variant(1.02, 1.1)
  rows = {r["id"]: r for r in device_targets.model_targets(drop)}
  assert [rows[t]["met"] for t in device_targets.MODEL_IDS] == [False, False, False]
  missing = device_targets.model_targets(None, "no drop_in.json")
  assert [r["met"] for r in missing] == [None] * 3
  lines = device_targets.summary_lines(list(rows.values()) + missing)
  assert lines[0].startswith("19m-memory  NOT MET")
  assert lines[-1] == "targets: 0 met, 3 NOT MET, 3 not applicable or not decided"


def test_kernel_sums_of_a_gpu_trace():
  # The Perfetto JSON of a GPU trace (the shape of jax.profiler's), made up: kernels on a
  # stream line, the same again on the derived "XLA Ops" line, host events besides.
  def meta(kind, pid, name, tid=None):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}

  def ev(pid, tid, dur, module, name="fusion"):
    return {"ph": "X", "pid": pid, "tid": tid, "dur": dur, "name": name,
            "args": {"hlo_module": module, "hlo_op": name}}

  events = [meta("process_name", 1, "/device:GPU:0"), meta("process_name", 2, "/host:CPU"),
            meta("thread_name", 1, "Stream #7(Compute)", 7), meta("thread_name", 1, "XLA Ops", 8),
            ev(1, 7, 10.0, "jit_a"), ev(1, 7, 20.0, "jit_a"), ev(1, 7, 5.0, "jit_other"),
            ev(1, 8, 30.0, "jit_a"), ev(2, 3, 99.0, "jit_a")]
  sums, source = device_profile.kernel_sums(events, {"jit_a", "jit_b"})
  assert sums == {"jit_a": (30.0, 2)} and source == "GPU stream events"
  # Stream events without the module's name: the "XLA Ops" line.
  for e in events[4:7]:
    e["args"] = {}
  sums, source = device_profile.kernel_sums(events, {"jit_a"})
  assert sums == {"jit_a": (30.0, 1)} and source == "GPU 'XLA Ops' events"
  sums, source = device_profile.kernel_sums(events[:7], {"jit_a"})
  assert sums == {} and source.startswith("no kernel events with an hlo_module")


# The loop form: the data dependency is real, and the loops survive compilation.


def _f(x, g, b):
  import gnorm

  return gnorm.group_norm({"gamma": g, "beta": b}, x, 4, activation="silu")


def test_loop_chains_its_calls():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16), jnp.float32) + 0.5
  ct = jax.random.normal(jax.random.key(1), (2, 4, 4, 16), jnp.float32)
  g, b = jnp.full((16,), 1.1), jnp.full((16,), 0.1)
  n, u = 3, 2
  y0, last = jax.jit(device_loop.fwd_loop(_f, n, u))(x, g, b)
  f = jax.jit(_f)
  chained = x
  for _ in range(device_loop.calls(n, u)):
    chained = f(chained, g, b)
  np.testing.assert_allclose(y0, f(x, g, b), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(last, chained, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(last - y0))) > 1e-2  # not one call's result

  first, (xn, ctn, sg, sb) = jax.jit(device_loop.fwdbwd_loop(_f, n, u))(x, ct, g, b)
  fb = jax.jit(device_loop.fwdbwd_of(_f))
  xc, cc, dgs, dbs = x, ct, 0.0, 0.0
  for _ in range(device_loop.calls(n, u)):
    xc, cc, dg, db = fb(xc, cc, g, b)
    dgs, dbs = dgs + dg, dbs + db
  for got, want in ((xn, xc), (ctn, cc), (sg, dgs), (sb, dbs)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert float(jnp.max(jnp.abs(ctn - first[1]))) > 1e-2

  # Neither the real loop nor the trivial one is folded away by XLA.
  for fn, args in ((device_loop.fwd_loop(_f, n, u), (x, g, b)),
                   (device_loop.overhead_loop(n), ((x, ct), jnp.float32(1.0)))):
    assert "while" in jax.jit(fn).lower(*args).compile().as_text()
  # The trivial body: one element of each carried array set to the argument.
  same = jax.jit(device_loop.overhead_loop(n))((x, ct), jnp.float32(1.0))
  np.testing.assert_array_equal(same[0], x.at[0, 0, 0, 0].set(1.0))
  np.testing.assert_array_equal(same[1], ct.at[0, 0, 0, 0].set(1.0))


def test_body_copies_counts_large_copies_in_loop_bodies():
  hlo = """HloModule m
%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %a = f32[8,4]{1,0} copy(%b)
  %c = f32[2]{0} copy(%d)
}
%fused (p: f32[8,4]) -> f32[8,4] {
  %e = f32[8,4]{1,0} copy(%p)
}
ENTRY %main (x: f32[8,4]) -> f32[8,4] {
  %f = f32[8,4]{1,0} copy(%x)
  %w = (s32[], f32[8,4]{1,0}) while(%t), condition=%cond, body=%body
}
"""
  assert device_loop.body_copies(hlo, 32) == 1  # not the fusion's, the entry's or the small one
  assert device_loop.body_copies(hlo, 2) == 2


def test_loop_sizes():
  s = Settings.gpu()
  for est in (1e-7, 1e-5, 3e-4, 1.0):
    n, u = loop_size(est, s)
    assert u == s.unroll and s.min_calls <= device_loop.calls(n, u) <= s.max_calls + u
  assert device_loop.calls(*loop_size(5e-5, s)) == 101  # 5 ms of 50 us calls
  assert loop_size(1.0, Settings.quick()) == (2, 2)
