"""A device-time run: the work items in order, within the time budget, written as they go.

Per item ``(case, implementation, direction)``: the loop's own cost for that case (once),
the implementation's compiled loop (or CUDA graph), its time per call raw and net of the
loop's cost, its share of the copy bandwidth, and its outputs against the float64
reference. An item runs only if the time it is expected to take (the last such item's,
or a default) is left in the budget; the others are listed in ``not_measured``. A failing
item is recorded in its case's ``errors`` and the run goes on. The results are written
every few seconds, so that a run stopped from outside still leaves them.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from . import device_accuracy
from . import device_impls
from . import device_profile
from . import device_torch
from .device_cases import JAX_IMPLS
from .device_cases import TORCH_IMPLS
from .device_cases import DeviceCase
from .device_cases import case_set
from .device_cases import moves
from .device_cases import plan
from .device_timing import Budget
from .device_timing import Settings
from .device_timing import estimate_call_s
from .device_timing import loop_size
from .timing import progress_bar

# Expected seconds of an item before one like it ran (then: the last one's time). On a GPU
# a JAX function compiles in ~0.5-2 s; torch.compile takes 5-30 s per graph, more at first.
_DEFAULT_EST = {"gnorm_pallas": 8.0, "torch_nchw": 5.0, "torch_cl": 3.0, "torch_compile": 45.0}
_JAX_EST = 3.0
_RESERVE_S = 3.0  # kept for the targets and the reports
_WRITE_EVERY_S = 3.0


@dataclasses.dataclass
class RunConfig:
  impls: list[str]  # to run, in any order (the plan orders them)
  settings: Settings
  quick: bool
  progress: bool
  write: object  # write(results): the reports, also mid-run
  budget: Budget  # the whole benchmark's, started when it started


def _case_entry(case: DeviceCase) -> dict:
  return {
    "label": case.label, "shape": list(case.shape), "dtype": case.dtype,
    "activation": case.activation, "groups": case.groups, "elements": case.elements,
    "x_bytes": case.x_bytes, "overhead": {}, "times": {}, "accuracy": {}, "errors": {},
  }


def _profile_case(case: DeviceCase, quick: bool) -> bool:
  """The cases whose gnorm and flax programs the profiler trace runs again."""
  if quick:
    return case.activation is None
  return (case.activation is None and case.dtype == "bfloat16"
          and case.shape in ((2, 64, 64, 320), (16, 64, 64, 320)))


class Runner:
  """One run's state: data, references, overheads, estimates and results."""

  def __init__(self, cfg: RunConfig, results: dict):
    self.cfg, self.results = cfg, results
    self.s = cfg.settings
    self.refs = device_accuracy.References()
    self.device_data = {}
    self.cases = {c: _case_entry(c) for c in case_set(cfg.quick)}
    results["cases"] = list(self.cases.values())
    results["not_measured"] = []
    self.observed = {}
    self.profile_runners = []
    self.budget = cfg.budget
    self.last_write = 0.0
    self.copy_gb_s = results["copy_bandwidth"]["gb_per_s"]
    self.n_items = 0

  def _data(self, case: DeviceCase):
    if case.data_key not in self.device_data:
      self.device_data[case.data_key] = device_impls.DeviceData(case, self.refs.data(case))
    return self.device_data[case.data_key]

  def _loop(self, case: DeviceCase, direction: str) -> tuple[int, int]:
    est = estimate_call_s(case.x_bytes, direction, self.copy_gb_s, self.s)
    return loop_size(est, self.s)

  def _overhead(self, case: DeviceCase, direction: str) -> dict:
    """The loop's own cost per call for ``case``'s shape and dtype (shared by activations)."""
    twin = next(c for c in self.cases if c.data_key == case.data_key)
    entry = self.cases[twin]["overhead"]
    if direction not in entry:
      n, u = self._loop(case, direction)
      name = f"gb_overhead_{direction}_{self.n_items}"
      entry[direction] = device_impls.measure_overhead(case, direction, self._data(case), n, u,
                                                       self.s, name)
    for c, e in self.cases.items():  # the same figure beside every activation's times
      if c.data_key == case.data_key:
        e["overhead"][direction] = entry[direction]
    return entry[direction]

  def _estimate(self, impl: str, direction: str) -> float:
    return self.observed.get((impl, direction), _DEFAULT_EST.get(impl, _JAX_EST))

  def _measure(self, case: DeviceCase, impl: str, direction: str) -> None:
    entry = self.cases[case]
    self.n_items += 1
    ref = self.refs.reference(case)
    if impl in JAX_IMPLS:
      overhead = self._overhead(case, direction)["per_call_s"]
      n, u = self._loop(case, direction)
      name = f"gb_{impl}_{direction}_{self.n_items}"
      t, outputs, runner = device_impls.measure_jax(impl, case, direction, self._data(case), n,
                                                    u, self.s, name)
      if impl in ("gnorm", "flax") and _profile_case(case, self.cfg.quick):
        self.profile_runners.append({**runner, "label": f"{case.label} {impl} {direction}",
                                     "key": (case, impl, direction)})
    else:
      overhead = 0.0  # a CUDA graph's replays: no loop around the calls
      n, u = self._loop(case, direction)
      t, outputs = device_torch.measure_torch(impl, case, direction, self.refs.data(case),
                                              1 + n * u, self.s)
    acc = device_accuracy.check(impl, case, outputs, ref)
    t["overhead_s"] = overhead
    t["net_s"] = max(t["raw_s"] - overhead, 1e-12)
    t["overhead_dominates"] = overhead > 0.5 * t["raw_s"]
    t["pct_copy"] = moves(direction) * case.x_bytes / t["net_s"] / (self.copy_gb_s * 1e9)
    entry["accuracy"][f"{impl}/{direction}"] = acc  # a time is recorded with its check
    entry["times"][f"{impl}/{direction}"] = t
    if not acc["ok"]:
      print(f"WRONG: {impl} {direction} on {case.label}: {acc}", file=sys.stderr)

  def run_item(self, case: DeviceCase, impl: str, direction: str) -> None:
    est = self._estimate(impl, direction)
    if not self.budget.allows(est + _RESERVE_S):
      self.results["not_measured"].append({
        "case": case.label, "impl": impl, "direction": direction,
        "reason": f"time budget: {max(self.budget.left(), 0):.0f} s of {self.budget.seconds:.0f} s"
                  f" left, ~{est:.0f} s needed and {_RESERVE_S:.0f} s kept for the reports",
      })
      return
    t0 = time.perf_counter()
    try:
      self._measure(case, impl, direction)
    except Exception as e:  # noqa: BLE001 - one failing item must not end a GPU session
      msg = f"{type(e).__name__}: {str(e).strip()[:400]}"
      self.cases[case]["errors"][f"{impl}/{direction}"] = msg
      print(f"error: {impl} {direction} on {case.label}: {msg}", file=sys.stderr)
    self.observed[(impl, direction)] = time.perf_counter() - t0

  def profile(self) -> None:
    """The kernel-time trace of some of gnorm's and flax's programs (once, optional)."""
    if not self.profile_runners or "profile" in self.results:
      return
    if not self.budget.allows(10.0 + _RESERVE_S):
      self.results["profile"] = {"error": "not run: time budget"}
      return
    prof = device_profile.profile(self.profile_runners)
    self.results["profile"] = prof
    for r in self.profile_runners:
      k = prof.get("modules", {}).get(r["module"])
      case, impl, direction = r["key"]
      if k and k["kernels_per_call"] is not None:
        t = self.cases[case]["times"][f"{impl}/{direction}"]
        t["kernel_s"], t["kernels_per_call"] = k["kernel_s_per_call"], k["kernels_per_call"]
    self.profile_runners = []

  def maybe_write(self, force: bool = False) -> None:
    if force or time.perf_counter() - self.last_write > _WRITE_EVERY_S:
      self.results["wall_s"] = self.budget.elapsed()
      self.cfg.write(self.results)
      self.last_write = time.perf_counter()


