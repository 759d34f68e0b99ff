"""``gpu_bench.md``: the machine, the method, the time tables, the targets, and last a short
target summary (the GPU run's reply shows only the end of its output)."""

from __future__ import annotations

from . import machine
from .device_cases import ALL_IMPLS
from .device_cases import TITLES
from .device_targets import fmt_met
from .device_targets import net
from .device_targets import summary_lines
from .device_targets import wrong

_DIRECTIONS = (("fwd", "Forward"), ("fwdbwd", "Forward+backward"))


def _us(s: float | None) -> str:
  if s is None:
    return "—"
  us = s * 1e6
  return f"{us:.1f}" if us < 10 else f"{us:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
  return f"{a / b:.2f}x" if a and b else "—"


def _cell(case: dict, impl: str, d: str) -> str:
  key = f"{impl}/{d}"
  if key in case["errors"]:
    return "error"
  t = case["times"].get(key)
  if t is None:
    return "—"
  text = _us(t["net_s"]) + (f" ({_us(t['raw_s'])})" if t["overhead_s"] else "")
  if not case["accuracy"].get(key, {}).get("ok", True):
    text += " **WRONG**"
  return text


def _pct(case: dict, impl: str, d: str) -> str:
  t = case["times"].get(f"{impl}/{d}")
  return f"{t['pct_copy']:.0%}" if t else "—"


def _header(r: dict, command: str) -> list[str]:
  m = r["machine"]
  v = m["versions"]
  vers = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax", "equinox", "dm-haiku",
                                           "torch", "triton", "numpy") if v.get(k))
  torch = m.get("torch_device_name") or r["skipped"].get("torch_nchw", "not run")
  return [
    "# gnorm device-time benchmark (issues 19 and 20)",
    "",
    f"`{command}` — {m['date_utc']}, {r['wall_s']:.0f} s",
    "",
    f"Device: **{m['device']}** (JAX backend `{m['jax_backend']}`; torch: {torch}); host"
    f" {m['cpu']}, {m['cores']} cores; Python {m['python']}; {vers}; {machine.provenance(m)}.",
    "",
  ]


def _method(r: dict) -> list[str]:
  s, cb = r["settings"], r["copy_bandwidth"]
  return [
    "## Method",
    "",
    f"* **JAX**: each implementation's call runs `1 + n*u` times inside one jitted program:"
    f" one call, then a `lax.fori_loop` of `n` iterations (a static trip count) of `u` ="
    f" {s['unroll']} calls each, every call's output feeding the next call's input"
    " (forward: x <- y; forward+backward: x <- y, ct <- dx, dgamma and dbeta summed into"
    " the carry), with an `optimization_barrier` between calls so that XLA fuses nothing"
    " across them (XLA's copies of x-sized arrays inside the loop, where it makes any, are"
    " listed below). Time per call = the loop program's wall time (after `block_until_ready`)"
    f" / calls, median of {s['samples']} samples of back-to-back runs"
    + (f" (~{s['sample_s'] * 1e3:.0f} ms each)." if s["sample_s"] else " (one run each)."),
    "* **Loop overhead**, measured in this run for every shape, dtype and direction: the same"
    " loop and carry with a trivial body (one element of each carried array set to a"
    " traced 1.0), per call; column `loop`. Cells give **net** time (raw − loop) with the raw"
    " time in parentheses, in µs per call; **ratios, % of copy and the targets use net**.",
    "* **torch**: the calls captured in one CUDA graph after a warm-up on a side stream,"
    " replays timed with CUDA events (no loop overhead: no parentheses); forward under"
    " `no_grad`, forward+backward `torch.autograd.grad` inside the graph. Weight and bias in"
    f" x's dtype. torch.compile: Inductor, {r['torch_compile_layout']}, bfloat16 plain cases.",
    f"* **Copy bandwidth**: **{cb['gb_per_s']:.0f} GB/s** ({cb['function']}, on"
    f" {cb['buffer_bytes'] / 2**20:.0f} MiB, read + write counted). % of copy: the least"
    " bytes a pass moves (forward 2 x-sizes, forward+backward 5, in x's dtype) / net time /"
    " copy bandwidth.",
    "* Inputs N(0.5, 1) (`gnorm_bench.cases.make_data`), G = 32, eps 1e-5; JAX parameters"
    " float32. flax's bfloat16 input gives float32 output; the loop casts it back to"
    " bfloat16 (fused into flax's last kernel). With SiLU: gnorm's `activation=\"silu\"`"
    " (fused), everyone else `silu` after their GroupNorm. Small cases stay in the L2"
    " cache across chained calls, as a layer's input just written by the previous layer"
    " would.",
    "* **Accuracy**: every timed program's first call against the float64 reference"
    " (`gnorm_bench.cases`), on all channels or, above 1M elements, those of groups 0, 1 and"
    " G−1; out of bounds: **WRONG**, and the targets treat it as failing.",
    f"* Budget {s['budget_s']:.0f} s; {r['plan']['items'] - len(r['not_measured'])} of"
    f" {r['plan']['items']} items run, in this order of implementations:"
    f" {', '.join(r['plan']['order'])}.",
    "",
  ]


