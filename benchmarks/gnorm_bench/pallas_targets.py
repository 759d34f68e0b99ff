"""Issue #13's targets for gnorm's Pallas kernels (set for an H100): rows of the target checks.

* forward <= 1.5× the time to copy x once: x's bytes read and written at the
  copy bandwidth measured in the same run (``machine.copy_bandwidth``);
* forward+backward <= 1.5× the time to move 5 x-sizes at that bandwidth (the
  least a pass moves: read x, write y; read x and dy, write dx);
* fused GroupNorm + SiLU forward+backward at least 2× faster than flax's
  GroupNorm followed by ``jax.nn.silu`` (the fused section);
* faster than torch's native GroupNorm (its faster layout), forward and
  forward+backward.

Each on every shape of the section. A row's ``met`` is True, False or None:
None where it does not apply (JAX's backend is not a GPU, where the kernels
run in Pallas's interpreter; or an implementation it compares is absent).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .report_util import fmt_t
from .summary import geomean
from .summary import t

PALLAS = "gnorm_pallas"
PALLAS_FUSED = "gnorm_pallas_fused"
_DIRECTIONS = (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))


def _row(target: str, met: bool | None, detail: str) -> dict:
  return {"target": "issue #13: " + target, "met": met, "detail": detail}


def _not_applicable(cases: list, backend: str, names: tuple) -> str | None:
  """Why a target comparing ``names`` (the Pallas one first) does not apply, or None."""
  if backend != "gpu":
    return f"not applicable: not on a GPU (JAX backend {backend})"
  for name in names:
    if not any(t(c, name, "fwd") for c in cases) and not _errors(cases, name):
      return f"not applicable: {name} not run"
  return None


def _errors(cases: list, name: str) -> list[str]:
  return [f"{c['label']}: {e}" for c in cases if (e := c.get("errors", {}).get(name))]


def _missing(cases: list, name: str) -> str | None:
  """A detail where the Pallas variant failed or lacks a shape: the target is then not met."""
  errs = _errors(cases, name)
  if errs:
    return f"{name} failed to compile on " + "; ".join(errs)
  gaps = [c["label"] for c in cases if not (t(c, name, "fwd") and t(c, name, "fwdbwd"))]
  return f"{name} not timed on " + ", ".join(gaps) if gaps else None


def _per_shape(cases: list, ratios: list) -> str:
  return ", ".join(f"{c['label']} {r:.2f}×" for c, r in zip(cases, ratios, strict=True))


def _bandwidth_row(cases, copy_gb_s: float, d: str, moves: int, target: str) -> dict:
  """Pallas time in direction ``d`` / the time to move ``moves`` x-sizes at the copy bandwidth."""
  refs = [moves * math.prod(c["shape"]) * jnp.dtype(c["dtype"]).itemsize / (copy_gb_s * 1e9)
          for c in cases]
  ratios = [t(c, PALLAS, d) / ref for c, ref in zip(cases, refs, strict=True)]
  i = max(range(len(cases)), key=ratios.__getitem__)
  over = [c["label"] for c, r in zip(cases, ratios, strict=True) if r > 1.5]
  detail = (
    f"time / time to move {moves} x-sizes at {copy_gb_s:.0f} GB/s: worst {ratios[i]:.2f}×"
    f" ({cases[i]['label']}: {fmt_t(t(cases[i], PALLAS, d))} vs {fmt_t(refs[i])}),"
    f" geomean {geomean(ratios):.2f}×; per shape: {_per_shape(cases, ratios)}"
  )
  return _row(target, not over, detail + ("; over 1.5×: " + ", ".join(over) if over else ""))


def main_checks(cases: list, backend: str, copy_gb_s: float | None) -> list[dict]:
  """Issue #13's rows of the main section: bandwidth (forward, forward+backward) and torch."""
  targets = (
    ("fwd", 2, "Pallas forward <= 1.5× the time to copy x once (read + write x at the"
     " copy bandwidth), every shape"),
    ("fwdbwd", 5, "Pallas fwd+bwd <= 1.5× the time to move 5 x-sizes at the copy"
     " bandwidth, every shape"),
  )
  rows = []
  why = _not_applicable(cases, backend, (PALLAS,))
  if why is None and not copy_gb_s:
    why = "not applicable: no copy bandwidth measured"
  for d, moves, target in targets:
    if why is not None:
      rows.append(_row(target, None, why))
    elif (miss := _missing(cases, PALLAS)) is not None:
      rows.append(_row(target, False, miss))
    else:
      rows.append(_bandwidth_row(cases, copy_gb_s, d, moves, target))

  target = "Pallas faster than torch's GroupNorm (its faster layout), every shape, fwd and fwd+bwd"
  why = _not_applicable(cases, backend, (PALLAS, "torch"))
  if why is not None:
    rows.append(_row(target, None, why))
  elif (miss := _missing(cases, PALLAS)) is not None:
    rows.append(_row(target, False, miss))
  else:
    parts, losing = [], []
    for d, dn in _DIRECTIONS:
      sp = [(a / b if (a := t(c, "torch", d)) and (b := t(c, PALLAS, d)) else None) for c in cases]
      losing += [
        f"{c['label']} {dn}" for c, s in zip(cases, sp, strict=True) if s is None or s <= 1
      ]
      known = [s for s in sp if s is not None]
      parts.append(
        f"{dn}: torch/pallas worst {min(known):.2f}×, geomean {geomean(known):.2f}×"
        if known
        else f"{dn}: no torch time"
      )
    detail = "; ".join(parts) + ("; not faster: " + ", ".join(losing) if losing else "")
    rows.append(_row(target, not losing, detail))
  return rows


def fused_checks(cases: list, backend: str) -> list[dict]:
  """Issue #13's row of the fused section: Pallas GN+SiLU against flax + silu."""
  target = (
    "fused Pallas GN+SiLU fwd+bwd >= 2× faster than flax GroupNorm + jax.nn.silu,"
    " every shape"
  )
  why = _not_applicable(cases, backend, (PALLAS_FUSED, "flax"))
  if why is not None:
    return [_row(target, None, why)]
  if (miss := _missing(cases, PALLAS_FUSED)) is not None:
    return [_row(target, False, miss)]
  sp = [t(c, "flax", "fwdbwd") / t(c, PALLAS_FUSED, "fwdbwd") for c in cases]
  i = min(range(len(cases)), key=sp.__getitem__)
  below = [c["label"] for c, s in zip(cases, sp, strict=True) if s < 2.0]
  detail = (
    f"flax+silu / Pallas fused, fwd+bwd: worst {sp[i]:.2f}× ({cases[i]['label']}:"
    f" {fmt_t(t(cases[i], 'flax', 'fwdbwd'))} vs {fmt_t(t(cases[i], PALLAS_FUSED, 'fwdbwd'))}),"
    f" geomean {geomean(sp):.2f}×; per shape: {_per_shape(cases, sp)}"
  )
  return [_row(target, not below, detail + ("; below 2×: " + ", ".join(below) if below else ""))]
