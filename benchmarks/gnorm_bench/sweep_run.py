"""The Pallas tile sweep's measurements (``pallas_sweep.py``), in ``gpu_bench``'s loop form.

Per case (``sweep_plan.SweepCase``): its data and float64 reference (``device_accuracy``),
the loop's own cost per call in each direction (``device_impls.measure_overhead``) and
``implementation="xla"``'s time; per candidate block, ``implementation="pallas"`` lowered
inside ``pallas_triton.forced_block(block)``, forward and forward+backward. Every time is
the median device time per call of a compiled loop of chained calls
(``device_impls.measure_jax``), raw and net of the loop's cost; every program's first call
is checked against the reference (a wrong block cannot win), and each Pallas program's
lowered Triton calls must show the forced block's grid (a block that silently did not
apply cannot be credited).

Items run in the plan's order while the budget allows the time they are expected to take
(the last like item's, else ``sweep_plan.EST_S``); the others are listed as not swept.
At the end, each case's XLA forward+backward is timed again: the spread between the two
timings of one program is the noise the decision must beat. The results are written after
every item, so that a run stopped from outside leaves them.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time

from gnorm._src.backends import pallas_triton

from . import device_accuracy
from . import device_impls
from .cases import EPS
from .device_cases import DIRECTIONS
from .device_cases import moves
from .device_timing import Budget
from .device_timing import Settings
from .device_timing import estimate_call_s
from .device_timing import loop_size
from .device_timing import time_runs
from .sweep_plan import RETIME_S
from .sweep_plan import Item
from .sweep_plan import SweepCase
from .sweep_plan import block_dict
from .sweep_plan import estimate_s
from .sweep_plan import grid

RESERVE_S = 2.0  # kept for the re-timing and the reports
_GRID = re.compile(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32")


def grid_status(text: str, expected: tuple[int, int, int]) -> str:
  """Whether a lowered program's Triton calls include one over ``expected``'s grid (in
  any order of axes): "ok", "unverified: ..." (no Triton call: the interpreter) or
  "contradicted: ..." (the forced block did not apply)."""
  grids = {tuple(int(v) for v in m) for m in _GRID.findall(text)}
  if not grids:
    return "unverified: no Triton call in the lowered program (Pallas's interpreter)"
  if any(sorted(g) == sorted(expected) for g in grids):
    return "ok"
  return f"contradicted: no Triton call over grid {expected}; lowered {sorted(grids)}"


def fn(sc: SweepCase, implementation: str):
  """``f(x, gamma, beta)``: gnorm by ``implementation`` in the case's layout."""
  import gnorm

  axis = -1 if sc.channels_last else 1

  def f(x, g, b):
    return gnorm.group_norm({"gamma": g, "beta": b}, x, sc.case.groups, EPS,
                            channel_axis=axis, implementation=implementation)

  return f


def case_record(sc: SweepCase) -> dict:
  n, s, c = sc.view
  return {
    "label": sc.label, "shape": list(sc.case.shape), "dtype": sc.case.dtype,
    "channels_last": sc.channels_last, "groups": sc.case.groups,
    "size_class": sc.key.size_class, "forward_plan": sc.key.forward_plan,
    "elements": n * s * c, "x_bytes": sc.case.x_bytes,
    "overhead": {}, "xla": {}, "candidates": [], "errors": {},
  }


