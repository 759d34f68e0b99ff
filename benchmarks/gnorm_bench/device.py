"""gpu_bench.py's cases, and device time per call on one GPU: a JAX function's calls chained in
one jitted loop, the loop's own cost, the copy bandwidth; torch's calls as CUDA-graph replays.

A jitted call timed on its own measures the host's launch latency as much as the device. Here
``1 + n*u`` calls run in one program: one call, then a ``lax.fori_loop`` of ``n`` iterations
(a static trip count: no predicate read back) of ``u`` calls, each call's output the next
one's input (forward: x <- y; forward+backward: x <- y, ct <- dx, dgamma and dbeta summed into
the carry, so that XLA can neither hoist nor drop a call), with an ``optimization_barrier``
between calls so that nothing fuses across them, as between two real layers. The loop's own
cost is the same loop and carry with a trivial body (one element of each carried array set to
a traced 1.0), timed alike and subtracted; both loops start from a copy of their carry, so
the subtraction takes that out too. Seconds per call: the median over samples of ``k``
back-to-back runs blocked once at the end, / (k * calls).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Settings:
  run_s: float  # aimed length of one loop run: sets the calls per run
  min_calls: int
  max_calls: int
  sample_s: float  # aimed length of one sample: sets the runs per sample
  samples: int
  floor_s: float  # the least time per call assumed when sizing a loop
  copy_mib: int  # the copy bandwidth's buffer
  unroll: int = 2  # calls per iteration: halves the loop's cost per call; compiles 3 calls


# A GPU: runs of ~5 ms (16-256 calls), 5 samples of ~20 ms; 512 MiB is 10x an H200's L2.
GPU = Settings(5e-3, 16, 256, 20e-3, 5, 8e-6, 512)
CPU = Settings(50e-3, 4, 64, 0.1, 3, 50e-6, 64)
QUICK = Settings(0.0, 5, 5, 0.0, 3, 1e-6, 16)  # a dry run: 5 calls, one run per sample
FULL_CHECK = 2**20  # above this many elements, three groups' channels are checked


@dataclasses.dataclass(frozen=True)
class GpuCase:
  shape: tuple
  dtype: str
  activation: str | None = None
  groups: int = 32

  @property
  def label(self) -> str:
    dt = {"bfloat16": "bf16", "float32": "f32"}[self.dtype]
    return "x".join(map(str, self.shape)) + f" {dt}" + (" +silu" if self.activation else "")

  @property
  def x_bytes(self) -> int:
    return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

  def channels(self) -> tuple:
    """The checked channel ranges: all, or those of groups 0, 1 and G-1."""
    c, cg = self.shape[-1], self.shape[-1] // self.groups
    return ((0, c),) if math.prod(self.shape) <= FULL_CHECK else ((0, 2 * cg), (c - cg, c))


def take(a: np.ndarray, ranges) -> np.ndarray:
  return np.concatenate([a[..., lo:hi] for lo, hi in ranges], axis=-1)


def platform() -> str:
  """The platform gnorm lowers for: cuda, rocm, cpu or tpu."""
  d = jax.devices()[0]
  version = str(getattr(getattr(d, "client", None), "platform_version", "")).lower()
  return ("rocm" if "rocm" in version else "cuda") if d.platform == "gpu" else d.platform


def case_set(shapes, dtypes) -> list:
  """Plain before SiLU, bfloat16 before float32, small shapes first."""
  return [GpuCase(sh, dt, a) for a in (None, "silu") for dt in dtypes for sh in shapes]


def est_call_s(case: GpuCase, d: str, copy_gb_s: float, s: Settings) -> float:
  """A lower estimate of a call: its least bytes (2 x-sizes forward, 5 fwd+bwd) at the copy
  bandwidth."""
  return max(s.floor_s, {"fwd": 2, "fwdbwd": 5}[d] * case.x_bytes / (copy_gb_s * 1e9))


def calls(n: int, u: int) -> int:
  return 1 + n * u


def loop_size(est_call_s: float, s: Settings) -> tuple[int, int]:
  """``(n, u)`` for a call of about ``est_call_s``: a run of about ``s.run_s``."""
  total = min(s.max_calls, max(s.min_calls, int(s.run_s / max(est_call_s, s.floor_s))))
  return max(1, math.ceil((total - 1) / s.unroll)), s.unroll


def fwd_loop(f, n: int, u: int):
  """``run(x, g, b) -> (y0, x_last)``: ``calls(n, u)`` chained calls of ``f``; ``y0`` is the
  first call's output. Each later call gets the previous output cast to x's dtype (flax's
  float32 output of bfloat16 input: the cast fuses into its last kernel)."""
  def run(x, g, b):
    y0 = f(x, g, b)

    def body(_, x):
      for _ in range(u):
        x = lax.optimization_barrier(f(x, g, b).astype(x.dtype))
      return x

    return y0, lax.fori_loop(0, n, body, y0.astype(x.dtype))

  return run


def fwdbwd_loop(fb, n: int, u: int):
  """``run(x, g, b, ct) -> ((y0, dx0, dg0, db0), carry)``: ``calls(n, u)`` chained calls of
  ``fb(x, g, b, ct) -> (y, dx, dg, db)``; the next input is y, the next cotangent dx, the
  parameters' gradients are summed (float32) into the carry."""
  def run(x, g, b, ct):
    first = fb(x, g, b, ct)

    def body(_, carry):
      for _ in range(u):
        x, ct, sg, sb = carry
        y, dx, dg, db = fb(x, g, b, ct)
        carry = lax.optimization_barrier((y.astype(x.dtype), dx.astype(ct.dtype),
                                          sg + dg.astype(jnp.float32), sb + db.astype(jnp.float32)))
      return carry

    y0, dx0, dg0, db0 = first
    init = (y0.astype(x.dtype), dx0.astype(ct.dtype), dg0.astype(jnp.float32),
            db0.astype(jnp.float32))
    return first, lax.fori_loop(0, n, body, init)

  return run


