"""Device time: settings, loop sizes, timed runs, the copy bandwidth and the time budget.

A JAX timing runs a compiled loop program (``device_loop``) of ``calls`` chained calls:
one warm-up run (whose outputs are the accuracy check's), one run to size the samples,
then ``samples`` samples of ``k`` back-to-back runs each, blocked once at the end (runs on
one device queue run in order), ``k`` chosen so that a sample lasts about ``sample_s``.
Seconds per call = sample time / (k * calls); the median over samples is reported.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import device_loop


@dataclasses.dataclass(frozen=True)
class Settings:
  """How long things run. ``gpu()`` for a GPU, ``quick()`` for a CPU dry run."""

  unroll: int  # calls per loop iteration
  run_s: float  # aimed length of one loop run (sets the calls per run)
  min_calls: int
  max_calls: int
  sample_s: float  # aimed length of one sample (sets the runs per sample)
  samples: int
  floor_s: float  # least time per call assumed when sizing a loop
  copy_mib: int  # the copy bandwidth's buffer
  copy_iterations: int

  @staticmethod
  def gpu() -> Settings:
    # Two calls per iteration: the loop's cost (measured, and subtracted) halved per call,
    # while the compile time, which sets how much of the case set fits the budget, grows
    # with every copy of the call. A 512 MiB copy is 10x an H200's L2; about 0.34 ms per
    # pass at 3.2 TB/s.
    return Settings(2, 5e-3, 16, 256, 20e-3, 5, 8e-6, 512, 10)

  @staticmethod
  def cpu() -> Settings:
    return Settings(2, 50e-3, 4, 64, 0.1, 3, 50e-6, 64, 4)

  @staticmethod
  def quick() -> Settings:
    return Settings(2, 0.0, 5, 5, 0.0, 3, 1e-6, 16, 2)

  @staticmethod
  def for_run(quick: bool, backend: str) -> Settings:
    """``quick()`` for a dry run, else ``gpu()`` on a GPU backend, ``cpu()`` elsewhere."""
    return Settings.quick() if quick else Settings.gpu() if backend == "gpu" else Settings.cpu()


def loop_size(est_call_s: float, s: Settings) -> tuple[int, int]:
  """``(n, u)``: loop iterations and calls per iteration for a call of about ``est_call_s``."""
  want = s.run_s / max(est_call_s, s.floor_s)
  total = min(s.max_calls, max(s.min_calls, int(want)))
  return max(1, math.ceil((total - 1) / s.unroll)), s.unroll


def estimate_call_s(x_bytes: int, direction: str, copy_gb_s: float | None, s: Settings) -> float:
  """A lower estimate of one call's time: its least bytes at the copy bandwidth."""
  from .device_cases import moves

  if not copy_gb_s:
    return s.floor_s
  return max(s.floor_s, moves(direction) * x_bytes / (copy_gb_s * 1e9))


def _block(out):
  return jax.block_until_ready(out)


def time_runs(run: Callable[[], Any], n_calls: int, s: Settings) -> tuple[dict, Any]:
  """Times ``run`` (one loop run of ``n_calls`` calls); returns the stats and the first
  run's output."""
  t0 = time.perf_counter()
  first = _block(run())  # the first execution: allocations, module load
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  _block(run())
  one = time.perf_counter() - t0
  k = max(1, min(64, math.ceil(s.sample_s / max(one, 1e-9))))
  samples = []
  gc.collect()
  gc.disable()
  try:
    for _ in range(s.samples):
      t0 = time.perf_counter()
      out = None
      for _ in range(k):
        out = run()
      _block(out)
      samples.append((time.perf_counter() - t0) / (k * n_calls))
  finally:
    gc.enable()
  stats = {
    "median_s": statistics.median(samples),
    "min_s": min(samples),
    "samples_s": samples,
    "calls_per_run": n_calls,
    "runs_per_sample": k,
    "first_run_s": first_s,
  }
  return stats, first


def copy_bandwidth(s: Settings) -> dict:
  """``x -> x + one`` in the loop form on a float32 buffer far beyond the caches:
  bytes read + written per call / time per call (the loop's cost included: under 1%
  of a 512 MiB pass)."""
  n_el = s.copy_mib * 2**20 // 4
  x = jax.random.uniform(jax.random.key(0), (n_el,), jnp.float32)  # incompressible data
  one = jnp.float32(1.0)
  n, u = s.copy_iterations, 1
  loop = device_loop.fwd_loop(lambda x, one: x + one, n, u)

  def copy(x, one):
    # Only the last pass's result: the loop then runs in the first pass's buffer, with no
    # copy of it, so that the passes are the calls counted.
    return loop(x, one)[1]

  fn = device_loop.named(copy, "gb_copy")
  compiled = jax.jit(fn).lower(x, one).compile()
  stats, _ = time_runs(lambda: compiled(x, one), device_loop.calls(n, u), s)
  moved = 2 * int(x.nbytes)
  return {
    "function": "x -> x + one (float32), in the loop form",
    "buffer_bytes": int(x.nbytes),
    "bytes_moved_per_call": moved,
    "gb_per_s": moved / stats["median_s"] / 1e9,
    **stats,
  }


class Budget:
  """The run's time budget: an item runs only if its estimated time is left."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.t0 = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def allows(self, est_s: float) -> bool:
    return self.left() >= est_s
