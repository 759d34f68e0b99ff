"""Issues 19 and 20's targets, each met, not met, or not applicable, from measured times.

Pure Python on the results' dicts (no JAX), so that ``gpu_check.sh``'s final summary can
rebuild them cheaply and the tests can feed them synthetic timings.

Each row: ``{"id", "issue", "target", "met", "value", "summary", "detail"}``; ``met`` is
True, False or None. None: not applicable (off a GPU; an implementation it compares was
not run) or not decided (some of its cases were not measured, and those measured meet
it). Times are device times per call with the loop's own cost subtracted (``net_s``); an
implementation whose outputs failed the accuracy check on a case fails every target on
that case ("WRONG"): a fast wrong kernel cannot win.

Issue 20 is about gnorm's kernels: ``implementation="pallas"`` or whatever the default
picks on the GPU; its rows are evaluated for both and met where either meets them.
"""

from __future__ import annotations

import math

from .device_cases import BANDWIDTH_MIN_ELEMENTS
from .device_cases import COMPILE_MIN_ELEMENTS

KERNEL_SUBJECTS = ("gnorm_pallas", "gnorm")
# Where gnorm_prev was ahead of flax on the H200 (GPU_NOTES.md); 19d covers every such case.
PREV_AHEAD_EXAMPLES = ("1x512x512x128", "32x32x32x640")
TARGETS = (
  ("19a-fwd", 19, "gnorm default >= 1.0x flax.linen.GroupNorm, forward, every plain case"),
  ("19a-fwdbwd", 19, "gnorm default >= 1.0x flax.linen.GroupNorm, fwd+bwd, every plain case"),
  ("19b", 19, "gnorm default fwd+bwd >= 1.3x flax, geomean over the plain cases"),
  ("19c-fwd", 19, "fused GN+SiLU (activation='silu') >= 1.0x flax + jax.nn.silu, forward,"
   " every case"),
  ("19c-fwdbwd", 19, "fused GN+SiLU >= 1.0x flax + jax.nn.silu, fwd+bwd, every case"),
  ("19d", 19, "no case > 5% slower than gnorm_prev where gnorm_prev beat flax (e.g. "
   + " and ".join(PREV_AHEAD_EXAMPLES) + ")"),
  ("19m-memory", 19, "drop-in train step temp memory <= flax's (drop_in.py)"),
  ("19m-speed", 19, "drop-in train step no slower than flax's (drop_in.py)"),
  ("20a", 20, "kernels fwd+bwd >= 2x flax, geomean over the plain cases"),
  ("20b", 20, "kernels fwd+bwd >= 1.0x flax, every plain case"),
  ("20c", 20, "kernels faster than torch.compile (NCHW), fwd and fwd+bwd, every bf16 plain"
   " case of >= 8M elements"),
  ("20d", 20, "kernels fwd+bwd >= 60% of copy bandwidth (5 x-sizes), plain cases >= 16M"
   " elements"),
  ("20e", 20, "kernels forward >= 70% of copy bandwidth (2 x-sizes), plain cases >= 16M"
   " elements"),
  ("20f", 20, "fused kernels GN+SiLU fwd+bwd >= 2x flax + jax.nn.silu, every case"),
  ("20m", 20, "train step >= 1.15x flax's speed with temp memory <= flax's (drop-in or"
   " fused, drop_in.py)"),
)
_TEXT = {tid: (issue, text) for tid, issue, text in TARGETS}
MODEL_IDS = ("19m-memory", "19m-speed", "20m")


def geomean(xs) -> float | None:
  xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
  return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _n(k: int) -> str:
  return f"{k} case" + ("" if k == 1 else "s")


def net(case: dict, impl: str, d: str) -> float | None:
  e = case.get("times", {}).get(f"{impl}/{d}")
  return e["net_s"] if e else None


def wrong(case: dict, impl: str) -> bool:
  return any(not a["ok"] for k, a in case.get("accuracy", {}).items()
             if k.split("/")[0] == impl)


