"""torch on a CUDA GPU: eager ``F.group_norm`` (contiguous NCHW and channels-last) and
``torch.compile`` (Inductor) of the same function, each as many calls in one CUDA graph.

The calls are captured after a warm-up on a side stream (which also compiles
``torch.compile``'s kernels, forward and backward) and the graph's replays are timed with
CUDA events: device time, without host launch gaps between graphs. Forward runs under
``torch.no_grad()``; forward+backward is ``torch.autograd.grad(y, (x, weight, bias), ct)``
inside the captured region. The inputs are those of ``impls_torch.tensors`` (weight and
bias in x's dtype). torch runs only where ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .cases import EPS
from .device_accuracy import checked_channels
from .device_accuracy import take_channels
from .device_cases import DeviceCase
from .device_timing import Settings
from .impls_torch import tensors
from .machine import optional

# The layout torch.compile is given: contiguous NCHW, torch eager's faster layout on an
# H200 (channels-last was 2-8x slower there, GPU_NOTES.md).
COMPILE_LAYOUT = "contiguous NCHW"


def unavailable() -> str | None:
  """Why torch is not timed here, or None."""
  torch = optional("torch")
  if torch is None:
    return "torch not importable (not installed)"
  if not torch.cuda.is_available():
    return "torch.cuda.is_available() is False: torch is timed on a CUDA GPU only"
  return None


def _function(case: DeviceCase, compiled: bool):
  import torch
  import torch.nn.functional as F

  groups, silu = case.groups, case.activation == "silu"

  def gn(x, w, b):
    y = F.group_norm(x, groups, w, b, EPS)
    return F.silu(y) if silu else y

  # A fresh function per case: its own compiled graphs, no recompilation for a new shape.
  return torch.compile(gn, dynamic=False) if compiled else gn


def _steps(case: DeviceCase, data: dict, impl: str):
  """The step that is captured (one call) and the inputs, for ``impl``."""
  import torch

  x, ct, w, b = tensors(case.bench_case(), data, impl == "torch_cl", "cuda")
  fn = _function(case, impl == "torch_compile")
  xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, w, b))

  def fwd():
    with torch.no_grad():
      return (fn(x, w, b),)

  def fwdbwd():
    y = fn(xl, wl, bl)
    return (y, *torch.autograd.grad(y, (xl, wl, bl), ct))

  return fwd, fwdbwd


def _graph(step, n_calls: int):
  import torch

  side = torch.cuda.Stream()
  side.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(side):
    for _ in range(3):
      step()
  torch.cuda.current_stream().wait_stream(side)
  torch.cuda.synchronize()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    for _ in range(n_calls):
      step()
  return graph


def _time_graph(graph, n_calls: int, s: Settings) -> dict:
  import torch

  graph.replay()
  torch.cuda.synchronize()

  def replays(k: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(k):
      graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3

  one = replays(1)
  k = max(1, min(64, math.ceil(s.sample_s / max(one, 1e-9))))
  samples = [replays(k) / (k * n_calls) for _ in range(s.samples)]
  return {
    "median_s": float(np.median(samples)),
    "min_s": min(samples),
    "samples_s": samples,
    "calls_per_run": n_calls,
    "runs_per_sample": k,
  }


def _to_nhwc(t, ranges) -> np.ndarray:
  a = t.detach().float().cpu().numpy().astype(np.float64)
  if a.ndim > 1:
    a = np.moveaxis(a, 1, -1)
  return take_channels(a, ranges)


def measure_torch(impl: str, case: DeviceCase, direction: str, data: dict, n_calls: int,
                  s: Settings) -> tuple[dict, tuple]:
  """Times ``impl`` (torch_nchw, torch_cl or torch_compile) on ``case``: ``n_calls`` calls
  captured in one CUDA graph. Returns the time entry and the outputs of one call (NHWC
  float64, checked channels)."""
  import torch

  fwd, fwdbwd = _steps(case, data, impl)
  step = fwd if direction == "fwd" else fwdbwd
  t0 = time.perf_counter()
  outputs = step()  # the first call compiles torch.compile's kernels
  torch.cuda.synchronize()
  first_s = time.perf_counter() - t0
  ranges = checked_channels(case)
  outputs = tuple(_to_nhwc(o, ranges) for o in outputs)
  graph = _graph(step, n_calls)
  stats = _time_graph(graph, n_calls, s)
  del graph
  entry = {"raw_s": stats["median_s"], **stats, "first_call_s": first_s,
           "layout": "channels_last" if impl == "torch_cl" else "contiguous NCHW"}
  return entry, outputs
