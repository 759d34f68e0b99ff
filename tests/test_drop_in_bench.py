"""Keeps ``benchmarks/drop_in.py`` (issue #14's drop-in model benchmark) working: its
quick mode runs end to end in a subprocess and writes sane reports.

No timing comparisons: the quick model measures nothing useful.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "drop_in.py"


def test_drop_in_quick(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads((tmp_path / "latest.json").read_text())
  md = (tmp_path / "latest.md").read_text()

  variants = results["variants"]
  assert sorted(variants) == ["drop_in", "flax", "gnorm_fused"]

  steps = results["model"]["check_steps"]
  for name, r in variants.items():
    assert f"| {name} |" in md
    # Same start, same maths: the losses agree with flax's.
    assert len(r["losses"]) == steps and all(math.isfinite(v) for v in r["losses"])
    assert r["loss_agrees"], (name, r["losses"], variants["flax"]["losses"])
    assert r["loss_max_rel_diff_vs_flax"] <= 1e-4, name
    assert r["output_max_abs_diff_vs_flax"] <= 1e-4, name
    for key in ("step", "fwd"):
      assert r[key]["median_s"] > 0 and len(r[key]["samples_s"]) == results["model"]["rounds"]
    assert r["temp_bytes_step"] > 0 and r["temp_bytes_fwd"] >= 0
    assert r["residuals"]["total_bytes"] > 0
    assert r["step_ratio_vs_flax"] > 0 and r["temp_step_ratio_vs_flax"] > 0
  flax = variants["flax"]
  assert flax["step_ratio_vs_flax"] == 1.0 and flax["loss_max_abs_diff_vs_flax"] == 0.0
  # Structural, not timed: the fused layer's backward keeps less than flax's
  # GroupNorm followed by nn.silu.
  fused = variants["gnorm_fused"]
  assert fused["residuals"]["total_bytes"] < flax["residuals"]["total_bytes"]
  assert "Machine:" in md and results["machine"]["jax_backend"] == "cpu"
  m = results["machine"]
  assert m["git"] and f"gnorm {m['versions']['gnorm']} at commit {m['git']}" in md
