"""From measurements to ratios, geometric means and the issues' target checks."""

from __future__ import annotations

import math

from .cases import MEMORY_CASE

# Names in the order the tables show them.
MAIN_NAMES = ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "torch", "floor")
FUSED_NAMES = ("gnorm_fused", "gnorm_pallas_fused", "gnorm_unfused", "flax", "torch", "floor")


def geomean(xs) -> float:
  xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
  return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def t(case: dict, name: str, direction: str, stat: str = "median_s") -> float | None:
  """Median (or ``stat``) seconds; ``torch``: the faster of its two layouts."""
  if name == "torch":
    ts = [t(case, v, direction, stat) for v in ("torch_nchw", "torch_cl")]
    ts = [x for x in ts if x is not None]
    return min(ts) if ts else None
  e = case["times"].get(f"{name}/{direction}")
  return e[stat] if e else None


def torch_layout(case: dict, d: str) -> str:
  """" cl" or " nchw": torch's faster layout for direction ``d``, as the tables mark it."""
  a, b = t(case, "torch_nchw", d), t(case, "torch_cl", d)
  if a is None or b is None:
    return ""
  return " cl" if b < a else " nchw"


def kept(case: dict, name: str) -> dict | None:
  """Residuals of ``name``; ``torch``: those of its faster fwd+bwd layout."""
  if name == "torch":
    name = "torch_cl" if torch_layout(case, "fwdbwd") == " cl" else "torch_nchw"
  return case["memory"].get(name, {}).get("residuals")


def bandwidth(case: dict, name: str, direction: str) -> dict | None:
  """Achieved bandwidth entry; ``torch``: that of its faster layout (same bytes)."""
  if name == "torch":
    es = [bandwidth(case, v, direction) for v in ("torch_nchw", "torch_cl")]
    es = [e for e in es if e is not None]
    return max(es, key=lambda e: e["gb_per_s"]) if es else None
  return case.get("bandwidth", {}).get(f"{name}/{direction}")


def traffic(case: dict, name: str, direction: str) -> int | None:
  return case["memory"].get(name, {}).get(f"{direction}_bytes_accessed")


def traffic_ratio(case: dict, name: str, direction: str) -> float | None:
  """Bytes ``name`` moves / bytes gnorm moves (XLA's estimate)."""
  a, g = traffic(case, name, direction), traffic(case, "gnorm", direction)
  return a / g if a and g else None


def _ratios(cases: list, num: tuple, den: tuple) -> list:
  """``t(c, *num) / t(c, *den)`` per case, None where either is missing."""
  out = []
  for c in cases:
    a, b = t(c, *num), t(c, *den)
    out.append(a / b if a and b else None)
  return out


def _add_ratio_summaries(summary: dict, cases: list, ref: str, others: tuple, names: tuple) -> None:
  """Speedups other/ref (medians, and best-of-rounds as a second opinion on a
  loaded machine), time / the floor's forward, and achieved bandwidth as a
  fraction of the copy bandwidth, per direction."""
  for d in ("fwd", "fwdbwd"):
    for other in others:
      sp = _ratios(cases, (other, d), (ref, d))
      if any(s is not None for s in sp):
        sm = _ratios(cases, (other, d, "min_s"), (ref, d, "min_s"))
        summary[f"{other}/{ref}/{d}"] = {
          "per_case": sp,
          "geomean": geomean(sp),
          "geomean_of_min": geomean(sm),
        }
    for name in names:
      fl = _ratios(cases, (name, d), ("floor", "fwd"))
      if any(s is not None for s in fl):
        summary[f"{name}/floor/{d}"] = {"per_case": fl, "geomean": geomean(fl)}
  for d in ("fwd", "fwdbwd"):
    for name in names:
      bw = [(e := bandwidth(c, name, d)) and e["fraction_of_copy"] for c in cases]
      if any(b is not None for b in bw):
        summary[f"{name}/copy/{d}"] = {"per_case": bw, "geomean": geomean(bw)}


def _accuracy_check(cases: list) -> tuple[str, bool, str]:
  """The target every section shares: no implementation outside its bound
  (nor one that failed to compile, see ``run._compile_all``)."""
  bad = [f"{c['label']} {n}" for c in cases for n, a in c["accuracy"].items() if not a["ok"]]
  failed = [f"{c['label']} {n}" for c in cases for n in c.get("errors", {})]
  parts = ["mismatch: " + ", ".join(bad)] if bad else []
  parts += ["failed to compile: " + ", ".join(failed)] if failed else []
  return (
    "every implementation within the accuracy bound",
    not parts,
    "; ".join(parts) or "all agree",
  )


def _check_records(checks: list) -> list[dict]:
  return [{"target": t, "met": bool(ok), "detail": d} for t, ok, d in checks]


def _memory_checks(cases: list) -> list:
  """Issue #5's memory targets, on the cases of the memory dtype (bfloat16)."""
  mem_cases = [c for c in cases if c["dtype"] == MEMORY_CASE.dtype]
  checks = []
  for c in mem_cases:
    # Several such cases (--cases sd-unet): each detail says which.
    where = f"{c['label']}: " if len(mem_cases) > 1 else ""
    m = c["memory"]
    if "gnorm" in m and "flax" in m:
      tg, tf = m["gnorm"].get("fwdbwd_temp_bytes"), m["flax"].get("fwdbwd_temp_bytes")
      if tg is not None and tf:
        checks.append(
          (
            "bf16 fwd+bwd temp bytes <= half of flax's",
            tg <= tf / 2,
            f"{where}gnorm {tg:,} B vs flax {tf:,} B ({tg / tf:.2f}x)",
          )
        )
    if "gnorm" in m and "residuals" in m["gnorm"]:
      r = m["gnorm"]["residuals"]
      big = [s for s in r["full_size_leaves"] if not s.endswith("(= x)")]
      checks.append(
        (
          "backward keeps only x and per-(N, G) statistics",
          not big,
          f"{where}residuals {r['total_bytes']:,} B, {r['bytes_excluding_x']:,} B besides x"
          + (f"; full-size: {', '.join(big)}" if big else ""),
        )
      )
  return checks


