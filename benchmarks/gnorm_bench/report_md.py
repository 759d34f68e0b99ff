"""``latest.md``: the header, the main section's tables and the target checks."""

from __future__ import annotations

import math

import jax.numpy as jnp

from .cases import describe_bounds
from .machine import provenance
from .report_md_fused import fused_markdown
from .report_util import bandwidth_rows
from .report_util import fmt_b
from .report_util import fmt_met
from .report_util import fmt_t
from .summary import t
from .summary import torch_layout
from .summary import traffic
from .summary import traffic_ratio

# Names in the order the tables show them.
_SHOWN = ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "torch")
_JAX_IMPLS = ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "floor")
# Time-ratio columns, other / gnorm: > 1 means gnorm (its XLA path) is faster,
# so for gnorm_pallas < 1 means the Pallas kernels are.
_RATIOS = ("gnorm_pallas", "flax", "torch")


def _header(results: dict, command: str, torch_shown: bool) -> list[str]:
  m = results["machine"]
  v = m["versions"]
  on_cpu = m["jax_backend"] == "cpu"
  torch_dev = m.get("torch_device")
  device = f", device `{m['device']}`" if m.get("device") else ""
  if torch_shown and torch_dev == "cuda":
    device += f"; torch on `cuda` ({m.get('torch_device_name')})"
  if torch_shown and on_cpu:
    policy = m.get("omp_wait_policy") or "unset"
    meaning = (
      "idle OpenMP threads sleep instead of spinning on the cores XLA needs"
      if policy.upper() == "PASSIVE"
      else "idle OpenMP threads may spin on the cores XLA needs"
    )
    runtime = f"torch threads = {m['cores']}, OMP_WAIT_POLICY={policy} ({meaning}). "
  elif torch_shown and torch_dev == "cuda":
    runtime = (
      "Every torch call ends with `torch.cuda.synchronize()`, as every JAX call"
      " with `block_until_ready()`, so a time covers the kernels, not their launch. "
    )
  else:
    runtime = ""
  lines = [
    "# gnorm benchmark",
    "",
    f"`{command}` — {m['date_utc']}, {provenance(m)}",
    "",
    f"Machine: {m['cpu']}, {m['cores']} cores ({m['platform']}), JAX backend "
    f"`{m['jax_backend']}`{device}; Python {m['python']}; "
    + ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "gnorm")
    + ".",
    runtime + f"Load average (1, 5, 15 min) at start {m.get('loadavg_start')}, "
    f"at end {m.get('loadavg_end')} (above the core count, other processes "
    "shared the machine: trust ratios more than times).",
  ]
  cb = m.get("copy_bandwidth")
  if cb:
    lines.append(
      f"Copy bandwidth: **{cb['gb_per_s']:.1f} GB/s**, `{cb['function']}` on a"
      f" {cb['buffer_bytes'] / 2**20:.0f} MiB {cb['dtype']} buffer (nothing donated),"
      f" bytes read + written / the median of {len(cb['samples_s'])} samples:"
      " the yardstick of the Bandwidth table."
    )
  lines += [
    "",
    "Times are medians over interleaved rounds; `×` is time / floor, where the floor"
    " is XLA's one-pass `jit(lambda x, g, b: x * g + b)` **forward** on the same tensor"
    " (also for the forward+backward table). Speedup columns are other / gnorm"
    " (> 1: gnorm faster). torch is the faster of contiguous NCHW and channels_last"
    " (marked). Equinox runs vmapped on NCHW input (its layout).",
    "",
  ]
  return lines


