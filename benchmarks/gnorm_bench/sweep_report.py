"""``pallas_sweep.md``: the machine, the method, every candidate's times, the decisions, and
last the decisions in a few lines (a GPU run's reply shows only the end of its output)."""

from __future__ import annotations

from . import machine
from .sweep_plan import decide


def _us(s: float | None) -> str:
  if s is None:
    return "—"
  us = s * 1e6
  return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def _cell(rec: dict | None) -> str:
  if not rec:
    return "—"
  text = f"{_us(rec['net_s'])} ({_us(rec['raw_s'])})"
  return text if rec["ok"] else text + " **WRONG**"


def _pct(rec: dict | None) -> str:
  return f"{rec['pct_copy']:.0%}" if rec and rec.get("pct_copy") else "—"


def _block(b: dict | None) -> str:
  return "—" if b is None else f"({b['bs']}, {b['bc']}, {b['warps'] or 'h'})"


def summary_lines(results: dict) -> list[str]:
  """One line per class: what the table would say, and why."""
  lines = []
  for r in results["cases"]:
    if not (r["xla"] and r["candidates"]):
      lines.append(f"{r['label']}: not swept")
      continue
    e = decide(r, results["min_speedup"])
    lines.append(f"{r['label']} [{e['size_class']}, {e['forward_plan']}]: {e['implementation']},"
                 f" forward {_block(e['forward'])}, backward {_block(e['backward'])} —"
                 f" {e['reason']}")
  n = len(results["not_swept"])
  lines.append(f"{n} items not swept" + (f" (first: {results['not_swept'][0]['case']}"
                                          f" {results['not_swept'][0]['what']})" if n else ""))
  return lines


def _header(results: dict) -> list[str]:
  m = results["machine"]
  v = m["table_versions"]
  vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
  lines = ["# gnorm Pallas tile sweep", ""]
  if results["quick"]:
    lines += ["**DRY RUN (`--quick`): a tiny shape, Pallas's interpreter off a GPU — the"
              " times mean nothing, and `--install` refuses this table.**", ""]
  cb = results.get("copy_bandwidth") or {}
  lines += [
    f"`{results['command']}` — {m['date_utc']}, {results.get('wall_s', 0):.0f} s of a"
    f" {results['budget_s']:.0f} s budget",
    "",
    f"Device: **{m['device']}** (JAX backend `{m['jax_backend']}`); {vers};"
    f" {machine.provenance(m)}. Copy bandwidth {cb.get('gb_per_s', 0):.0f} GB/s.",
    "",
  ]
  return lines


def _method(results: dict) -> list[str]:
  return ["## Method", "", results["method"], "",
          f"Plan: {results['plan']['items']} items ({results['plan']['cases']} cases,"
          f" {results['plan']['candidates']} candidate blocks), estimated"
          f" {results['plan']['estimated_s']:.0f} s before anything ran.", ""]


def _case_table(r: dict, min_speedup: float) -> list[str]:
  lines = [f"### {r['label']} ({r['size_class']}, forward plan {r['forward_plan']},"
           f" {r['elements']:,} elements)", ""]
  oh = r["overhead"]
  lines += [f"Loop cost per call: forward {_us(oh.get('fwd'))} µs, forward+backward"
            f" {_us(oh.get('fwdbwd'))} µs. Cells: net µs per call (raw).", "",
            "| implementation | block (bs, bc, warps; h = heuristic) | forward | fwd+bwd |"
            " % copy fwd / fwd+bwd | compile s | lowered grid |",
            "|---|---|--:|--:|--:|--:|---|"]
  rows = [("xla", None, r["xla"], "—")]
  rows += [("pallas", c["block"], c, c.get("grid", "—")) for c in r["candidates"]]
  for impl, b, rec, g in rows:
    f, fb = rec.get("fwd"), rec.get("fwdbwd")
    comp = "/".join(f"{x['compile_s']:.1f}" for x in (f, fb) if x)
    lines.append(f"| {impl} | {_block(b)} | {_cell(f)} | {_cell(fb)} | {_pct(f)} / {_pct(fb)}"
                 f" | {comp or '—'} | {g} |")
  again = r["xla"].get("fwdbwd", {}).get("again_net_s")
  if again is not None:
    lines += ["", f"XLA forward+backward timed again: {_us(again)} µs (spread"
              f" {r['spread']:.1%})."]
  for what, msg in r["errors"].items():
    lines += ["", f"* error, {what}: {msg}"]
  if r["xla"] and r["candidates"]:
    e = decide(r, min_speedup)
    lines += ["", f"**Decision: {e['implementation']}**, forward {_block(e['forward'])},"
              f" backward {_block(e['backward'])}: {e['reason']}."]
  return lines + [""]


def to_markdown(results: dict) -> str:
  lines = _header(results) + _method(results) + ["## Cases", ""]
  for r in results["cases"]:
    lines += _case_table(r, results["min_speedup"])
  if results["not_swept"]:
    lines += ["## Not swept", ""]
    lines += [f"* {n['case']} {n['what']}: {n['reason']}" for n in results["not_swept"]]
    lines.append("")
  for note in results.get("notes", []):
    lines += [f"* {note}", ""]
  lines += ["## Decisions", "", "```", *summary_lines(results), "```", ""]
  return "\n".join(lines)