def summarize(results: dict) -> None:
  """Adds the main section's ratios, geometric means and issue #5's target checks."""
  cases = results["cases"]
  summary = {}
  others = ("gnorm_pallas", "flax", "haiku", "equinox", "torch")
  _add_ratio_summaries(summary, cases, "gnorm", others, MAIN_NAMES)
  for d in ("fwd", "fwdbwd"):
    cg = [c["compile_s"].get("gnorm", {}).get(d) for c in cases]
    cf = [c["compile_s"].get("flax", {}).get(d) for c in cases]
    if all(cg) and all(cf):
      summary[f"compile/flax/gnorm/{d}"] = geomean([f / g for f, g in zip(cf, cg, strict=True)])

  for d in ("fwd", "fwdbwd"):
    tr = [traffic_ratio(c, "flax", d) for c in cases]
    if any(x is not None for x in tr):
      summary[f"traffic/flax/gnorm/{d}"] = {"per_case": tr, "geomean": geomean(tr)}

  checks = []
  if "flax/gnorm/fwd" in summary and "flax/gnorm/fwdbwd" in summary:
    f, fb = summary["flax/gnorm/fwd"], summary["flax/gnorm/fwdbwd"]
    losing = [
      f"{c['label']} {dn}"
      for i, c in enumerate(cases)
      for d, dn in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))
      if (s := summary[f"flax/gnorm/{d}"]["per_case"][i]) is not None and s < 1
    ]
    checks.append(
      (
        "faster than flax on every shape, both directions",
        not losing,
        "losing: " + ", ".join(losing) if losing else "all faster",
      )
    )
    checks.append(
      ("geomean flax/gnorm forward >= 1.5x", f["geomean"] >= 1.5, f"{f['geomean']:.2f}x")
    )
    checks.append(
      ("geomean flax/gnorm fwd+bwd >= 2.0x", fb["geomean"] >= 2.0, f"{fb['geomean']:.2f}x")
    )
  if "torch/gnorm/fwdbwd" in summary:
    tb = summary["torch/gnorm/fwdbwd"]["geomean"]
    tf = summary["torch/gnorm/fwd"]["geomean"]
    checks.append(
      (
        "fwd+bwd at least on par with torch (geomean torch/gnorm >= 1)",
        tb >= 1.0,
        f"{tb:.2f}x (forward: {tf:.2f}x)",
      )
    )
  checks += _memory_checks(cases)
  if "compile/flax/gnorm/fwd" in summary:
    cf, cb = summary["compile/flax/gnorm/fwd"], summary["compile/flax/gnorm/fwdbwd"]
    checks.append(
      (
        "compile time no worse than flax (geomean flax/gnorm >= 1)",
        cf >= 1.0 and cb >= 1.0,
        f"fwd {cf:.2f}x, fwd+bwd {cb:.2f}x",
      )
    )
  checks.append(_accuracy_check(cases))
  results["summary"] = summary
  results["checks"] = _check_records(checks)


def summarize_fused(fused: dict) -> None:
  """Adds the fused section's ratios, geometric means and issue #7's target checks."""
  cases = fused["cases"]
  summary = {}
  others = ("gnorm_pallas_fused", "gnorm_unfused", "flax", "torch")
  _add_ratio_summaries(summary, cases, "gnorm_fused", others, FUSED_NAMES)
  checks = []
  big = [
    f"{c['label']}: {s}"
    for c in cases
    if (r := kept(c, "gnorm_fused"))
    for s in r["full_size_leaves"]
    if not s.endswith("(= x)")
  ]
  checks.append(
    (
      "fused backward keeps only x and per-(N, G) statistics",
      not big,
      "full-size: " + ", ".join(big) if big else "no full-size leaf besides x",
    )
  )
  worse = [
    c["label"]
    for c in cases
    if (f := c["memory"].get("gnorm_fused", {}).get("fwdbwd_temp_bytes")) is not None
    and (u := c["memory"].get("gnorm_unfused", {}).get("fwdbwd_temp_bytes")) is not None
    and f > 1.01 * u
  ]
  checks.append(
    (
      "fused fwd+bwd temp bytes <= unfused (1% slack)",
      not worse,
      "more on: " + ", ".join(worse) if worse else "on every shape",
    )
  )
  if "gnorm_unfused/gnorm_fused/fwdbwd" in summary:
    e = summary["gnorm_unfused/gnorm_fused/fwdbwd"]
    checks.append(
      (
        "fused fwd+bwd no slower than unfused (geomean unfused/fused >= 1)",
        e["geomean"] >= 1.0,
        f"{e['geomean']:.2f}× (best-of-rounds {e['geomean_of_min']:.2f}×; forward "
        f"{summary['gnorm_unfused/gnorm_fused/fwd']['geomean']:.2f}×)",
      )
    )
  checks.append(_accuracy_check(cases))
  fused["summary"] = summary
  fused["checks"] = _check_records(checks)