def run(cfg: RunConfig, results: dict) -> dict:
  """Measures every item of the plan that the budget allows, in order."""
  runner = Runner(cfg, results)
  items = plan(cfg.impls, cfg.quick)
  results["plan"] = {"items": len(items), "order": _phases_text(items)}
  # The profile runs right after the last program it traces was measured (early: a run
  # cut short by its budget still has it).
  last_traced = max((i for i, (c, impl, _) in enumerate(items)
                     if impl in ("gnorm", "flax") and _profile_case(c, cfg.quick)), default=-1)
  bar = progress_bar(len(items), "gpu bench", cfg.progress, unit="item")
  for i, (case, impl, direction) in enumerate(items):
    runner.run_item(case, impl, direction)
    if i == last_traced:
      runner.profile()
    runner.maybe_write()
    if bar:
      bar.update(1)
      bar.set_postfix_str(f"{case.label} {impl} {direction}", refresh=False)
  runner.profile()
  if bar:
    bar.close()
  results["wall_s"] = runner.budget.elapsed()
  return results


def _phases_text(items) -> list[str]:
  """The implementations in the order the run visits them (for the report)."""
  seen = []
  for _, impl, _ in items:
    if impl not in seen:
      seen.append(impl)
  return seen


def skipped_impls(names: list[str], backend: str, explicit: set[str], quick: bool) -> dict:
  """Why each of ``names`` that cannot run here does not."""
  why = {}
  torch_why = device_torch.unavailable() if set(names) & set(TORCH_IMPLS) else None
  for name in names:
    if name in TORCH_IMPLS:
      if torch_why:
        why[name] = torch_why
    elif (r := device_impls.skip_reason(name, backend, name in explicit, quick)) is not None:
      why[name] = r
  return why


__all__ = ["RunConfig", "run", "skipped_impls"]
