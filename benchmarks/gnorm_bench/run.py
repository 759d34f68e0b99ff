"""The two sections' runs: per case, prepare every variant, compile, check, time."""

from __future__ import annotations

import statistics
import sys

import jax
import numpy as np

from .cases import MEMORY_CASE
from .cases import make_data
from .cases import reference
from .cases import rel_err
from .cases import within_bounds
from .impls_jax import FUSED_FNS
from .impls_jax import prepare_jax
from .impls_torch import prepare_torch
from .machine import optional
from .pallas_targets import fused_checks
from .pallas_targets import main_checks
from .prepared import Prepared
from .summary import summarize
from .summary import summarize_fused
from .timing import progress_bar
from .timing import time_interleaved

ALL_IMPLS = ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "torch", "floor")
# gnorm's Pallas kernels: compiled with Triton on a GPU only; elsewhere they run
# in Pallas's interpreter, whose times mean nothing.
PALLAS_IMPLS = ("gnorm_pallas",)
_MODULES = {
  "flax": "flax.linen",
  "haiku": "haiku",
  "equinox": "equinox",
  "torch": "torch",
  "gnorm": "gnorm",
  "gnorm_pallas": "jax.experimental.pallas",
}


def available(
  only: set[str],
  torch_device: str | None,
  torch_why: str,
  *,
  backend: str = "gpu",
  explicit: set[str] = frozenset(),
) -> tuple[list[str], dict]:
  """The implementations of ``only`` that can run (plus the floor), and why the others cannot.

  torch runs where ``torch_device`` is set (``machine.torch_device``), else it
  is skipped for ``torch_why``. The Pallas kernels run where JAX's ``backend``
  is "gpu", elsewhere only when named in ``explicit`` (``--only``): in the
  interpreter, to exercise the plumbing on tiny shapes.
  """
  names, skipped = [], {}
  for name in ALL_IMPLS:
    if name != "floor" and name not in only:
      continue
    if name == "torch" and torch_device is None:
      skipped[name] = torch_why
      continue
    if name in PALLAS_IMPLS and backend != "gpu" and name not in explicit:
      skipped[name] = f"Pallas kernels run in the interpreter on {backend}: not timed"
      continue
    if name in _MODULES and optional(_MODULES[name]) is None:
      skipped[name] = "not importable"
      continue
    names.append(name)
  return names, skipped


def _accuracy(prepared: dict, ref: tuple, dtype: str, baseline: str) -> dict:
  """Errors of every variant against ``ref`` and against ``baseline``'s."""
  outs = {name: p.outputs() for name, p in prepared.items() if name != "floor"}
  acc = {}
  for name, o in outs.items():
    entry = {
      "y_vs_ref": rel_err(o[0], ref[0]),
      "grad_vs_ref": max(rel_err(a, r) for a, r in zip(o[1:], ref[1:], strict=True)),
    }
    if baseline in outs:
      entry["max_abs_dy_vs_gnorm"] = float(np.max(np.abs(o[0] - outs[baseline][0])))
      entry["grad_vs_gnorm"] = max(
        rel_err(a, r) for a, r in zip(o[1:], outs[baseline][1:], strict=True)
      )
    y = np.asarray(o[0], np.float64)
    entry["y_max_abs_vs_ref"] = float(np.max(np.abs(y - ref[0])))
    entry["ok"] = within_bounds(name, y, ref[0], entry["y_vs_ref"], entry["grad_vs_ref"], dtype)
    acc[name] = entry
  return acc


def _record_compiled(mem: dict, direction: str, compiled) -> None:
  """Stores a compiled function's temp bytes and XLA's estimate of the bytes
  it reads and writes, where the backend reports them."""
  ma = compiled.memory_analysis()
  if ma is not None:
    mem[f"{direction}_temp_bytes"] = int(ma.temp_size_in_bytes)
  try:
    ca = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if ca and "bytes accessed" in ca:
    mem[f"{direction}_bytes_accessed"] = int(ca["bytes accessed"])


# Variants whose compilation may fail without stopping the run: the Triton
# kernels compile only on a GPU, which CI never has, and a one-shot GPU session
# should still measure everyone else.
_GUARDED = ("gnorm_pallas", "gnorm_pallas_fused")


def _compile_all(prepared: dict, reps: int, mem: dict, errors: dict) -> dict:
  """Compiles every variant's forward and forward+backward ``reps`` times,
  interleaved over variants (the last compilation of each function is the one
  timed), recording the compile times and compiled memory. A guarded variant
  that fails is dropped from ``prepared``, its error kept in ``errors``."""
  comp: dict[str, dict[str, list[float]]] = {}
  for _ in range(reps):
    for name, p in list(prepared.items()):
      if p.compile_once is None:
        continue
      try:
        for direction in ("fwd", "fwdbwd"):
          t, compiled = p.compile_once(direction)
          comp.setdefault(name, {}).setdefault(direction, []).append(t)
          _record_compiled(mem.setdefault(name, {}), direction, compiled)
      except Exception as e:  # noqa: BLE001 - recorded, and reported as a failed target
        if name not in _GUARDED:
          raise
        errors[name] = f"{type(e).__name__}: {e}"[:400]
        print(f"{name} failed to compile, dropped: {errors[name]}", file=sys.stderr)
        del prepared[name]
        comp.pop(name, None)
        mem.pop(name, None)
  return comp