def _row(tid: str, met, value, summary: str, detail: str) -> dict:
  issue, text = _TEXT[tid]
  return {"id": tid, "issue": issue, "target": text, "met": met, "value": value,
          "summary": summary, "detail": detail}


def _verdict(failing: list, missing: list, n_measured: int, what: str):
  """met from the failing and the unmeasured cases, and a note on the latter."""
  if failing:
    return False, ("; not measured: " + ", ".join(missing)) if missing else ""
  if not n_measured:
    return None, f"not applicable: {what} not measured"
  if missing:
    return None, (f"not decided: {n_measured} of {n_measured + len(missing)} cases measured"
                  " (all meet it); not measured: " + ", ".join(missing))
  return True, ""


def _ratios(cases, subject: str, other: str, d: str):
  """``([(net(other) / net(subject), label)], [not measured], [WRONG outputs])`` over ``cases``."""
  ratios, missing, bad = [], [], []
  for c in cases:
    a, b = net(c, other, d), net(c, subject, d)
    if a is None or b is None:
      missing.append(c["label"])
    elif wrong(c, subject):
      bad.append(f"{c['label']} WRONG")
    else:
      ratios.append((a / b, c["label"]))
  return ratios, missing, bad


def ratio_every(cases, subject: str, other: str, d: str, thr: float, strict: bool = False):
  """``net(other) / net(subject) >= thr`` (``>`` if strict) on every case of ``cases``."""
  ratios, missing, failing = _ratios(cases, subject, other, d)
  n_wrong = len(failing)
  failing += [f"{label} {r:.2f}x" for r, label in ratios if r < thr or (strict and r == thr)]
  met, note = _verdict(failing, missing, len(ratios) + n_wrong, f"{other}/{subject}")
  if not ratios:
    return met, None, "WRONG" if failing else "", "; ".join(failing + [note])
  worst = min(ratios)
  gm = geomean([r for r, _ in ratios])
  summary = f"worst {worst[0]:.2f}x ({worst[1]})"
  detail = f"{other}/{subject} {d}: {summary}, geomean {gm:.2f}x over {_n(len(ratios))}"
  if failing:
    detail += "; below " + f"{thr:g}x: " + ", ".join(failing)
  return met, worst[0], summary, detail + (f"; {note}" if note else "")


def ratio_geomean(cases, subject: str, other: str, d: str, thr: float):
  """The geometric mean over ``cases`` of ``net(other) / net(subject)`` >= ``thr``."""
  pairs, missing, bad = _ratios(cases, subject, other, d)
  ratios = [r for r, _ in pairs]
  gm = geomean(ratios)
  if bad:
    return False, gm, "WRONG outputs", "; ".join(bad)
  if gm is None:
    return None, None, "", f"not applicable: {other}/{subject} not measured"
  summary = f"geomean {gm:.2f}x over {_n(len(ratios))}"
  if missing:
    return None, gm, summary, (f"not decided: {summary}; not measured: " + ", ".join(missing))
  return gm >= thr, gm, summary, f"{other}/{subject} {d}: {summary} (needs {thr:g}x)"


def copy_fraction(cases, subject: str, d: str, thr: float):
  """``pct_copy`` of ``subject`` in direction ``d`` >= ``thr`` on every case."""
  fracs, failing, missing = [], [], []
  for c in cases:
    e = c.get("times", {}).get(f"{subject}/{d}")
    if e is None or e.get("pct_copy") is None:
      missing.append(c["label"])
    elif wrong(c, subject):
      failing.append(f"{c['label']} WRONG")
    else:
      fracs.append((e["pct_copy"], c["label"]))
      if e["pct_copy"] < thr:
        failing.append(f"{c['label']} {e['pct_copy']:.0%}")
  met, note = _verdict(failing, missing, len(fracs) + len(failing), f"{subject} {d}")
  if not fracs:
    return met, None, "WRONG" if failing else "", "; ".join(failing + [note])
  worst = min(fracs)
  summary = f"worst {worst[0]:.0%} ({worst[1]})"
  detail = f"{subject} {d} of copy bandwidth: {summary}"
  if failing:
    detail += f"; below {thr:.0%}: " + ", ".join(failing)
  return met, worst[0], summary, detail + (f"; {note}" if note else "")


