"""Keeps ``benchmarks/drop_in.py`` (the drop-in model benchmark) working: its quick mode runs
end to end in a subprocess and writes sane reports. No timing comparisons: the quick model
measures nothing useful."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_drop_in_quick(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "drop_in.py"), "--quick", "--no-progress",
     "--check-steps", "2", "--out", str(tmp_path)],
    cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
    timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  r = json.loads((tmp_path / "latest.json").read_text())
  md = (tmp_path / "latest.md").read_text()
  m, v = r["model"], r["variants"]
  assert list(v) == ["flax", "drop_in", "gnorm_fused"]
  assert m["shape"] == [2, 8, 8, 32] and m["blocks"] == 1 and m["check_steps"] == 2
  # One block: two (GroupNorm -> SiLU -> conv3x3) of width 32, each 32*32*9 + 32 + 2*32.
  assert m["parameters"] == 2 * (32 * 32 * 9 + 32 + 64)
  for name, e in v.items():
    assert f"| {name} |" in md
    # Same start, same maths: the losses and outputs agree with flax's.
    assert len(e["losses"]) == 2 and all(math.isfinite(x) for x in e["losses"])
    assert e["loss_agrees"] and e["loss_max_rel_diff_vs_flax"] <= 1e-4, (name, e["losses"])
    assert e["output_max_abs_diff_vs_flax"] <= 1e-4, name
    assert e["losses"][1] < e["losses"][0]  # adam made a step
    for key in ("step", "fwd"):
      assert e[key]["median_s"] > 0 and len(e[key]["samples_s"]) == m["rounds"] == 2
    assert e["temp_bytes_step"] > 0 and e["residuals"]["total_bytes"] > 0
    assert math.isclose(e["step_ratio_vs_flax"],
                        e["step"]["median_s"] / v["flax"]["step"]["median_s"])
  assert v["flax"]["loss_max_rel_diff_vs_flax"] == 0.0
  # Structural, not timed: the fused layer's backward keeps less than flax's GroupNorm then
  # nn.silu, and the drop-in no more.
  assert v["gnorm_fused"]["residual_ratio_vs_flax"] < 0.5
  assert v["drop_in"]["residual_ratio_vs_flax"] <= 1.0
  info = r["machine"]
  assert info["jax_backend"] == "cpu" and "Machine: " in md
  assert f"gnorm {info['versions']['gnorm']} at commit {info['git']}" in md.splitlines()[2]