def _bandwidth(prepared: dict, times: dict, copy_gb_s: float) -> dict:
  """Achieved bandwidth per variant and direction: the bytes a pass must move
  (forward: read x, write y; forward+backward: also read dy, write dx, in y's
  and x's dtypes; gamma and beta ignored) / the median time."""
  out = {}
  for name, p in prepared.items():
    x_bytes, y_bytes = p.io_bytes()
    for d, moved in (("fwd", x_bytes + y_bytes), ("fwdbwd", 2 * (x_bytes + y_bytes))):
      gb_s = moved / times[f"{name}/{d}"]["median_s"] / 1e9
      out[f"{name}/{d}"] = {
        "bytes": moved,
        "gb_per_s": gb_s,
        "fraction_of_copy": gb_s / copy_gb_s,
      }
  return out


def _torch_variants(torch_device: str, activation: str | None = None) -> dict:
  """torch is timed in both of its layouts; the faster counts in the tables."""
  return {
    f"torch_{tag}": lambda case, data, cl=cl: prepare_torch(
      case, data, channels_last=cl, activation=activation, device=torch_device
    )
    for tag, cl in (("nchw", False), ("cl", True))
  }


def _case_record(case, prepared: dict, times: dict, copy_gb_s: float, **fields) -> dict:
  """One case's entry in ``latest.json``, keys in the order the reports read them."""
  return {
    "label": case.label,
    "shape": list(case.shape),
    "groups": case.groups,
    "dtype": case.dtype,
    "times": times,
    **fields,
    "notes": {n: p.note for n, p in prepared.items() if p.note},
    "bandwidth": _bandwidth(prepared, times, copy_gb_s),
  }


def run(
  cases,
  impls,
  rounds: int,
  sample_s: float,
  compile_reps: int,
  *,
  copy_gb_s: float,
  torch_device: str | None = None,
  progress: bool = True,
  backend: str | None = None,
) -> dict:
  """The main section: ``cases``, ``summary`` and ``checks`` of the results.

  ``backend`` (default JAX's) decides whether the Pallas targets apply."""
  makers = {
    n: (lambda case, data, n=n: prepare_jax(n, case, data)) for n in impls if n != "torch"
  }
  if "torch" in impls:
    makers.update(_torch_variants(torch_device))
  bar = progress_bar(len(cases) * rounds, "rounds", progress)

  out = {"cases": []}
  for case in cases:
    data = make_data(case)
    prepared: dict[str, Prepared] = {name: make(case, data) for name, make in makers.items()}

    # Compile time and compiled memory, interleaved over implementations; the
    # last compilation of each function is the one timed below.
    mem: dict[str, dict] = {}
    errors: dict[str, str] = {}
    comp = _compile_all(prepared, compile_reps, mem, errors)
    # Accuracy: a wrong kernel should be visible whatever its speed.
    acc = _accuracy(prepared, reference(case, data), case.dtype, "gnorm")

    if case.dtype == MEMORY_CASE.dtype:  # only where it is reported
      for name, p in prepared.items():
        if p.residuals is not None and name != "floor":
          mem.setdefault(name, {})["residuals"] = p.residuals()

    times = time_interleaved(prepared, rounds, sample_s, bar, case.label)
    out["cases"].append(
      _case_record(
        case,
        prepared,
        times,
        copy_gb_s,
        compile_s={n: {d: statistics.median(v) for d, v in dd.items()} for n, dd in comp.items()},
        # Every repetition, in order: the first one of the first case is the
        # coldest (it also pays for one-time tracing machinery).
        compile_s_reps=comp,
        memory=mem,
        accuracy=acc,
        errors=errors,
      )
    )
    del prepared
    jax.clear_caches()
  if bar:
    bar.close()
  summarize(out)
  out["checks"] += main_checks(out["cases"], backend or jax.default_backend(), copy_gb_s)
  return out


def run_fused(
  cases,
  impls,
  rounds: int,
  sample_s: float,
  *,
  copy_gb_s: float,
  torch_device: str | None = None,
  progress: bool = True,
  backend: str | None = None,
) -> dict:
  """The fused GroupNorm + SiLU section (issue #7): gnorm's fused activation
  (XLA's, and the Pallas kernels' where ``gnorm_pallas`` is in ``impls``)
  against ``silu`` applied after gnorm, flax and torch. Times, compiled temp
  bytes and kept residuals; one compilation per function (indicative compile
  times only)."""
  names = ["gnorm_fused"]
  if "gnorm_pallas" in impls:
    names.append("gnorm_pallas_fused")
  names += ["gnorm_unfused"] + [n for n in ("flax", "floor") if n in impls]
  makers = {
    n: (lambda case, data, n=n: prepare_jax(n, case, data, make=FUSED_FNS[n])) for n in names
  }
  if "torch" in impls:
    makers.update(_torch_variants(torch_device, activation="silu"))
  bar = progress_bar(len(cases) * rounds, "fused rounds", progress)
  out = {"activation": "silu", "cases": []}
  for case in cases:
    data = make_data(case)
    prepared: dict[str, Prepared] = {name: make(case, data) for name, make in makers.items()}
    mem: dict[str, dict] = {}
    errors: dict[str, str] = {}
    comp = _compile_all(prepared, 1, mem, errors)
    acc = _accuracy(prepared, reference(case, data, activation="silu"), case.dtype, "gnorm_fused")
    for name, p in prepared.items():
      if p.residuals is not None and name != "floor":
        mem.setdefault(name, {})["residuals"] = p.residuals()
    times = time_interleaved(prepared, rounds, sample_s, bar, case.label)
    out["cases"].append(
      _case_record(
        case,
        prepared,
        times,
        copy_gb_s,
        # One compilation each: indicative only.
        compile_s={n: {d: v[0] for d, v in dd.items()} for n, dd in comp.items()},
        memory=mem,
        accuracy=acc,
        errors=errors,
      )
    )
    del prepared
    jax.clear_caches()
  if bar:
    bar.close()
  summarize_fused(out)
  out["checks"] += fused_checks(out["cases"], backend or jax.default_backend())
  return out
