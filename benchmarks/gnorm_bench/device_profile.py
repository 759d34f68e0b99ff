"""Kernel times from a profiler trace: a second opinion on the loop's wall-clock times.

Already compiled loop programs run once each inside one ``jax.profiler.trace``; the
Perfetto JSON it writes is read back, and every kernel event of a program's module
(``jit_<name>``, ``device_loop.named``) is summed: GPU events on the device's stream
lines (on the CPU, the host's thunk events of the module). Per call: the summed kernel
time (the device busy time, launch gaps excluded) and the number of kernels. Anything
that goes wrong is recorded as the reason, never raised: this is optional.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import tempfile
import time

import jax


def _options():
  """No Python tracer: it would record this process's every function call."""
  try:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options
  except Exception:  # noqa: BLE001 - an older or newer API: the defaults then
    return None


def _trace(runners: list[dict], log_dir: str) -> pathlib.Path:
  options = _options()
  kwargs = {"profiler_options": options} if options is not None else {}
  with jax.profiler.trace(log_dir, create_perfetto_trace=True, **kwargs):
    for r in runners:
      jax.block_until_ready(r["run"]())
  found = sorted(pathlib.Path(log_dir).rglob("perfetto_trace.json.gz"))
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
  return found[-1]


def kernel_sums(events: list[dict], modules: set[str]) -> tuple[dict, str]:
  """Per module: (summed microseconds, event count) of its kernels; and where they came from.

  On a GPU: the events of the processes named ``/device:GPU...`` that carry an
  ``hlo_module`` argument, on the threads named ``Stream...`` (the kernels as CUPTI saw
  them) or, where those carry none, on the "XLA Ops" thread derived from them. Where
  there is no GPU (the CPU), the host's events with an ``hlo_module`` argument (XLA:CPU's
  thunks), less their "end: ..." markers.
  """
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {p for p, n in procs.items() if n.startswith("/device:GPU")}
  by_source = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  for e in events:
    module = (e.get("args") or {}).get("hlo_module")
    if e.get("ph") != "X" or module not in modules:
      continue
    if device:
      if e["pid"] not in device:
        continue
      thread = threads.get((e["pid"], e.get("tid")), "")
      source = ("GPU stream events" if thread.startswith("Stream")
                else "GPU 'XLA Ops' events" if thread == "XLA Ops" else None)
      if source is None:
        continue
    elif str(e.get("name", "")).startswith("end: "):
      continue
    else:
      source = "host thunk events (no GPU in the trace)"
    by_source[source][module][0] += float(e.get("dur", 0.0))
    by_source[source][module][1] += 1
  for source in ("GPU stream events", "GPU 'XLA Ops' events",
                 "host thunk events (no GPU in the trace)"):
    if by_source.get(source):
      return {m: tuple(v) for m, v in by_source[source].items()}, source
  threads_seen = sorted({threads.get((p, t), "?") for p, t in threads if p in device})
  return {}, f"no kernel events with an hlo_module argument (GPU threads: {threads_seen[:8]})"


def profile(runners: list[dict]) -> dict:
  """Kernel time and count per call of each runner's module; ``{"error": ...}`` on failure."""
  t0 = time.perf_counter()
  try:
    with tempfile.TemporaryDirectory(prefix="gnorm_trace_") as tmp:
      path = _trace(runners, tmp)
      with gzip.open(path, "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    sums, source = kernel_sums(events, {r["module"] for r in runners})
  except Exception as e:  # noqa: BLE001 - optional: record why, never fail the run
    return {"error": f"{type(e).__name__}: {str(e)[:300]}", "wall_s": time.perf_counter() - t0}
  out = {}
  for r in runners:
    us, count = sums.get(r["module"], (0.0, 0))
    out[r["module"]] = {
      "kernel_s_per_call": us / 1e6 / r["calls"] if count else None,
      "kernels_per_call": count / r["calls"] if count else None,
      "label": r.get("label", r["module"]),
    }
  missing = [m for m, v in out.items() if v["kernels_per_call"] is None]
  result = {"source": source, "modules": out, "wall_s": time.perf_counter() - t0}
  if missing:
    result["note"] = f"no kernel events found for {len(missing)} of {len(out)} programs"
  return result
