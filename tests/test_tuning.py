"""``backends/tuning.py`` (the Pallas kernels' tile table) and ``benchmarks/pallas_sweep.py``
(the GPU sweep that writes it).

The shipped table holds no measurement (no GPU has produced one yet), so every choice is
the heuristic's; synthetic tables in temporary files (``TABLE_PATH`` monkeypatched) check
the lookups, the schema's errors and ``--install``; the sweep's decisions are checked on
synthetic timings, and its CPU dry run end to end in a subprocess.
"""

import copy
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from gnorm._src.backends import tuning
from gnorm._src.backends import tuning_schema
from gnorm._src.backends.pallas_triton import Block

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "pallas_sweep.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gnorm_bench import sweep_plan  # noqa: E402
from gnorm_bench import sweep_run  # noqa: E402
from gnorm_bench.device_timing import Budget  # noqa: E402
from gnorm_bench.device_timing import Settings  # noqa: E402

_spec = importlib.util.spec_from_file_location("pallas_sweep", SWEEP)
pallas_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pallas_sweep)
sys.path.pop(0)

H200 = "NVIDIA H200"
SD = (2, 64 * 64, 320)  # (n, s, c) of 2x64x64x320: class 1M-8M, tiled forward


def _entry(implementation="pallas", dtype="bfloat16", size="1M-8M", shape=(2, 64, 64, 320),
           xla_fwdbwd=200.0, pallas_fwdbwd=180.0):
  return {
    "dtype": dtype, "channels_last": True, "size_class": size, "forward_plan": "tiled",
    "implementation": implementation,
    "forward": {"bs": 128, "bc": 64, "warps": 8}, "backward": {"bs": 64, "bc": 128, "warps": 0},
    "case": {"shape": list(shape), "groups": 32},
    "us": {"pallas_fwd": 20.0, "pallas_fwdbwd": pallas_fwdbwd, "xla_fwd": 30.0,
           "xla_fwdbwd": xla_fwdbwd, "loop_fwd": 9.0, "loop_fwdbwd": 10.0},
  }


def _measurement(device=H200, entries=None, jax_version="0.11.2", dry_run=False, platform="gpu"):
  return {
    "device_kind": device, "platform": platform, "dry_run": dry_run,
    "versions": {"jax": jax_version, "jaxlib": jax_version}, "date_utc": "2026-12-02 10:00 UTC",
    "gnorm_commit": "abc1234", "command": "python benchmarks/pallas_sweep.py", "method": "m",
    "min_speedup": 1.05, "entries": [_entry()] if entries is None else entries,
  }


def _table(*measurements):
  on_gpu = any(m["platform"] == "gpu" and not m["dry_run"] for m in measurements)
  return {"schema_version": 1, "provenance": {"measured_on_gpu": on_gpu, "note": "synthetic",
                                              "written": "2026-12-02", "by": "test"},
          "measurements": list(measurements)}


@pytest.fixture
def use_table(tmp_path, monkeypatch):
  """Installs a table (a dict, or text) as the package's for one test."""
  def install(table, name="table.json"):
    path = tmp_path / name
    path.write_text(table if isinstance(table, str) else json.dumps(table))
    monkeypatch.setattr(tuning, "TABLE_PATH", path)
    tuning.clear_cache()
    return path

  yield install
  tuning.clear_cache()


def test_shipped_table_has_no_gpu_measurement():
  # Until a GPU session installs its sweep's table (pallas_sweep.py --install), which then
  # changes this test to name the device it measured.
  assert tuning.TABLE_PATH.name == "tuning_table.json" and tuning.TABLE_PATH.is_file()
  data = tuning.load()
  assert data["measurements"] == [] and not tuning.measured_on_gpu()
  assert tuning.describe().startswith("no GPU measurement: No GPU has produced this table yet")
  choice = tuning.choose(H200, "bfloat16", True, *SD, 32)
  assert choice == tuning.Choice("xla", None, None, choice.source)
  assert "no GPU measurement yet" in choice.source
  assert tuning.blocks_for(H200, jnp.float32, True, *SD, 32) is None
  assert tuning.choose(None, "float32", True, *SD, 32).source.startswith("no GPU device kind")
  on_gpu = jax.default_backend() == "gpu"  # conftest.py defaults to the CPU
  assert tuning.gpu_device_kind() == (jax.devices()[0].device_kind if on_gpu else None)


