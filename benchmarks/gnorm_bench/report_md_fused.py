"""``latest.md``'s fused GroupNorm + SiLU section (issue #7)."""

from __future__ import annotations

from .report_util import bandwidth_rows
from .report_util import fmt_b
from .report_util import fmt_met
from .report_util import fmt_t
from .summary import kept
from .summary import t
from .summary import torch_layout

# Column titles of the fused section, in table order.
FUSED_TITLES = {
  "gnorm_fused": "gnorm fused",
  "gnorm_pallas_fused": "gnorm pallas fused",
  "gnorm_unfused": "gnorm + silu",
  "flax": "flax + silu",
  "torch": "torch + silu",
}
_DIRECTIONS = (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))


def _time_table(cases: list, s: dict, present: list) -> list[str]:
  others = [
    (n, title)
    for n, title in (
      ("gnorm_pallas_fused", "pallas"),
      ("gnorm_unfused", "unfused"),
      ("flax", "flax"),
      ("torch", "torch"),
    )
    if n in present
  ]
  head = ["shape", "pass", "floor"] + [FUSED_TITLES[n] for n in present]
  head += [f"{title}/fused" for _, title in others]
  lines = [
    "| " + " | ".join(head) + " |",
    "|" + "|".join(["---", "---"] + ["--:"] * (len(head) - 2)) + "|",
  ]
  for c in cases:
    fl = t(c, "floor", "fwd")
    for d, dn in _DIRECTIONS:
      row = [c["label"], dn, fmt_t(t(c, "floor", d)) if fl else "—"]
      for n in present:
        tn = t(c, n, d)
        cell = "—" if tn is None else fmt_t(tn) + (f" ({tn / fl:.2f}×)" if fl else "")
        if n == "torch" and tn is not None:
          cell += torch_layout(c, d)
        acc = [a for k, a in c["accuracy"].items() if k == n or k.startswith(n + "_")]
        if acc and not all(a["ok"] for a in acc):
          cell += " **WRONG**"
        row.append(cell)
      for n, _ in others:
        a, g = t(c, n, d), t(c, "gnorm_fused", d)
        row.append(f"{a / g:.2f}×" if a and g else "—")
      lines.append("| " + " | ".join(row) + " |")
  for d, dn in _DIRECTIONS:
    gm = ["**geomean**", dn, ""]
    for n in present:
      e = s.get(f"{n}/floor/{d}")
      gm.append(f"{e['geomean']:.2f}×" if e else "—")
    for n, _ in others:
      e = s.get(f"{n}/gnorm_fused/{d}")
      gm.append(f"**{e['geomean']:.2f}×**" if e else "—")
    lines.append("| " + " | ".join(gm) + " |")
  mins = [
    f"{title}/fused {s[key]['geomean_of_min']:.2f}× ({dn})"
    for d, dn in _DIRECTIONS
    for n, title in others
    if (key := f"{n}/gnorm_fused/{d}") in s
  ]
  lines += ["", "From best-of-rounds times instead of medians: " + ", ".join(mins) + ".", ""]
  return lines


def _memory_table(cases: list, present: list) -> list[str]:
  lines = [
    "Memory: compiled temp bytes (`memory_analysis().temp_size_in_bytes`) of the"
    " forward / forward+backward, and what the backward keeps: the array leaves of"
    " `jax.vjp(f, x, gamma, beta)`'s function (torch: the tensors autograd saves,"
    " seen through `saved_tensors_hooks`, for the layout of its fwd+bwd time), in"
    " total and without `x` itself; ×x = in units of x's bytes. Last column: max"
    " error / max reference of y and of the worst gradient against a float64 NumPy"
    " reference of silu(group_norm(x)).",
    "",
    "| shape | impl | temp fwd / fwd+bwd | kept total | kept besides x"
    " | full-size kept | y, grad vs f64 |",
    "|---|---|--:|--:|--:|---|--:|",
  ]
  for c in cases:
    for n in present:
      mm = c["memory"].get(n, {})
      temp = (
        f"{fmt_b(mm.get('fwd_temp_bytes'))} / {fmt_b(mm.get('fwdbwd_temp_bytes'))}"
        if mm.get("fwdbwd_temp_bytes") is not None
        else "—"
      )
      r = kept(c, n)
      if r:
        xb = r["x_bytes"] or 1
        kept_cells = [
          f"{fmt_b(r['total_bytes'])} ({r['total_bytes'] / xb:.2f}×x)",
          f"{fmt_b(r['bytes_excluding_x'])} ({r['bytes_excluding_x'] / xb:.2f}×x)",
          ", ".join(r["full_size_leaves"]) or "—",
        ]
      else:
        kept_cells = ["—", "—", "—"]
      errs = []
      for k in ("torch_nchw", "torch_cl") if n == "torch" else (n,):
        a = c["accuracy"].get(k)
        if a:
          errs.append(
            f"{a['y_vs_ref']:.1e}, {a['grad_vs_ref']:.1e}" + ("" if a["ok"] else " **WRONG**")
          )
      lines.append(
        f"| {c['label']} | {FUSED_TITLES[n]} | {temp} | "
        + " | ".join(kept_cells)
        + f" | {' / '.join(errs) or '—'} |"
      )
  return lines


def fused_markdown(results: dict) -> list[str]:
  """The fused section's tables and target checks; nothing where it did not run."""
  fused = results.get("fused")
  if not fused or not fused["cases"]:
    return []
  cases, s = fused["cases"], fused["summary"]
  present = [n for n in FUSED_TITLES if any(t(c, n, "fwd") for c in cases)]
  lines = [
    "## Fused GroupNorm + SiLU",
    "",
    '`gnorm fused`: `group_norm(p, x, G, activation="silu")`, SiLU in the same'
    " pass, the backward recomputing the pre-activation from `x`; `gnorm + silu`:"
    " `jax.nn.silu(group_norm(p, x, G))`; `flax + silu`:"
    " `jax.nn.silu(flax.linen.GroupNorm(G)(x))`; `torch + silu`:"
    " `F.silu(F.group_norm(x, G, w, b))`, the faster of NCHW and channels_last."
    " Interleaved medians; `×` is time / the floor's forward, as above;"
    " `other/fused` > 1: the fused gnorm is faster.",
    "",
  ]
  if "gnorm_pallas_fused" in present:
    lines += [
      '`gnorm pallas fused`: the same with `implementation="pallas"` (gnorm\'s Pallas'
      " kernels for the forward); `pallas/fused` is its time / the XLA path's:"
      " **< 1 means the kernels are faster**.",
      "",
    ]
  lines += _time_table(cases, s, present)
  lines += _memory_table(cases, present)
  lines += ["", "### Fused bandwidth", ""]
  lines += bandwidth_rows(results, fused, ["floor"] + present, FUSED_TITLES)
  lines += ["### Fused targets (issues #7 and #13)", ""]
  lines += ["| fused target | met | detail |", "|---|---|---|"]
  for ch in fused["checks"]:
    lines.append(f"| {ch['target']} | {fmt_met(ch['met'])} | {ch['detail']} |")
  lines.append("")
  return lines