def _time_tables(results: dict, present: list) -> list[str]:
  cases, s = results["cases"], results["summary"]
  ratios = [o for o in _RATIOS if o in present]
  lines = []
  if "gnorm_pallas" in present:
    lines += [
      "`gnorm_pallas`: `group_norm(..., implementation=\"pallas\")`, gnorm's two Pallas"
      " (Triton) kernels for the forward, XLA's backward; `gnorm_pallas/gnorm` is its"
      " time / gnorm's default (XLA) path's: **< 1 means the kernels are faster**.",
      "",
    ]
  for d, title in (
    ("fwd", "Forward"),
    ("fwdbwd", "Forward + backward (y and grads for x, gamma, beta)"),
  ):
    head = ["shape", "floor"] + present + [f"{o}/gnorm" for o in ratios]
    lines += [
      f"## {title}",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|",
    ]
    for c in cases:
      fl = t(c, "floor", "fwd")
      row = [c["label"], fmt_t(t(c, "floor", d)) + ("" if d == "fwd" else " (fb)")]
      for n in present:
        tn = t(c, n, d)
        cell = "—" if tn is None else f"{fmt_t(tn)} ({tn / fl:.2f}×)"
        if n == "torch" and tn is not None:
          cell += torch_layout(c, d)
        if n in c["accuracy"] and not c["accuracy"][n]["ok"]:
          cell += " **WRONG**"
        row.append(cell)
      for o in ratios:
        a, g = t(c, o, d), t(c, "gnorm", d)
        row.append(f"{a / g:.2f}×" if a and g else "—")
      lines.append("| " + " | ".join(row) + " |")
    gm = ["**geomean**", ""]
    for n in present:
      e = s.get(f"{n}/floor/{d}")
      gm.append(f"{e['geomean']:.2f}×" if e else "—")
    for o in ratios:
      e = s.get(f"{o}/gnorm/{d}")
      gm.append(f"**{e['geomean']:.2f}×**" if e else "—")
    lines += ["| " + " | ".join(gm) + " |", ""]
    mins = [
      f"{o}/gnorm {s[f'{o}/gnorm/{d}']['geomean_of_min']:.2f}×"
      for o in ("gnorm_pallas", "flax", "haiku", "equinox", "torch")
      if f"{o}/gnorm/{d}" in s
    ]
    if mins:
      lines += [
        "Geometric-mean speedups from best-of-rounds instead of median times: "
        + ", ".join(mins)
        + ".",
        "",
      ]
    if d == "fwdbwd":
      lines += [
        "The floor column here is the floor's own forward+backward (fb);"
        " the × ratios still divide by its forward.",
        "",
      ]
  return lines


def _compile_and_memory(results: dict, jax_present: list) -> list[str]:
  cases = results["cases"]
  lines = [
    "## Compile time (lower + compile, fresh function, warm process)",
    "",
    "| shape | " + " | ".join(f"{n} fwd / fwd+bwd" for n in jax_present) + " |",
    "|---|" + "|".join(["--:"] * len(jax_present)) + "|",
  ]
  for c in cases:
    row = [c["label"]]
    for n in jax_present:
      e = c["compile_s"].get(n)
      row.append(f"{e['fwd'] * 1e3:.0f} / {e['fwdbwd'] * 1e3:.0f} ms" if e else "—")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")

  mem_impls = [n for n in jax_present if n != "floor"]
  both = {"gnorm", "flax"} <= set(mem_impls)
  lines += [
    "## Memory",
    "",
    "Compiled temp bytes (`jax.jit(f).lower(...).compile().memory_analysis()"
    ".temp_size_in_bytes`), forward / forward+backward.",
    "",
    "| shape | " + " | ".join(mem_impls) + (" | fwd+bwd gnorm/flax |" if both else " |"),
    "|---|" + "|".join(["--:"] * len(mem_impls)) + ("|--:|" if both else "|"),
  ]
  for c in cases:
    row = [c["label"]]
    for n in mem_impls:
      mm = c["memory"].get(n, {})
      row.append(f"{fmt_b(mm.get('fwd_temp_bytes'))} / {fmt_b(mm.get('fwdbwd_temp_bytes'))}")
    if both:
      tg = c["memory"].get("gnorm", {}).get("fwdbwd_temp_bytes")
      tf = c["memory"].get("flax", {}).get("fwdbwd_temp_bytes")
      row.append(f"{tg / tf:.2f}×" if tg is not None and tf else "—")
    lines.append("| " + " | ".join(row) + " |")
  lines += [
    "",
    "Residuals the backward keeps alive, for the bfloat16 input: the array"
    " leaves of the function `jax.vjp(f, x, gamma, beta)` returns (listed by tracing),"
    " in total and without the input `x` itself (the caller holds `x` anyway);"
    " ×x = in units of x's bytes.",
    "",
    "| shape | impl | residuals total | residuals besides x | full-size leaves |",
    "|---|---|--:|--:|---|",
  ]
  for c in cases:
    for n in mem_impls:
      r = c["memory"].get(n, {}).get("residuals")
      if not r:
        continue
      xb = r["x_bytes"] or 1
      lines.append(
        f"| {c['label']} | {n} | {fmt_b(r['total_bytes'])} "
        f"({r['total_bytes'] / xb:.2f}×x) | "
        f"{fmt_b(r['bytes_excluding_x'])} ({r['bytes_excluding_x'] / xb:.2f}×x) | "
        f"{', '.join(r['full_size_leaves']) or '—'} |"
      )
  lines.append("")
  return lines