def test_size_classes_and_plans():
  m = 2**20
  assert [tuning.size_class(e) for e in (0, m - 1, m, 8 * m - 1, 8 * m, 32 * m - 1, 32 * m)] == [
    "<1M", "<1M", "1M-8M", "1M-8M", "8M-32M", "8M-32M", ">=32M"]
  # One program per (sample, group) only with groups that fit a block and enough of them.
  assert tuning.forward_plan(2, 64, 64, 32, True) == "tiled"  # 64 pairs: too few
  assert tuning.forward_plan(32, 64, 64, 32, True) == "one_pass"
  assert tuning.forward_plan(32, 4096, 320, 32, True) == "tiled"  # a group is 40K elements
  assert tuning.key(jnp.bfloat16, True, *SD, 32) == ("bfloat16", True, "1M-8M", "tiled")


def test_choice_from_a_matching_entry(use_table):
  xla_entry = _entry("xla", dtype="float32", xla_fwdbwd=100.0, pallas_fwdbwd=99.0)
  use_table(_table(_measurement(entries=[_entry(), xla_entry])))
  c = tuning.choose(H200, jnp.bfloat16, True, *SD, 32, jax_version="0.11.2")
  assert c[:3] == ("pallas", Block(128, 64, 8), Block(64, 128, 0))
  assert "NVIDIA H200, jax 0.11.2, 2026-12-02" in c.source and "2x64x64x320 G=32" in c.source
  assert "180.0 us (Pallas) vs 200.0 us (XLA)" in c.source
  # Any shape of the class: 2x32x32x640 has 1.3M elements.
  c = tuning.choose(H200, "bfloat16", True, 2, 1024, 640, 32, jax_version="0.11.9")
  assert c.implementation == "pallas"
  # An entry that keeps XLA: "auto" runs XLA, an explicit "pallas" still gets its tiles.
  c = tuning.choose(H200, "float32", True, *SD, 32, jax_version="0.11.2")
  assert c[:3] == ("xla", None, None)
  b = tuning.blocks_for(H200, "float32", True, *SD, 32, jax_version="0.11.2")
  assert b[:2] == (Block(128, 64, 8), Block(64, 128, 0))


@pytest.mark.parametrize(("args", "why"), [
  ((H200, "bfloat16", True, 16, 4096, 320, 32), "no entry for bfloat16 channels-last 8M-32M"),
  ((H200, "float16", True, *SD, 32), "no entry for float16 channels-last 1M-8M tiled"),
  ((H200, "bfloat16", False, *SD, 32), "no entry for bfloat16 channels-first 1M-8M"),
  ((H200, "bfloat16", True, 32, 64, 512, 32), "no entry for bfloat16 channels-last 1M-8M one_pass"),
  (("NVIDIA A100-SXM4-80GB", "bfloat16", True, *SD, 32), "no measurement for 'NVIDIA A100"),
  ((None, "bfloat16", True, *SD, 32), "no GPU device kind"),
])
def test_heuristic_where_the_table_has_nothing(use_table, args, why):
  use_table(_table(_measurement()))
  c = tuning.choose(*args, jax_version="0.11.2")
  assert c[:3] == ("xla", None, None) and why in c.source and c.source.endswith(": XLA"), c
  assert tuning.blocks_for(*args, jax_version="0.11.2") is None


def test_entries_apply_to_the_jax_release_they_were_measured_with(use_table):
  use_table(_table(_measurement(jax_version="0.11.2")))
  c = tuning.choose(H200, "bfloat16", True, *SD, 32, jax_version="0.12.0")
  assert c.implementation == "xla" and "measured with jax 0.11.2, this is jax 0.12.0" in c.source
  # By default, the running JAX's version: its release's entry applies, another's not.
  other = "0.0.1" if jax.__version__.startswith("0.11.") else "0.11.2"
  use_table(_table(_measurement(jax_version=other)))
  assert tuning.choose(H200, "bfloat16", True, *SD, 32).implementation == "xla"
  use_table(_table(_measurement(jax_version=jax.__version__)))
  assert tuning.choose(H200, "bfloat16", True, *SD, 32).implementation == "pallas"


def _broken(mutate):
  t = _table(_measurement())
  mutate(t)
  return t


def _entry0(t):
  return t["measurements"][0]["entries"][0]


