"""The JAX implementations in the loop form: gnorm (default, Pallas, previous GPU program),
flax, equinox and haiku, each compiled once per case and direction, timed, and checked.

``gnorm_prev`` is gnorm's default call traced inside ``dispatch.forced("xla")``, the
plain-maths plan every platform had before the GPU got a plan of its own; the plan is
fixed when the program is traced, so the loop is traced (and lowered) inside the block.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import device_loop
from .device_accuracy import checked_channels
from .device_accuracy import take_channels
from .device_cases import DeviceCase
from .device_timing import Settings
from .device_timing import time_runs
from .impls_jax import JAX_FNS
from .impls_jax import fn_gnorm
from .impls_jax import fn_gnorm_fused
from .machine import optional

_MODULES = {"flax": "flax.linen", "equinox": "equinox", "haiku": "haiku"}


def skip_reason(impl: str, backend: str, named: bool, quick: bool) -> str | None:
  """Why ``impl`` is not run here, or None."""
  if impl == "gnorm_pallas" and backend != "gpu" and not (named and quick):
    return (f"Pallas kernels run in the interpreter on {backend}: not timed (name it in"
            " --only with --quick to exercise the plumbing)")
  module = _MODULES.get(impl)
  if module and optional(module) is None:
    return f"{module} not importable"
  return None


def jax_fn(impl: str, case: DeviceCase):
  """``f(x, gamma, beta)`` of ``impl`` for ``case`` (with SiLU where the case has it: fused
  into gnorm's pass, applied after every other GroupNorm)."""
  base = case.bench_case()
  if impl in ("gnorm", "gnorm_prev", "gnorm_pallas"):
    implementation = "pallas" if impl == "gnorm_pallas" else "auto"
    if case.activation == "silu":
      return fn_gnorm_fused(base, implementation)
    return fn_gnorm(base, implementation)
  f = JAX_FNS[impl](base)
  if case.activation is None:
    return f
  if case.activation != "silu":
    raise ValueError(case.activation)

  def f_silu(x, g, b):
    return jax.nn.silu(f(x, g, b))

  return f_silu


def plan_context(impl: str):
  """The context gnorm_prev's program is traced in (the previous GPU program's plan)."""
  if impl != "gnorm_prev":
    return contextlib.nullcontext()
  from gnorm._src import dispatch

  return dispatch.forced("xla")


class DeviceData:
  """One (shape, dtype)'s inputs on the default device: x and ct in x's dtype (NHWC, and NCHW
  for equinox), gamma and beta float32."""

  def __init__(self, case: DeviceCase, data: dict):
    dt = jnp.dtype(case.dtype)
    self.x = jnp.asarray(data["x"], dt)
    self.ct = jnp.asarray(data["ct"], dt)
    self.g = jnp.asarray(data["gamma"], jnp.float32)
    self.b = jnp.asarray(data["beta"], jnp.float32)
    self._nchw = None

  def args(self, channels_first: bool) -> tuple:
    if not channels_first:
      return self.x, self.ct, self.g, self.b
    if self._nchw is None:
      to = jax.jit(lambda a: jnp.moveaxis(a, -1, 1))
      self._nchw = (to(self.x), to(self.ct))
    return (*self._nchw, self.g, self.b)


def _checked(direction: str, loop, ranges, channels_first: bool):
  """``loop`` returning, besides its outputs cut to the checked channels (what comes back
  to the host), the first call's whole outputs.

  Whole: the loop then starts from a copy of them, as the overhead loop starts from a copy
  of its input, so that the subtraction takes the copy out (cut alone, XLA could start the
  loop in the first call's buffers without one). The parameters' summed gradients stay
  whole: were they dropped, XLA would drop their computation from the loop.
  """
  axis = 1 if channels_first else -1

  def take(a):
    return take_channels(a, ranges, axis)

  def run(*args):
    first, last = loop(*args)
    if direction == "fwd":
      return first, take(first), take(last)
    y0, dx0, dg0, db0 = first
    x, ct, sg, sb = last
    return first, (take(y0), take(dx0), take_channels(dg0, ranges),
                   take_channels(db0, ranges)), (take(x), take(ct), sg, sb)

  return run


def _to_nhwc(a: np.ndarray, channels_first: bool) -> np.ndarray:
  a = np.asarray(a, dtype=np.float64)
  return np.moveaxis(a, 1, -1) if channels_first and a.ndim > 1 else a


def measure_jax(impl: str, case: DeviceCase, direction: str, data: DeviceData, n: int, u: int,
                s: Settings, name: str, *, f=None, context=None, channels_first: bool | None = None,
                on_lowered=None) -> tuple[dict, tuple, dict]:
  """Compiles ``impl``'s loop for ``case`` and ``direction`` and times it.

  ``f``, ``context`` and ``channels_first`` replace ``impl``'s function, the context its
  program is lowered in and its layout (the tile sweep: ``pallas_sweep.py``); ``on_lowered``
  gets the lowered program before it is compiled.

  Returns:
    The time entry (raw seconds per call, the loop sizes, the compile time), the first
    call's outputs on the checked channels (NHWC float64) and the final carry's health.
  """
  if channels_first is None:
    channels_first = impl == "equinox"
  x, ct, g, b = data.args(channels_first)
  f = jax_fn(impl, case) if f is None else f
  if direction == "fwd":
    loop, args = device_loop.fwd_loop(f, n, u), (x, g, b)
  else:
    loop, args = device_loop.fwdbwd_loop(f, n, u), (x, ct, g, b)
  fn = device_loop.named(_checked(direction, loop, checked_channels(case), channels_first), name)
  t0 = time.perf_counter()
  with plan_context(impl) if context is None else context:
    lowered = jax.jit(fn).lower(*args)
  if on_lowered is not None:
    on_lowered(lowered)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  copies = device_loop.body_copies(compiled.as_text(), case.elements)
  stats, out = time_runs(lambda: compiled(*args), device_loop.calls(n, u), s)
  _, first, last = out
  first = first if direction == "fwdbwd" else (first,)
  outputs = tuple(_to_nhwc(o, channels_first) for o in first)
  carry = [np.asarray(a, np.float32) for a in (last if direction == "fwdbwd" else (last,))]
  health = {
    "finite": all(bool(np.all(np.isfinite(a))) for a in carry),
    "rms": [float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) for a in carry],
  }
  entry = {"raw_s": stats["median_s"], **stats, "compile_s": compile_s, "loop": [n, u],
           "module": f"jit_{name}", "carry": health, "loop_copies": copies}
  runner = {"module": f"jit_{name}", "calls": device_loop.calls(n, u),
            "run": lambda: compiled(*args)}
  return entry, outputs, runner


def measure_overhead(case: DeviceCase, direction: str, data: DeviceData, n: int, u: int,
                     s: Settings, name: str) -> dict:
  """The loop's own cost per call for this case's carry: the trivial loop of the same trip
  count, timed as the real one and divided by the same number of calls."""
  x, ct, g, _ = data.args(False)
  carry = device_loop.overhead_carry(direction, x, ct, g)
  one = jnp.float32(1.0)
  fn = device_loop.named(device_loop.overhead_loop(n), name)
  compiled = jax.jit(fn).lower(carry, one).compile()
  copies = device_loop.body_copies(compiled.as_text(), case.elements)
  stats, _ = time_runs(lambda: compiled(carry, one), device_loop.calls(n, u), s)
  return {"per_call_s": stats["median_s"], **stats, "loop": [n, u], "loop_copies": copies}