def _traffic_markdown(results: dict, jax_present: list) -> list[str]:
  """Bytes moved per call (XLA's cost analysis), in units of x's bytes."""
  cases, s = results["cases"], results["summary"]
  impls = [n for n in jax_present if any(traffic(c, n, "fwd") for c in cases)]
  if "gnorm" not in impls or "flax" not in impls:
    return []
  lines = [
    "## Memory traffic",
    "",
    "Bytes a compiled call reads and writes, XLA's own estimate"
    " (`compiled.cost_analysis()['bytes accessed']`), in units of x's bytes,"
    " forward / forward+backward. Where a shape's time is set by memory"
    " bandwidth, no implementation can beat another by more than the ratio of"
    " their traffic: the last two columns put that ceiling beside the measured"
    " forward+backward speedup.",
    "",
    "| shape | " + " | ".join(impls) + " | fwd+bwd traffic flax/gnorm | fwd+bwd speed flax/gnorm |",
    "|---|" + "|".join(["--:"] * (len(impls) + 2)) + "|",
  ]
  for c in cases:
    xb = math.prod(c["shape"]) * jnp.dtype(c["dtype"]).itemsize
    row = [c["label"]]
    for n in impls:
      f, fb = traffic(c, n, "fwd"), traffic(c, n, "fwdbwd")
      row.append(f"{f / xb:.1f} / {fb / xb:.1f}" if f and fb else "—")
    tr = traffic_ratio(c, "flax", "fwdbwd")
    a, g = t(c, "flax", "fwdbwd"), t(c, "gnorm", "fwdbwd")
    row.append(f"{tr:.2f}×" if tr else "—")
    row.append(f"{a / g:.2f}×" if a and g else "—")
    lines.append("| " + " | ".join(row) + " |")
  e = s.get("traffic/flax/gnorm/fwdbwd")
  if e:
    sp = s.get("flax/gnorm/fwdbwd", {}).get("geomean")
    lines += [
      "| **geomean** | "
      + " | ".join([""] * len(impls))
      + f" | **{e['geomean']:.2f}×** | "
      + (f"**{sp:.2f}×**" if sp else "—")
      + " |",
    ]
  lines.append("")
  return lines


def _accuracy_and_targets(results: dict, present: list) -> list[str]:
  cases = results["cases"]
  impls_acc = [n for n in present if any(n in c["accuracy"] for c in cases)]
  lines = [
    "## Accuracy (same eps = 1e-5 for all)",
    "",
    "max |Δy| vs gnorm; and max|error|/max|reference| of y and of the worst gradient"
    " against a float64 NumPy reference (bounds: " + describe_bounds() + ").",
    "",
    "| shape | " + " | ".join(f"{n}: \\|Δy\\| vs gnorm; y, grad vs f64" for n in impls_acc) + " |",
    "|---|" + "|".join(["--:"] * len(impls_acc)) + "|",
  ]
  for c in cases:
    row = [c["label"]]
    for n in impls_acc:
      variants = ["torch_nchw", "torch_cl"] if n == "torch" else [n]
      cells = []
      for vn in variants:
        a = c["accuracy"].get(vn)
        if a is None:
          continue
        cells.append(
          f"{a.get('max_abs_dy_vs_gnorm', float('nan')):.1e}; {a['y_vs_ref']:.1e}, "
          f"{a['grad_vs_ref']:.1e}" + ("" if a["ok"] else " **WRONG**")
        )
      row.append(" / ".join(cells) or "—")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")

  lines += [
    "## Issue #5 and #13 targets",
    "",
    "Issue #13's rows are gnorm's Pallas kernels' targets on an H100 (n/a: they do not"
    " apply here; the copy time is x's bytes read + written at the copy bandwidth above).",
    "",
    "| target | met | detail |",
    "|---|---|---|",
  ]
  for ch in results["checks"]:
    lines.append(f"| {ch['target']} | {fmt_met(ch['met'])} | {ch['detail']} |")
  lines.append("")
  return lines


def to_markdown(results: dict, command: str) -> str:
  """The whole ``latest.md``."""
  cases = results["cases"]
  present = [n for n in _SHOWN if any(t(c, n, "fwd") for c in cases)]
  fused_torch = any(t(c, "torch", "fwd") for c in results.get("fused", {}).get("cases", []))
  lines = _header(results, command, "torch" in present or fused_torch)
  if not cases:  # --sections fused
    return "\n".join(lines + fused_markdown(results))
  lines += _time_tables(results, present)
  lines += ["## Bandwidth", ""] + bandwidth_rows(results, results, ["floor"] + present)
  jax_present = [n for n in _JAX_IMPLS if any(n in c["compile_s"] for c in cases)]
  lines += _compile_and_memory(results, jax_present)
  lines += _traffic_markdown(results, jax_present)
  lines += _accuracy_and_targets(results, present)
  lines += fused_markdown(results)
  return "\n".join(line for line in lines if line is not None)