@pytest.mark.parametrize(("mutate", "message"), [
  (lambda t: t.pop("measurements"), r"table: lacks \['measurements'\]"),
  (lambda t: t.update(schema_version=2), "table.schema_version: 2 is not 1"),
  (lambda t: t.update(extra=1), r"table: has unknown fields \['extra'\]"),
  (lambda t: _entry0(t)["forward"].update(bs=48), r"entries\[0\].forward.bs: 48 is not a power"),
  (lambda t: _entry0(t)["backward"].update(warps=3), r"entries\[0\].backward.warps: 3 not in"),
  (lambda t: _entry0(t).update(channels_last=1), r"entries\[0\].channels_last: must be true or"),
  (lambda t: _entry0(t).update(size_class="1M-4M"), r"entries\[0\].size_class: '1M-4M' not in"),
  (lambda t: _entry0(t)["case"].update(shape=[16, 64, 64, 320]),
   r"entries\[0\].case.shape: \[16, 64, 64, 320\] has 20,971,520 elements: class '8M-32M'"),
  (lambda t: _entry0(t)["us"].update(xla_fwdbwd=-1), r"us.xla_fwdbwd: must be a positive"),
  (lambda t: _entry0(t)["us"].update(xla_fwdbwd=185.0),
   r"entries\[0\].us: implementation 'pallas' needs xla_fwdbwd >= 1.05 x pallas_fwdbwd"),
  (lambda t: _entry0(t).update(backward=None), "needs its forward and backward blocks"),
  (lambda t: t["measurements"][0]["entries"].append(_entry()),
   r"entries\[1\]: repeats the class of entries\[0\] \(bfloat16 channels-last 1M-8M tiled\)"),
  (lambda t: t["measurements"].append(_measurement()),
   r"measurements\[1\].device_kind: 'NVIDIA H200' was measured in measurements\[0\]"),
  (lambda t: t["provenance"].update(measured_on_gpu=False),
   "provenance.measured_on_gpu: says False, the measurements say True"),
  (lambda t: t["measurements"][0].update(dry_run=True, platform="cpu"),
   r"measurements\[0\]: was a dry run on 'cpu'"),
])
def test_schema_errors_name_the_file_and_the_field(use_table, mutate, message):
  t = _broken(mutate)
  if t.get("measurements") and t["measurements"][0]["dry_run"]:
    t["provenance"]["measured_on_gpu"] = False
    tuning.validate(t)  # a dry run's table is well formed: only the package refuses it
  path = use_table(t)
  with pytest.raises(tuning.TableError, match=message) as e:
    tuning.choose(H200, "bfloat16", True, *SD, 32)
  assert str(e.value).startswith(f"{path}: ")


def test_unreadable_tables(use_table, tmp_path):
  use_table("{not json")
  with pytest.raises(tuning.TableError, match="table.json: not valid JSON"):
    tuning.load()
  with pytest.raises(tuning.TableError, match="cannot read the tuning table"):
    tuning.load(tmp_path / "missing.json")