class Sweep:
  """One sweep's state: data, references, estimates, results."""

  def __init__(self, case_list: list[SweepCase], settings: Settings, budget: Budget,
               results: dict, write, copy_gb_s: float | None, log=None):
    self.case_list, self.s, self.budget = case_list, settings, budget
    self.results, self.write, self.copy_gb_s = results, write, copy_gb_s
    self.log = log or (lambda msg: print(msg, file=sys.stderr))
    self.refs = device_accuracy.References()
    self.data: dict = {}
    self.observed: dict[str, float] = {}
    self.retimers: dict[int, dict] = {}
    self.n_programs = 0
    results["cases"] = [case_record(sc) for sc in case_list]
    results["not_swept"] = []

  def _estimate(self, item: Item) -> float:
    kind = "baseline" if item.block is None else "candidate"
    return self.observed.get(kind, estimate_s(item))

  def _not_swept(self, item: Item, reason: str) -> None:
    what = "baselines" if item.block is None else f"block {tuple(item.block)}"
    self.results["not_swept"].append({"case": self.case_list[item.index].label, "what": what,
                                      "reason": reason})

  def run(self, items: list[Item]) -> None:
    for item in items:
      self.run_item(item)
      self.results["wall_s"] = self.budget.elapsed()
      self.write(self.results)
    self.retime()
    self.results["wall_s"] = self.budget.elapsed()
    self.write(self.results)

  def run_item(self, item: Item) -> None:
    r = self.results["cases"][item.index]
    if item.block is not None and not (r["xla"].get("fwd") and r["xla"].get("fwdbwd")):
      self._not_swept(item, "its baselines were not measured")
      return
    est = self._estimate(item)
    if not self.budget.allows(est + RESERVE_S):
      self._not_swept(item, f"time budget: {max(self.budget.left(), 0):.0f} s of"
                      f" {self.budget.seconds:.0f} s left, ~{est:.0f} s needed and"
                      f" {RESERVE_S:.0f} s kept for the re-timing and the reports")
      return
    t0 = time.perf_counter()
    sc = self.case_list[item.index]
    what = "baselines" if item.block is None else f"block {tuple(item.block)}"
    try:
      if item.block is None:
        self._baseline(item.index, sc)
      else:
        self._candidate(item.index, sc, item.block)
    except Exception as e:  # noqa: BLE001 - one failing item must not end a GPU session
      msg = f"{type(e).__name__}: {str(e).strip()[:400]}"
      r["errors"][what] = msg
      self.log(f"error: {sc.label} {what}: {msg}")
    dt = time.perf_counter() - t0
    self.observed["baseline" if item.block is None else "candidate"] = dt
    self.log(f"[{self.budget.elapsed():5.1f} s] {sc.label} {what}: {dt:.1f} s")

  def _data(self, sc: SweepCase):
    if sc.case.data_key not in self.data:
      self.data[sc.case.data_key] = device_impls.DeviceData(sc.case, self.refs.data(sc.case))
    return self.data[sc.case.data_key]

  def _loop(self, sc: SweepCase, direction: str) -> tuple[int, int]:
    return loop_size(estimate_call_s(sc.case.x_bytes, direction, self.copy_gb_s, self.s),
                     self.s)

  def _name(self, i: int, what: str, direction: str) -> str:
    self.n_programs += 1
    return f"sw{i}_{what}_{direction}_{self.n_programs}"

  def _baseline(self, i: int, sc: SweepCase) -> None:
    r = self.results["cases"][i]
    data = self._data(sc)
    self.refs.reference(sc.case)
    self.refs.drop_data()  # the reference is kept; the host copy of the data is not needed
    for d in DIRECTIONS:
      n, u = self._loop(sc, d)
      o = device_impls.measure_overhead(sc.case, d, data, n, u, self.s, self._name(i, "loop", d))
      r["overhead"][d] = o["per_call_s"]
    for d in DIRECTIONS:
      rec, runner = self._time(i, sc, "xla", d, None)
      r["xla"][d] = rec
      if d == "fwdbwd":
        self.retimers[i] = runner

  def _candidate(self, i: int, sc: SweepCase, block: pallas_triton.Block) -> None:
    r = self.results["cases"][i]
    cand: dict = {"block": block_dict(block)}
    r["candidates"].append(cand)
    statuses = []
    for d in DIRECTIONS:
      rec, _ = self._time(i, sc, "pallas", d, block)
      cand[d] = rec
      statuses.append(rec.pop("grid"))
    bad = [g for g in statuses if g.startswith("contradicted")]
    cand["grid"] = bad[0] if bad else statuses[0]

  def _time(self, i: int, sc: SweepCase, implementation: str, direction: str,
            block: pallas_triton.Block | None) -> tuple[dict, dict]:
    r = self.results["cases"][i]
    n, u = self._loop(sc, direction)
    seen: dict = {}

    def on_lowered(lowered):
      if block is not None:
        seen["grid"] = grid_status(lowered.as_text(), grid(block, sc))

    context = (pallas_triton.forced_block(block) if block is not None
               else contextlib.nullcontext())
    impl = "gnorm_pallas" if implementation == "pallas" else "gnorm"
    entry, outputs, runner = device_impls.measure_jax(
      impl, sc.case, direction, self._data(sc), n, u, self.s,
      self._name(i, implementation, direction), f=fn(sc, implementation), context=context,
      channels_first=not sc.channels_last, on_lowered=on_lowered)
    acc = device_accuracy.check(impl, sc.case, outputs, self.refs.reference(sc.case))
    net = max(entry["raw_s"] - r["overhead"][direction], 1e-12)
    rec = {
      "net_s": net, "raw_s": entry["raw_s"], "samples_s": entry["samples_s"],
      "compile_s": entry["compile_s"], "loop": entry["loop"],
      "ok": bool(acc["ok"] and entry["carry"]["finite"]),
      "y_vs_ref": acc["y_vs_ref"], "grad_vs_ref": acc.get("grad_vs_ref"),
      "pct_copy": (moves(direction) * sc.case.x_bytes / net / (self.copy_gb_s * 1e9)
                   if self.copy_gb_s else None),
      "grid": seen.get("grid", "n/a"),
    }
    if not rec["ok"]:
      self.log(f"WRONG: {sc.label} {implementation} {direction} {block}: {acc}")
    return rec, runner

  def retime(self) -> None:
    """Each case's XLA forward+backward timed again: the run-to-run spread."""
    for i, runner in self.retimers.items():
      if not self.budget.allows(RETIME_S):
        self.results.setdefault("notes", []).append(
          "XLA's re-timing stopped by the time budget: the spread is missing for some cases")
        return
      r = self.results["cases"][i]
      stats, _ = time_runs(runner["run"], runner["calls"], self.s)
      first = r["xla"]["fwdbwd"]["net_s"]
      again = max(stats["median_s"] - r["overhead"]["fwdbwd"], 1e-12)
      r["xla"]["fwdbwd"]["again_net_s"] = again
      r["spread"] = abs(again - first) / min(again, first)