def overhead_loop(n: int):
  """``run(carry, one)``: ``n`` iterations that set one element of every carried array to
  ``one`` (an argument: XLA can neither fold the body nor drop the loop; set, not multiplied:
  an update that reads the carry may be given a copy of it)."""
  def run(carry, one):
    def body(_, c):
      return jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(one.astype(a.dtype)), c)

    return lax.fori_loop(0, n, body, carry)

  return run


def _stats(samples: list, n_calls: int, k: int, **extra) -> dict:
  return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples,
          "calls_per_run": n_calls, "runs_per_sample": k, **extra}


def time_runs(run, n_calls: int, s: Settings) -> tuple[dict, object]:
  """Times ``run()`` (one loop program of ``n_calls`` calls); returns the stats and the first
  run's output."""
  t0 = time.perf_counter()
  first = jax.block_until_ready(run())  # the first execution: allocations, module load
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  k = max(1, min(64, math.ceil(s.sample_s / max(time.perf_counter() - t0, 1e-9))))
  samples = []
  gc.collect()
  gc.disable()
  try:
    for _ in range(s.samples):
      t0 = time.perf_counter()
      for _ in range(k):
        out = run()
      jax.block_until_ready(out)
      samples.append((time.perf_counter() - t0) / (k * n_calls))
  finally:
    gc.enable()
  return _stats(samples, n_calls, k, first_run_s=first_s), first


def copy_bandwidth(s: Settings) -> dict:
  """``x -> x + one`` in the loop form on a float32 buffer far beyond the caches: bytes read
  + written per call / time per call (the loop's cost included: under 1% of a 512 MiB pass)."""
  x = jax.random.uniform(jax.random.key(0), (s.copy_mib * 2**18,), jnp.float32)
  one, n = jnp.float32(1.0), 10
  loop = fwd_loop(lambda x, one, _: x + one, n, 1)
  # Only the last pass's result: the loop then runs in the first pass's buffer, no copy.
  compiled = jax.jit(lambda x, one: loop(x, one, one)[1]).lower(x, one).compile()
  st, _ = time_runs(lambda: compiled(x, one), calls(n, 1), s)
  return {"function": "x -> x + 1 (float32), in the loop form", "buffer_bytes": int(x.nbytes),
          "gb_per_s": 2 * x.nbytes / st["median_s"] / 1e9, **st}


def time_graph(step, n_calls: int, s: Settings) -> dict:
  """torch: ``n_calls`` calls of ``step`` captured in one CUDA graph after a warm-up on a side
  stream (which also compiles torch.compile's kernels), its replays timed with CUDA events."""
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
  graph.replay()
  torch.cuda.synchronize()

  def replays(k: int) -> float:
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(k):
      graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3

  k = max(1, min(64, math.ceil(s.sample_s / max(replays(1), 1e-9))))
  return _stats([replays(k) / (k * n_calls) for _ in range(s.samples)], n_calls, k)