def _tables(r: dict) -> list[str]:
  cases = r["cases"]
  impls = [i for i in ALL_IMPLS if any(any(k.startswith(i + "/") for k in c["times"])
                                       for c in cases)]
  lines = []
  for act, act_title in ((None, ""), ("silu", " — GroupNorm + SiLU")):
    sel = [c for c in cases if c["activation"] == act and c["times"]]
    if not sel:
      continue
    for d, title in _DIRECTIONS:
      lines += [f"## {title}{act_title} (µs per call)", "",
                "| case | loop | " + " | ".join(TITLES[i] for i in impls)
                + " | flax/gnorm | prev/gnorm | gnorm % copy | pallas % copy |",
                "|---|" + "--:|" * (len(impls) + 5)]
      for c in sel:
        oh = c["overhead"].get(d, {}).get("per_call_s")
        cells = [_cell(c, i, d) for i in impls]
        lines.append(
          f"| {c['label']} | {_us(oh)} | " + " | ".join(cells)
          + f" | {_ratio(net(c, 'flax', d), net(c, 'gnorm', d))}"
          f" | {_ratio(net(c, 'gnorm_prev', d), net(c, 'gnorm', d))}"
          f" | {_pct(c, 'gnorm', d)} | {_pct(c, 'gnorm_pallas', d)} |")
      lines.append("")
  return lines


def _copy_table(r: dict) -> list[str]:
  """Every implementation's share of the copy bandwidth, forward / forward+backward."""
  cases = [c for c in r["cases"] if c["times"]]
  impls = [i for i in ALL_IMPLS if any(f"{i}/fwd" in c["times"] for c in cases)]
  if not cases:
    return []
  lines = ["## Share of the copy bandwidth (forward / forward+backward)", "",
           "| case | " + " | ".join(TITLES[i] for i in impls) + " |",
           "|---|" + "--:|" * len(impls)]
  for c in cases:
    lines.append(f"| {c['label']} | "
                 + " | ".join(f"{_pct(c, i, 'fwd')} / {_pct(c, i, 'fwdbwd')}" for i in impls)
                 + " |")
  return lines + [""]


def _profile(r: dict) -> list[str]:
  p = r.get("profile")
  if p is None:
    return []
  lines = ["## Kernel profile", ""]
  if "error" in p:
    return lines + [f"No kernel times: {p['error']}", ""]
  lines += [f"From a `jax.profiler` trace ({p['source']}): summed kernel time and kernels"
            " per call (the loop's counter kernels included), against the loop's net time."
            + (f" {p['note']}." if p.get("note") else ""), "",
            "| program | kernel µs/call | kernels/call |", "|---|--:|--:|"]
  for m in p["modules"].values():
    k, n = m["kernel_s_per_call"], m["kernels_per_call"]
    lines.append(f"| {m['label']} | {_us(k)} | {'—' if n is None else f'{n:.1f}'} |")
  return lines + [""]


def _problems(r: dict) -> list[str]:
  lines = ["## Not measured, errors, accuracy", ""]
  for name, why in r["skipped"].items():
    lines.append(f"* skipped {name}: {why}")
  for c in r["cases"]:
    for key, msg in c["errors"].items():
      lines.append(f"* error {c['label']} {key}: {msg}")
    for key, a in c["accuracy"].items():
      if not a["ok"]:
        lines.append(f"* **WRONG** {c['label']} {key}: {a}")
    for key, t in c["times"].items():
      if not t.get("carry", {}).get("finite", True):
        lines.append(f"* non-finite loop carry {c['label']} {key}")
      if t.get("overhead_dominates"):
        lines.append(f"* the loop's own cost is over half the raw time: {c['label']} {key}")
  copied = sorted({f"{c['label']} {k}" for c in r["cases"]
                   for k, t in [*c["times"].items(), *(() if c["activation"] else (
                     ("overhead loop/" + d, o) for d, o in c["overhead"].items()))]
                   if t.get("loop_copies")})
  if copied:
    lines.append("* XLA copies x-sized arrays inside the loop's body (a cost of the loop form,"
                 f" in the times; `loop_copies` in the json) in {len(copied)} programs: "
                 + ", ".join(copied[:12]) + (", ..." if len(copied) > 12 else ""))
  nm = r["not_measured"]
  if nm:
    lines.append(f"* not measured ({len(nm)} items, time budget), first: {nm[0]['case']}"
                 f" {nm[0]['impl']} {nm[0]['direction']} ({nm[0]['reason']})")
  worst = {}
  for c in r["cases"]:
    for key, a in c["accuracy"].items():
      impl = key.split("/")[0]
      e = max(a["y_vs_ref"], a.get("grad_vs_ref", 0.0))
      worst[impl] = max(worst.get(impl, 0.0), e)
  lines.append("* worst max|error|/max|ref| (y and gradients): "
               + ", ".join(f"{i} {e:.1e}" for i, e in worst.items()))
  n_wrong = sum(wrong(c, i) for c in r["cases"] for i in ALL_IMPLS)
  lines += [f"* accuracy: {'all within bounds' if not n_wrong else f'{n_wrong} WRONG'}", ""]
  return lines


def targets_table(rows: list[dict]) -> list[str]:
  lines = ["| id | met | target | detail |", "|---|---|---|---|"]
  for t in rows:
    lines.append(f"| {t['id']} | {fmt_met(t['met'])} | {t['target']} | {t['detail']} |")
  return lines


def to_markdown(r: dict, command: str) -> str:
  lines = _header(r, command) + _method(r) + _tables(r) + _copy_table(r) + _profile(r)
  lines += _problems(r)
  lines += ["## Targets", "", *targets_table(r["targets"]), "",
            "## Summary (model-level targets: drop_in.py; gpu_check.sh's summary has them)", "",
            "```", *summary_lines(r["targets"]), "```", ""]
  return "\n".join(lines)
