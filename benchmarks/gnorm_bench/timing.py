"""How a time is taken: samples of ``k`` blocked calls, medians over interleaved rounds."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def calibrate(fn: Callable[[], Any], sample_s: float) -> int:
  """Calls per sample so that one sample lasts about ``sample_s``."""
  fn()
  fn()  # warm: compiled, caches filled
  t0 = time.perf_counter()
  fn()
  t = time.perf_counter() - t0
  t0 = time.perf_counter()
  fn()
  t = min(t, time.perf_counter() - t0)
  return max(1, min(10_000, round(sample_s / max(t, 1e-7))))


def sample(fn: Callable[[], Any], k: int) -> float:
  """Seconds per call, over ``k`` back-to-back calls."""
  t0 = time.perf_counter()
  for _ in range(k):
    fn()
  return (time.perf_counter() - t0) / k


def stats(samples: list[float], k: int) -> dict:
  return {
    "median_s": statistics.median(samples),
    "min_s": min(samples),
    "samples_s": samples,
    "calls_per_sample": k,
  }


def time_interleaved(
  prepared: dict, rounds: int, sample_s: float, bar=None, label: str = ""
) -> dict:
  """Calibrates, then ``rounds`` rounds; each round visits every variant back
  to back, starting at a different one each time, so that noise on a shared
  machine hits them all alike."""
  ks = {
    (name, d): calibrate(getattr(p, d), sample_s)
    for name, p in prepared.items()
    for d in ("fwd", "fwdbwd")
  }
  samples = {key: [] for key in ks}
  keys = list(ks)
  for r in range(rounds):
    gc.collect()
    gc.disable()
    try:
      for direction in ("fwd", "fwdbwd"):
        order = [k for k in keys if k[1] == direction]
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
          samples[key].append(sample(getattr(prepared[key[0]], direction), ks[key]))
    finally:
      gc.enable()
    if bar:
      bar.update(1)
      bar.set_postfix_str(label)
  return {f"{n}/{d}": stats(v, ks[(n, d)]) for (n, d), v in samples.items()}


def progress_bar(total: int, desc: str, progress: bool, unit: str = "round"):
  """A tqdm bar on stderr, or None (``progress`` off, or no tqdm)."""
  if not progress:
    return None
  try:
    from tqdm import tqdm
  except Exception:  # noqa: BLE001 - any import failure means "no bar"
    return None
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