def prev_guard(cases, tol: float = 1.05):
  """19d: where gnorm_prev was faster than flax, gnorm takes at most ``tol`` x its time."""
  ahead, failing, missing, checked = [], [], [], 0
  for c in cases:
    for d in ("fwd", "fwdbwd"):
      p, f, g = net(c, "gnorm_prev", d), net(c, "flax", d), net(c, "gnorm", d)
      if p is None or f is None or g is None:
        missing.append(f"{c['label']} {d}")
        continue
      checked += 1
      if p >= f:
        continue
      ahead.append((g / p, f"{c['label']} {d}"))
      if wrong(c, "gnorm") or g > tol * p:
        failing.append(f"{c['label']} {d} {g / p:.2f}x gnorm_prev's time")
  met, note = _verdict(failing, missing, checked, "gnorm_prev")
  if not ahead:
    detail = "gnorm_prev beat flax on no measured case" + (f"; {note}" if note else "")
    return met, None, "prev ahead on no case", detail
  worst = max(ahead)
  summary = f"worst {worst[0]:.2f}x gnorm_prev's time ({worst[1]})"
  detail = (f"gnorm/gnorm_prev where gnorm_prev beat flax ({len(ahead)} case-directions:"
            f" {', '.join(label for _, label in ahead)}): {summary}")
  if failing:
    detail += "; over 1.05x: " + ", ".join(failing)
  return met, worst[0], summary, detail + (f"; {note}" if note else "")


def _either(results: dict) -> tuple:
  """Issue 20's rows: met where either subject meets it; the best subject's value."""
  mets = [r[0] for r in results.values()]
  met = True if True in mets else None if None in mets else False
  best = next((s for s, r in results.items() if r[0] is True), None) or next(iter(results))
  summary = "; ".join(f"{s}: {r[2] or 'n/a'}" for s, r in results.items())
  detail = " | ".join(f"[{s}] {r[3]}" for s, r in results.items())
  return met, results[best][1], summary, detail


def kernel_targets(results: dict) -> list[dict]:
  """The kernel-level rows (all but the model's) from a ``gpu_bench.json``'s results."""
  cases = results.get("cases", [])
  plain = [c for c in cases if not c.get("activation")]
  silu = [c for c in cases if c.get("activation") == "silu"]
  big = [c for c in plain if c["elements"] >= BANDWIDTH_MIN_ELEMENTS]
  compile_cases = [c for c in plain if c["dtype"] == "bfloat16"
                   and c["elements"] >= COMPILE_MIN_ELEMENTS]
  rows = [
    _row("19a-fwd", *ratio_every(plain, "gnorm", "flax", "fwd", 1.0)),
    _row("19a-fwdbwd", *ratio_every(plain, "gnorm", "flax", "fwdbwd", 1.0)),
    _row("19b", *ratio_geomean(plain, "gnorm", "flax", "fwdbwd", 1.3)),
    _row("19c-fwd", *ratio_every(silu, "gnorm", "flax", "fwd", 1.0)),
    _row("19c-fwdbwd", *ratio_every(silu, "gnorm", "flax", "fwdbwd", 1.0)),
    _row("19d", *prev_guard(cases)),
  ]
  per = {
    "20a": lambda s: ratio_geomean(plain, s, "flax", "fwdbwd", 2.0),
    "20b": lambda s: ratio_every(plain, s, "flax", "fwdbwd", 1.0),
    "20c": lambda s: _both(compile_cases, s),
    "20d": lambda s: copy_fraction(big, s, "fwdbwd", 0.60),
    "20e": lambda s: copy_fraction(big, s, "fwd", 0.70),
    "20f": lambda s: ratio_every(silu, s, "flax", "fwdbwd", 2.0),
  }
  for tid, fn in per.items():
    rows.append(_row(tid, *_either({s: fn(s) for s in KERNEL_SUBJECTS})))
  backend = results.get("machine", {}).get("jax_backend")
  if backend != "gpu":
    for r in rows:
      r["met"] = None
      r["detail"] = f"not applicable: not on a GPU (JAX backend {backend}); " + r["detail"]
  return rows