def test_install_validates_and_merges(tmp_path, capsys):
  target = tmp_path / "tuning_table.json"
  target.write_text(tuning.TABLE_PATH.read_text())
  h100 = _measurement("NVIDIA H100 80GB HBM3")
  cand = tmp_path / "cand.json"
  for table in (_table(_measurement()), _table(h100), _table(_measurement(entries=[]))):
    cand.write_text(json.dumps(table))
    assert pallas_sweep.main(["--install", str(cand), "--table", str(target)]) == 0
  tuning.clear_cache()
  got = tuning.load(target)
  assert [m["device_kind"] for m in got["measurements"]] == ["NVIDIA H100 80GB HBM3", H200]
  assert got["measurements"][1]["entries"] == []  # the second H200 table replaced the first
  assert got["provenance"]["measured_on_gpu"] and "replacing the previous NVIDIA H200" in (
    capsys.readouterr().out)
  before = target.read_text()
  bad = _table(_measurement())
  _entry0(bad)["us"]["pallas_fwdbwd"] = 199.0  # not 5% faster: cannot claim Pallas
  dry = _table(_measurement(dry_run=True, platform="cpu", device="cpu"))
  for table, message in ((bad, "needs xla_fwdbwd >= 1.05 x pallas_fwdbwd"),
                         (dry, "was a dry run on 'cpu' (cpu): its times mean nothing")):
    cand.write_text(json.dumps(table))
    assert pallas_sweep.main(["--install", str(cand), "--table", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"error: {cand}: " in err and message in err and target.read_text() == before
  tuning.clear_cache()


def test_sweep_refuses_to_write_into_the_package(capsys):
  with pytest.raises(SystemExit):
    pallas_sweep.main(["--quick", "--out", str(ROOT / "gnorm" / "_src" / "backends")])
  assert "is inside the package" in capsys.readouterr().err


# The sweep's plan and decisions, on synthetic timings (seconds, net of the loop).


def _rec(t, ok=True):
  return {"net_s": t, "raw_s": t + 9e-6, "ok": ok}


def _cand(b, fwd, fwdbwd, ok=True, grid="ok"):
  return {"block": {"bs": b[0], "bc": b[1], "warps": b[2]}, "fwd": _rec(fwd, ok),
          "fwdbwd": _rec(fwdbwd, ok), "grid": grid}


def _result(xla=(30e-6, 200e-6), cands=(((64, 128, 0), 20e-6, 180e-6),), spread=None):
  r = {"label": "x", "shape": [2, 64, 64, 320], "dtype": "bfloat16", "channels_last": True,
       "groups": 32, "size_class": "1M-8M", "forward_plan": "tiled",
       "overhead": {"fwd": 9e-6, "fwdbwd": 10e-6},
       "xla": {"fwd": _rec(xla[0]), "fwdbwd": _rec(xla[1])},
       "candidates": [_cand(*c) for c in cands]}
  if spread is not None:
    r["spread"] = spread
  return r


def test_sweep_decisions():
  def decide(**kw):
    e = sweep_plan.decide(_result(**kw))
    t = _table(_measurement(entries=[e]))
    tuning.validate(t)  # what the sweep writes is always a valid table
    return e

  e = decide()
  assert e["implementation"] == "pallas" and e["us"]["pallas_fwdbwd"] == 180.0
  assert e["reason"].startswith("forward+backward 1.111x XLA's (>= 1.050x)")
  # The forward block is the fastest forward, the backward block the fastest fwd+bwd.
  e = decide(cands=(((64, 128, 0), 25e-6, 170e-6), ((128, 64, 8), 15e-6, 190e-6)))
  assert (e["forward"]["bs"], e["backward"]["bs"]) == (128, 64)
  assert decide(xla=(30e-6, 186e-6))["implementation"] == "xla"  # 3%: within the noise
  assert decide(spread=0.12)["reason"].endswith("under the 1.120x required")
  slow_fwd = decide(cands=(((64, 128, 0), 40e-6, 150e-6),))
  assert slow_fwd["implementation"] == "xla" and "but the forward 0.750x" in slow_fwd["reason"]
  # A fast wrong block, or one whose forced tiles did not apply, cannot win.
  fast = ((32, 256, 8), 1e-6, 1e-6)
  for bad in ((*fast, False), (*fast, True, "contradicted: no Triton call over grid")):
    e = decide(cands=(((64, 128, 0), 20e-6, 180e-6), bad))
    assert e["backward"] == {"bs": 64, "bc": 128, "warps": 0}
    assert [c["ok"] for c in e["candidates"]] == [True, False]
  none_right = decide(cands=(((64, 128, 0), 1e-6, 1e-6, False),))
  assert none_right["implementation"] == "xla" and none_right["backward"] is None


def test_sweep_plan_order_and_grid_check():
  cases = sweep_plan.cases(False)
  assert [c.label for c in cases[:3]] == ["2x64x64x320 bf16 NHWC", "2x64x64x320 f32 NHWC",
                                          "16x64x64x320 bf16 NHWC"]
  assert {c.key.size_class for c in cases} == {"<1M", "1M-8M", "8M-32M", ">=32M"}
  items = sweep_plan.work(cases, False)
  # Breadth first: every case's baselines and heuristic block, then the other blocks.
  first = items[:2 * len(cases)]
  assert [(i.index, i.block) for i in first[:2]] == [(0, None), (0, Block(64, 128, 0))]
  assert all(i.round == 0 for i in first) and items[2 * len(cases)].round == 1
  # Per case: its baselines, the heuristic's block, every other candidate.
  assert len(items) == len(cases) * (2 + len(sweep_plan.CANDIDATES_LAST))
  quick = sweep_plan.cases(True)
  assert sweep_plan.candidates(quick[0], True) == [Block(64, 64, 0), Block(32, 32, 4)]
  text = "grid_x = 2 : i32, grid_y = 4 : i32, grid_z = 1 : i32"
  assert sweep_run.grid_status(text, (2, 4, 1)) == "ok"
  assert sweep_run.grid_status(text, (2, 2, 1)).startswith("contradicted")
  assert sweep_run.grid_status("", (2, 2, 1)).startswith("unverified")


def test_sweep_stops_at_its_budget_and_says_so():
  sc = sweep_plan.cases(False)[:2]
  results, written = {}, []
  sweep = sweep_run.Sweep(sc, Settings.quick(), Budget(0.0), results, written.append, None,
                          log=lambda msg: None)
  sweep.run(sweep_plan.work(sc, False))
  assert written and all(r["xla"] == {} and r["candidates"] == [] for r in results["cases"])
  reasons = [n["reason"] for n in results["not_swept"]]
  assert len(reasons) == 2 * (2 + len(sweep_plan.CANDIDATES_LAST))
  assert reasons[0].startswith("time budget: 0 s of 0 s left")
  assert "its baselines were not measured" in reasons
  assert sweep_plan.candidate_table({**results, **_fake_run()})["measurements"][0]["entries"] == []


def _fake_run():
  return {"machine": {"device": H200, "jax_backend": "gpu", "date_utc": "2026-12-02 10:00 UTC",
                      "git": "abc1234", "table_versions": {"jax": "0.11.2", "jaxlib": "0.11.2"}},
          "quick": False, "command": "c", "method": "m", "min_speedup": 1.05, "budget_s": 0.0}


def test_quick_sweep_writes_a_valid_candidate_table(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SWEEP), "--quick", "--out", str(tmp_path)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  table = json.loads((tmp_path / "tuning_table.json").read_text())
  tuning.validate(table, "candidate")
  (m,) = table["measurements"]
  assert m["dry_run"] and m["platform"] == "cpu" and not table["provenance"]["measured_on_gpu"]
  assert m["not_swept"] == [] and m["command"].startswith("python benchmarks/pallas_sweep.py")
  (e,) = m["entries"]
  assert e["case"]["shape"] == [2, 8, 8, 64] and len(e["candidates"]) == 2
  assert all(c["ok"] for c in e["candidates"])  # right in the interpreter, both blocks
  # Times mean nothing here; a net time within the loop's noisy cost is recorded as null.
  assert set(e["us"]) == set(tuning_schema.TIMES)
  assert all(v is None or v > 0 for v in e["us"].values()) and e["us"]["loop_fwdbwd"] > 0
  with pytest.raises(tuning.TableError, match="was a dry run on 'cpu'"):
    tuning.check_installable(copy.deepcopy(table))
  md = (tmp_path / "pallas_sweep.md").read_text()
  assert "**DRY RUN (`--quick`)" in md and "unverified: no Triton call" in md
  assert "XLA forward+backward timed again" in md
  results = json.loads((tmp_path / "pallas_sweep.json").read_text())
  assert results["cases"][0]["spread"] >= 0
  assert proc.stdout.strip().splitlines()[-1] == "0 items not swept"


# What "auto" does with the table, end to end: the lowered program.


def _lowered_step(shape, dtype, implementation="auto"):
  import gnorm

  def step(x):
    return jax.grad(lambda x: gnorm.group_norm(None, x, 32, implementation=implementation)
                    .astype(jnp.float32).sum())(x)

  x = jax.ShapeDtypeStruct(shape, dtype)
  return jax.jit(step).trace(x).lower(lowering_platforms=("cuda",)).as_text()


def test_auto_lowers_the_kernels_only_on_the_gpu_the_table_names(use_table, monkeypatch):
  # H200, this JAX: kernels faster for bf16 1M-8M channels-last.
  use_table(_table(_measurement(jax_version=jax.__version__)))
  triton = "@__gpu$xla.gpu.triton("
  monkeypatch.setattr(tuning, "gpu_device_kind", lambda: H200)
  assert _lowered_step((2, 64, 64, 320), jnp.bfloat16).count(triton) == 6
  # Another class (float32) or another GPU: XLA.
  assert triton not in _lowered_step((2, 64, 64, 320), jnp.float32)
  monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA A100-SXM4-80GB")
  assert triton not in _lowered_step((2, 64, 64, 320), jnp.bfloat16)
  # No GPU in this process (lowering for CUDA from a CPU host): XLA.
  monkeypatch.setattr(tuning, "gpu_device_kind", lambda: None)
  assert triton not in _lowered_step((2, 64, 64, 320), jnp.bfloat16)


def test_the_tables_tiles_reach_the_kernels(use_table, monkeypatch):
  # The entry's blocks (forward bs=128, bc=64, 8 warps) are what Triton gets:
  # the partial-moments kernel's grid is then (2, 4096 / 128, 320 / 64).
  use_table(_table(_measurement(jax_version=jax.__version__)))
  monkeypatch.setattr(tuning, "gpu_device_kind", lambda: H200)
  from gnorm._src.backends import pallas_triton

  seen = []
  real = pallas_triton.tiling

  def spy(*args, **kwargs):
    t = real(*args, **kwargs)
    seen.append((t.bs, t.bc, t.warps))
    return t

  monkeypatch.setattr(pallas_triton, "tiling", spy)
  for implementation in ("auto", "pallas"):
    seen.clear()
    _lowered_step((2, 64, 64, 320), jnp.bfloat16, implementation)
    assert (128, 64, 8) in seen and (64, 128, 0) in seen, (implementation, seen)