def _both(cases, subject: str):
  """20c: faster than torch.compile in both directions."""
  f = ratio_every(cases, subject, "torch_compile", "fwd", 1.0, strict=True)
  b = ratio_every(cases, subject, "torch_compile", "fwdbwd", 1.0, strict=True)
  met = False if False in (f[0], b[0]) else None if None in (f[0], b[0]) else True
  value = min((v for v in (f[1], b[1]) if v is not None), default=None)
  return met, value, f"fwd {f[2] or 'n/a'}, fwd+bwd {b[2] or 'n/a'}", f"{f[3]}; {b[3]}"


def _x(v: float | None, fmt: str = ".2f") -> str:
  return "—" if v is None else format(v, fmt) + "x"


def model_targets(drop_in: dict | None, why: str = "drop_in.json not found") -> list[dict]:
  """The model-level rows from ``drop_in.py``'s ``latest.json`` (None: not measured)."""
  if drop_in is None:
    return [_row(t, None, None, "not measured", f"not applicable: {why}") for t in MODEL_IDS]
  v = drop_in["variants"]
  backend = drop_in.get("machine", {}).get("jax_backend")

  def speed(name):
    r = v[name].get("step_ratio_vs_flax")  # the variant's step time / flax's
    return 1 / r if r else None

  def mem(name):
    return v[name].get("temp_step_ratio_vs_flax")

  sp, m = speed("drop_in"), mem("drop_in")
  rows = [
    _row("19m-memory", None if m is None else m <= 1.0, m, f"{_x(m)} flax's temp bytes",
         f"drop-in step temp {v['drop_in']['temp_bytes_step']} B, flax"
         f" {v['flax']['temp_bytes_step']} B"),
    _row("19m-speed", None if sp is None else sp >= 1.0, sp, f"{_x(sp)} flax's speed",
         f"flax's step time / the drop-in's (medians): {_x(sp, '.3f')}"),
  ]
  parts, mets = [], []
  for name in ("drop_in", "gnorm_fused"):
    sp, m = speed(name), mem(name)
    mets.append(None if sp is None or m is None else sp >= 1.15 and m <= 1.0)
    parts.append(f"{name} {_x(sp)} speed, {_x(m)} temp memory")
  met = True if True in mets else None if None in mets else False
  best = max((speed(n) for n in ("drop_in", "gnorm_fused") if speed(n)), default=None)
  rows.append(_row("20m", met, best, "; ".join(parts), "; ".join(parts) + " (vs flax)"))
  if backend != "gpu":
    for r in rows:
      r["met"] = None
      r["detail"] = f"not applicable: not on a GPU (JAX backend {backend}); " + r["detail"]
  return rows


def fmt_met(met) -> str:
  return "n/a" if met is None else "met" if met else "NOT MET"


def summary_lines(rows: list[dict]) -> list[str]:
  """One line per target, then the counts: the run's last lines."""
  lines = [f"{r['id']:<11} {fmt_met(r['met']):<8} {r['summary'] or '-'}" for r in rows]
  counts = {k: sum(fmt_met(r["met"]) == k for r in rows) for k in ("met", "NOT MET", "n/a")}
  lines.append(f"targets: {counts['met']} met, {counts['NOT MET']} NOT MET, {counts['n/a']} not"
               " applicable or not decided")
  return lines
