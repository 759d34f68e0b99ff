"""Side-by-side benchmark of ``gnorm.group_norm`` (issue #5).

Compares gnorm with ``flax.linen.GroupNorm`` and, when they are importable,
haiku's ``hk.GroupNorm``, equinox's ``eqx.nn.GroupNorm`` and torch's native
``torch.nn.functional.group_norm``, plus XLA's floor for the same tensor: one
elementwise pass that reads ``x`` once and writes ``y`` once,
``jax.jit(lambda x, g, b: x * g + b)``.

What is measured, per shape:

* forward: the jitted function, ``y = f(x, gamma, beta)``;
* forward+backward: the jitted ``y, vjp = jax.vjp(f, x, gamma, beta)`` followed
  by ``vjp(ct)`` for a fixed random cotangent ``ct``, returning ``y`` and the
  gradients for ``x``, ``gamma`` and ``beta`` (what ``jax.grad`` of
  ``sum(y * ct)`` computes, but with ``y`` also returned, as a training step
  needs it and as torch's autograd produces it);
* each timing is the median over rounds; within a round every implementation
  is timed back to back (in a rotating order), so noise on a shared machine
  hits them all alike. One sample is ``k`` blocked calls, ``k`` chosen so a
  sample lasts about ``--sample-ms``;
* ratios: time / floor (the floor is always the *forward* one-pass time, in
  both tables), flax / gnorm and torch / gnorm, and their geometric means;
* compile time: wall time of ``jax.jit(f).lower(...).compile()`` on a fresh
  function object (median of ``--compile-reps``; the process is warm, so this
  is not the cold first compile of the process);
* memory: ``compiled.memory_analysis().temp_size_in_bytes`` of the jitted
  forward+backward, and the residuals the backward keeps alive: the array
  leaves of the ``jax.vjp`` function (``jax.tree_util.tree_leaves(vjp_fn)``,
  listed by tracing it with ``jax.make_jaxpr``, which also tells which leaf is
  the input ``x`` itself), total bytes and bytes other than ``x``;
* accuracy: every implementation's ``y`` and gradients are compared with
  gnorm's and with a float64 NumPy reference, with the same ``eps`` (1e-5) for
  all, so a fast but wrong kernel cannot win silently.

A second section (issue #7), "Fused GroupNorm + SiLU", runs on diffusion-UNet
shapes ((2, 64, 64, 320) and (2, 32, 32, 640), float32 and bfloat16, G=32):
gnorm's fused ``group_norm(p, x, G, activation="silu")`` against
``jax.nn.silu(group_norm(p, x, G))``, ``jax.nn.silu`` after flax's GroupNorm
and ``F.silu(F.group_norm(...))`` in torch's faster layout, with the floor as
above. Same timing method; compiled temp bytes of the forward and
forward+backward (one compilation each, no compile times); the residuals the
backward keeps (torch: the tensors autograd saves, through
``torch.autograd.graph.saved_tensors_hooks``); accuracy against the float64
reference of ``silu(group_norm(x))``.

Layouts: gnorm, flax, haiku and the floor get NHWC input. Equinox's layer
takes one unbatched channels-first sample, so it is ``jax.vmap``-ed over the
batch and given NCHW input (transposed once, outside the timed region): it is
measured in the layout it wants. Torch is timed on both a contiguous NCHW and
a channels-last tensor and the faster counts; forward runs under
``torch.no_grad()``, forward+backward is ``torch.autograd.grad`` for ``x``,
``weight`` and ``bias``; ``torch.set_num_threads`` is set to the cores XLA
uses, and ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (see below). Parameters
are float32 for every implementation, also for the bfloat16 input (so flax
and haiku, which promote to the parameter dtype, return float32 there;
gnorm, equinox and torch return bfloat16); the floor's ``g`` and ``b`` are in
``x``'s dtype so that it writes ``x``'s dtype.

Two runtimes in one process: torch's OpenMP threads spin after each parallel
region by default, and on a machine with few cores they then compete with
XLA's thread pool for the cores the next implementation runs on (and XLA's
with torch's). Measured on the 2-core machine of the README: interleaving
torch's ``group_norm`` made gnorm's forward up to 1.6x slower and torch's own
up to 1.9x slower than in a process without the other runtime. With
``OMP_WAIT_POLICY=PASSIVE`` (set here before torch is imported, unless the
environment already sets it) idle OpenMP threads sleep instead, and both
sides run close to their undisturbed times. The setting is recorded with the
results.

Usage::

  python benchmarks/bench.py [--quick] [--rounds N] [--out DIR]
                             [--only gnorm,flax,haiku,equinox,torch]
                             [--sections main,fused]

Writes ``latest.md``, ``latest.json`` and ``latest.png`` to ``--out``
(default ``benchmarks/results``). The floor is always run: the ratios need it.
``--sections fused`` runs only the fused section (no chart: it plots the main
one); the fused section needs gnorm in ``--only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Before torch (and its OpenMP runtime) can be imported: see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

EPS = 1e-5
ALL_IMPLS = ("gnorm", "flax", "haiku", "equinox", "torch", "floor")
# Names in the order the tables show them.
JAX_IMPLS = ("gnorm", "flax", "haiku", "equinox", "floor")


@dataclasses.dataclass(frozen=True)
class Case:
  shape: tuple[int, ...]  # NHWC
  groups: int
  dtype: str = "float32"

  @property
  def label(self) -> str:
    s = "x".join(map(str, self.shape))
    return f"{s} G={self.groups}" + (
      "" if self.dtype == "float32" else f" {self.dtype}"
    )


FULL_CASES = (
  Case((128, 26, 26, 16), 4),
  Case((8, 56, 56, 256), 32),
  Case((8, 14, 14, 1024), 32),
  Case((2, 64, 64, 320), 32),
  Case((2, 32, 32, 640), 32),
  Case((2, 16, 16, 1280), 32),
  Case((2, 8, 8, 1280), 32),
  Case((32, 28, 28, 64), 32),
  Case((2, 64, 64, 320), 32, "bfloat16"),
)
# One small bfloat16 case: it exercises every code path (dtype casts, the
# residual listing and the memory targets) with the fewest compilations.
QUICK_CASES = (Case((2, 8, 8, 64), 32, "bfloat16"),)
# The fused GroupNorm + SiLU section (issue #7): diffusion-UNet shapes. The
# quick mode reuses its one small bfloat16 case.
FUSED_CASES = (
  Case((2, 64, 64, 320), 32),
  Case((2, 64, 64, 320), 32, "bfloat16"),
  Case((2, 32, 32, 640), 32),
  Case((2, 32, 32, 640), 32, "bfloat16"),
)
QUICK_FUSED_CASES = QUICK_CASES
SECTIONS = ("main", "fused")
# The shape the issue asks memory numbers for; residuals are measured for
# every case of its dtype (the quick mode's small bfloat16 case included).
MEMORY_CASE = Case((2, 64, 64, 320), 32, "bfloat16")

# Accuracy bounds for the sanity check, as max |error| / max |reference|
# against the float64 reference: loose enough for every correct
# implementation (bfloat16 output carries 8 bits), tight enough to flag a
# wrong kernel.
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


# --------------------------------------------------------------------------
# Implementations. Each builds, for one case, a ``Prepared``: zero-argument
# callables that run once and block, plus what the reports need.


@dataclasses.dataclass
class Prepared:
  fwd: Callable[[], Any]
  fwdbwd: Callable[[], Any]
  outputs: Callable[[], tuple[np.ndarray, ...]]  # y, dx, dgamma, dbeta (NHWC)
  compile_once: Callable[[str], tuple[float, Any]] | None = None
  residuals: Callable[[], dict] | None = None
  note: str = ""


def _optional(name: str):
  try:
    return importlib.import_module(name)
  except Exception:  # noqa: BLE001 - any import failure means "not available"
    return None


def _bc(t, ndim):
  """``(C,)`` -> broadcastable against channels-last rank ``ndim``."""
  return t.reshape((1,) * (ndim - 1) + (t.shape[0],))


def _fn_gnorm(case: Case):
  import gnorm

  def f(x, g, b):
    return gnorm.group_norm({"gamma": g, "beta": b}, x, case.groups, EPS)

  return f


def _fn_flax(case: Case):
  import flax.linen as nn

  # Default settings except epsilon, which is set to gnorm's so that the
  # outputs can be compared (it does not change the speed).
  m = nn.GroupNorm(num_groups=case.groups, epsilon=EPS)

  def f(x, g, b):
    return m.apply({"params": {"scale": g, "bias": b}}, x)

  return f


def _fn_haiku(case: Case):
  import haiku as hk

  # Scale and offset are passed at call time: the same maths as the
  # parameters haiku would create, without a parameter dict to build.
  def layer(x, g, b):
    gn = hk.GroupNorm(case.groups, eps=EPS, create_scale=False, create_offset=False)
    return gn(x, scale=g, offset=b)

  apply = hk.without_apply_rng(hk.transform(layer)).apply

  def f(x, g, b):
    return apply({}, x, g, b)

  return f


def _fn_equinox(case: Case):
  import equinox as eqx

  c = case.shape[-1]
  template = eqx.nn.GroupNorm(case.groups, c, eps=EPS)

  def f(x, g, b):  # x: NCHW
    m = eqx.tree_at(lambda m: (m.weight, m.bias), template, (g, b))
    return jax.vmap(m)(x)

  return f


def _fn_floor(case: Case):
  del case

  def f(x, g, b):
    return x * _bc(g, x.ndim) + _bc(b, x.ndim)

  return f


_JAX_FNS = {
  "gnorm": _fn_gnorm,
  "flax": _fn_flax,
  "haiku": _fn_haiku,
  "equinox": _fn_equinox,
  "floor": _fn_floor,
}


# The fused section (issue #7): GroupNorm followed by SiLU, as a diffusion
# UNet block applies it. gnorm fuses the activation into its pass (and its
# backward recomputes the pre-activation from x); the others apply
# ``jax.nn.silu`` to the normalised output, which autodiff then keeps.
def _fn_gnorm_fused(case: Case):
  import gnorm

  def f(x, g, b):
    return gnorm.group_norm(
      {"gamma": g, "beta": b}, x, case.groups, EPS, activation="silu"
    )

  return f


def _fn_gnorm_unfused(case: Case):
  gn = _fn_gnorm(case)

  def f(x, g, b):
    return jax.nn.silu(gn(x, g, b))

  return f


def _fn_flax_silu(case: Case):
  gn = _fn_flax(case)

  def f(x, g, b):
    return jax.nn.silu(gn(x, g, b))

  return f


_FUSED_FNS = {
  "gnorm_fused": _fn_gnorm_fused,
  "gnorm_unfused": _fn_gnorm_unfused,
  "flax": _fn_flax_silu,
  "floor": _fn_floor,
}
# Column titles of the fused section, in table order.
FUSED_TITLES = {
  "gnorm_fused": "gnorm fused",
  "gnorm_unfused": "gnorm + silu",
  "flax": "flax + silu",
  "torch": "torch + silu",
}


def _nchw(a):
  return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def _prepare_jax(name: str, case: Case, data: dict, make=None) -> Prepared:
  make = make or _JAX_FNS[name]
  dt = jnp.dtype(case.dtype)
  channels_first = name == "equinox"
  x_np, ct_np = data["x"], data["ct"]
  if channels_first:
    x_np, ct_np = _nchw(x_np), _nchw(ct_np)
  x = jnp.asarray(x_np, dtype=dt)
  ct = jnp.asarray(ct_np, dtype=dt)
  pdt = dt if name == "floor" else jnp.float32
  g = jnp.asarray(data["gamma"], dtype=pdt)
  b = jnp.asarray(data["beta"], dtype=pdt)

  def fwdbwd_of(f):
    def fb(x, g, b, ct):
      y, vjp = jax.vjp(f, x, g, b)
      return (y, *vjp(ct.astype(y.dtype)))

    return fb

  f = make(case)
  # The jitted functions that are timed: the last fresh one compile_once made
  # (its call reuses that compilation), so each function compiles once per rep.
  jitted = {}

  def compile_once(direction: str):
    fresh = make(case)  # fresh function objects: no trace or compile cache hit
    if direction == "fwd":
      jf, args = jax.jit(lambda x, g, b: fresh(x, g, b)), (x, g, b)
    else:
      jf, args = jax.jit(fwdbwd_of(fresh)), (x, g, b, ct)
    t0 = time.perf_counter()
    compiled = jf.lower(*args).compile()
    elapsed = time.perf_counter() - t0
    jitted[direction] = jf
    return elapsed, compiled

  def get(direction):
    if direction not in jitted:
      compile_once(direction)
    return jitted[direction]

  def fwd():
    return get("fwd")(x, g, b).block_until_ready()

  def fwdbwd():
    return jax.block_until_ready(get("fwdbwd")(x, g, b, ct))

  def outputs():
    outs = [np.asarray(o, dtype=np.float64) for o in get("fwdbwd")(x, g, b, ct)]
    if channels_first:
      outs[0] = np.moveaxis(outs[0], 1, -1)
      outs[1] = np.moveaxis(outs[1], 1, -1)
    return tuple(outs)

  def residuals():
    # The leaves of the function jax.vjp returns are the residuals; tracing
    # suffices to list them, and shows which of them is the input x itself.
    def leaves(x, g, b):
      return jax.tree_util.tree_leaves(jax.vjp(f, x, g, b)[1])

    jaxpr = jax.make_jaxpr(leaves)(x, g, b).jaxpr
    x_var = jaxpr.invars[0]
    return _residual_summary(
      [
        (str(v.aval.dtype), list(v.aval.shape), v.aval.dtype.itemsize, v is x_var)
        for v in jaxpr.outvars
        if hasattr(v.aval, "shape")
      ],
      x.size,
      x.dtype.itemsize,
    )

  note = "NCHW input, vmapped over batch" if channels_first else ""
  return Prepared(fwd, fwdbwd, outputs, compile_once, residuals, note)


def _residual_summary(leaves: list, x_size: int, x_itemsize: int) -> dict:
  """``leaves``: ``(dtype, shape, itemsize, is_x)`` per kept array."""
  out = [
    (f"{dt}{shape}" + (" (= x)" if is_x else ""), math.prod(shape), isz, is_x)
    for dt, shape, isz, is_x in leaves
  ]
  return {
    "total_bytes": int(sum(n * isz for _, n, isz, _ in out)),
    "bytes_excluding_x": int(sum(n * isz for _, n, isz, is_x in out if not is_x)),
    "x_bytes": int(x_size * x_itemsize),
    "full_size_leaves": [s for s, n, _, _ in out if n >= x_size],
    "leaves": [s for s, _, _, _ in out],
  }


def _prepare_torch(
  case: Case, data: dict, channels_last: bool, activation: str | None = None
) -> Prepared:
  import torch
  import torch.nn.functional as F

  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  def tensor(a_nhwc):
    t = torch.from_numpy(np.array(a_nhwc)).permute(0, 3, 1, 2)  # a writable copy
    return t.to(tdt).contiguous(memory_format=fmt)

  x = tensor(data["x"])
  ct = tensor(data["ct"])
  w = torch.from_numpy(data["gamma"].astype(np.float32))
  b = torch.from_numpy(data["beta"].astype(np.float32))
  xl = x.detach().clone().contiguous(memory_format=fmt).requires_grad_(True)
  wl = w.detach().clone().requires_grad_(True)
  bl = b.detach().clone().requires_grad_(True)
  groups = case.groups
  act = {None: lambda t: t, "silu": F.silu}[activation]

  def fwd():
    with torch.no_grad():
      return act(F.group_norm(x, groups, w, b, EPS))

  def fwdbwd():
    y = act(F.group_norm(xl, groups, wl, bl, EPS))
    return (y, *torch.autograd.grad(y, (xl, wl, bl), ct))

  def outputs():
    y, dx, dw, db = fwdbwd()
    nhwc = [t.detach().permute(0, 2, 3, 1).float().numpy() for t in (y, dx)]
    return (
      *[a.astype(np.float64) for a in nhwc],
      dw.detach().double().numpy(),
      db.detach().double().numpy(),
    )

  def residuals():
    # What autograd saves for the backward, seen through saved-tensor hooks;
    # one tensor saved twice (same memory, shape and strides) counts once.
    saved = {}

    def pack(t):
      key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
      is_x = t.data_ptr() == xl.data_ptr() and t.shape == xl.shape
      saved[key] = (
        str(t.dtype).removeprefix("torch."),
        list(t.shape),
        t.element_size(),
        is_x,
      )
      return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      y = act(F.group_norm(xl, groups, wl, bl, EPS))
    del y
    return _residual_summary(list(saved.values()), xl.numel(), xl.element_size())

  return Prepared(
    fwd,
    fwdbwd,
    outputs,
    residuals=residuals,
    note="channels_last" if channels_last else "contiguous NCHW",
  )


# --------------------------------------------------------------------------
# Reference and data.


def make_data(case: Case, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  c = case.shape[-1]
  x = rng.standard_normal(case.shape, dtype=np.float32) + np.float32(0.5)
  ct = rng.standard_normal(case.shape, dtype=np.float32)
  if case.dtype != "float32":  # the reference sees exactly what the kernels see
    x = np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32))
    ct = np.asarray(jnp.asarray(ct, case.dtype).astype(jnp.float32))
  return {
    "x": x,
    "ct": ct,
    "gamma": (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32),
    "beta": (0.1 * rng.standard_normal(c)).astype(np.float32),
  }


def reference(
  case: Case, data: dict, activation: str | None = None
) -> tuple[np.ndarray, ...]:
  """Float64 NumPy forward and backward: y, dx, dgamma, dbeta (NHWC).

  ``activation="silu"``: of ``silu(group_norm(x))``.
  """
  n, c, g = case.shape[0], case.shape[-1], case.groups
  x = data["x"].astype(np.float64).reshape(n, -1, g, c // g)
  ct = data["ct"].astype(np.float64).reshape(n, -1, g, c // g)
  gamma = data["gamma"].astype(np.float64).reshape(1, 1, g, c // g)
  beta = data["beta"].astype(np.float64).reshape(1, 1, g, c // g)
  mean = x.mean(axis=(1, 3), keepdims=True)
  xc = x - mean
  rstd = 1.0 / np.sqrt((xc * xc).mean(axis=(1, 3), keepdims=True) + EPS)
  xhat = xc * rstd
  y = xhat * gamma + beta
  if activation == "silu":
    sig = 1.0 / (1.0 + np.exp(-y))
    ct = ct * sig * (1.0 + y * (1.0 - sig))  # through silu'(z) = s (1 + z (1 - s))
    y = y * sig
  elif activation is not None:
    raise ValueError(activation)
  dxhat = ct * gamma
  dx = rstd * (
    dxhat
    - dxhat.mean(axis=(1, 3), keepdims=True)
    - xhat * (dxhat * xhat).mean(axis=(1, 3), keepdims=True)
  )
  dgamma = (ct * xhat).sum(axis=(0, 1)).reshape(c)
  dbeta = ct.sum(axis=(0, 1)).reshape(c)
  return (y.reshape(case.shape), dx.reshape(case.shape), dgamma, dbeta)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
  """max |a - ref| / max |ref|: one number per output, scale-free."""
  return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --------------------------------------------------------------------------
# Timing.


def _calibrate(fn: Callable[[], Any], sample_s: float) -> int:
  fn()
  fn()  # warm: compiled, caches filled
  t0 = time.perf_counter()
  fn()
  t = time.perf_counter() - t0
  t0 = time.perf_counter()
  fn()
  t = min(t, time.perf_counter() - t0)
  return max(1, min(10_000, round(sample_s / max(t, 1e-7))))


def _sample(fn: Callable[[], Any], k: int) -> float:
  t0 = time.perf_counter()
  for _ in range(k):
    fn()
  return (time.perf_counter() - t0) / k


def geomean(xs) -> float:
  xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
  return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def _loadavg() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def machine_info(threads: int) -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "dm-haiku", "equinox", "torch", "numpy"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  try:
    versions["gnorm"] = importlib.metadata.version("gnorm")
  except importlib.metadata.PackageNotFoundError:
    versions["gnorm"] = "source tree"
  return {
    "cpu": cpu,
    "cores": threads,
    "os_cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax_backend": jax.default_backend(),
    "jax_devices": [str(d) for d in jax.devices()],
    "versions": versions,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    "loadavg_start": _loadavg(),
    "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }


# --------------------------------------------------------------------------
# The run.


def _available(only: set[str]) -> tuple[list[str], dict[str, str]]:
  names, skipped = [], {}
  mods = {
    "flax": "flax.linen",
    "haiku": "haiku",
    "equinox": "equinox",
    "torch": "torch",
    "gnorm": "gnorm",
  }
  for name in ALL_IMPLS:
    if name != "floor" and name not in only:
      continue
    if name in mods and _optional(mods[name]) is None:
      skipped[name] = "not importable"
      continue
    names.append(name)
  return names, skipped


def _threads() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


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
    entry["ok"] = max(entry["y_vs_ref"], entry["grad_vs_ref"]) <= TOL[dtype]
    acc[name] = entry
  return acc


def _time_interleaved(
  prepared: dict, rounds: int, sample_s: float, bar=None, label: str = ""
) -> dict:
  """Calibrates, then ``rounds`` rounds; each round visits every variant back
  to back, starting at a different one each time."""
  ks = {
    (name, d): _calibrate(getattr(p, d), sample_s)
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
          samples[key].append(_sample(getattr(prepared[key[0]], direction), ks[key]))
    finally:
      gc.enable()
    if bar:
      bar.update(1)
      bar.set_postfix_str(label)
  return {
    f"{n}/{d}": {
      "median_s": statistics.median(v),
      "min_s": min(v),
      "samples_s": v,
      "calls_per_sample": ks[(n, d)],
    }
    for (n, d), v in samples.items()
  }


def _progress_bar(total: int, desc: str, progress: bool):
  tqdm = getattr(_optional("tqdm"), "tqdm", None) if progress else None
  return tqdm(total=total, desc=desc, unit="round", file=sys.stderr) if tqdm else None


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


def run(
  cases, impls, rounds: int, sample_s: float, compile_reps: int, progress: bool = True
) -> dict:
  threads = _threads()
  if "torch" in impls:
    import torch

    torch.set_num_threads(threads)
  # Timed variants: torch is timed in both of its layouts.
  variants = [n for n in impls if n != "torch"]
  if "torch" in impls:
    variants += ["torch_nchw", "torch_cl"]
  bar = _progress_bar(len(cases) * rounds, "rounds", progress)

  results = {"machine": machine_info(threads), "cases": []}
  for case in cases:
    data = make_data(case)
    prepared: dict[str, Prepared] = {}
    for name in variants:
      if name == "torch_nchw":
        prepared[name] = _prepare_torch(case, data, channels_last=False)
      elif name == "torch_cl":
        prepared[name] = _prepare_torch(case, data, channels_last=True)
      else:
        prepared[name] = _prepare_jax(name, case, data)

    # Compile time and compiled memory, interleaved over implementations; the
    # last compilation of each function is the one timed below.
    comp: dict[str, dict[str, list[float]]] = {}
    mem: dict[str, dict] = {}
    for _ in range(compile_reps):
      for name, p in prepared.items():
        if p.compile_once is None:
          continue
        for direction in ("fwd", "fwdbwd"):
          t, compiled = p.compile_once(direction)
          comp.setdefault(name, {}).setdefault(direction, []).append(t)
          _record_compiled(mem.setdefault(name, {}), direction, compiled)
    # Accuracy: a wrong kernel should be visible whatever its speed.
    acc = _accuracy(prepared, reference(case, data), case.dtype, "gnorm")

    if case.dtype == MEMORY_CASE.dtype:  # only where it is reported
      for name, p in prepared.items():
        if p.residuals is not None and name != "floor":
          mem.setdefault(name, {})["residuals"] = p.residuals()

    results["cases"].append(
      {
        "label": case.label,
        "shape": list(case.shape),
        "groups": case.groups,
        "dtype": case.dtype,
        "times": _time_interleaved(prepared, rounds, sample_s, bar, case.label),
        "compile_s": {
          n: {d: statistics.median(v) for d, v in dd.items()} for n, dd in comp.items()
        },
        # Every repetition, in order: the first one of the first case is the
        # coldest (it also pays for one-time tracing machinery).
        "compile_s_reps": comp,
        "memory": mem,
        "accuracy": acc,
        "notes": {n: p.note for n, p in prepared.items() if p.note},
      }
    )
    del prepared
    jax.clear_caches()
  if bar:
    bar.close()
  results["machine"]["loadavg_end"] = _loadavg()
  summarize(results)
  return results


def run_fused(
  cases, impls, rounds: int, sample_s: float, progress: bool = True
) -> dict:
  """The fused GroupNorm + SiLU section (issue #7): gnorm's fused activation
  against ``silu`` applied after gnorm, flax and torch. Times, compiled temp
  bytes and kept residuals; one compilation per function (no compile times)."""
  if "torch" in impls:
    import torch

    torch.set_num_threads(_threads())
  variants = ["gnorm_fused", "gnorm_unfused"]
  variants += [n for n in ("flax", "floor") if n in impls]
  if "torch" in impls:
    variants += ["torch_nchw", "torch_cl"]
  bar = _progress_bar(len(cases) * rounds, "fused rounds", progress)
  out = {"activation": "silu", "cases": []}
  for case in cases:
    data = make_data(case)
    prepared: dict[str, Prepared] = {}
    for name in variants:
      if name.startswith("torch_"):
        prepared[name] = _prepare_torch(
          case, data, channels_last=name == "torch_cl", activation="silu"
        )
      else:
        prepared[name] = _prepare_jax(name, case, data, make=_FUSED_FNS[name])
    mem: dict[str, dict] = {}
    comp: dict[str, dict[str, float]] = {}
    for name, p in prepared.items():
      if p.compile_once is None:
        continue
      for direction in ("fwd", "fwdbwd"):
        t, compiled = p.compile_once(direction)
        comp.setdefault(name, {})[direction] = t
        _record_compiled(mem.setdefault(name, {}), direction, compiled)
    acc = _accuracy(
      prepared, reference(case, data, activation="silu"), case.dtype, "gnorm_fused"
    )
    for name, p in prepared.items():
      if p.residuals is not None and name != "floor":
        mem.setdefault(name, {})["residuals"] = p.residuals()
    out["cases"].append(
      {
        "label": case.label,
        "shape": list(case.shape),
        "groups": case.groups,
        "dtype": case.dtype,
        "times": _time_interleaved(prepared, rounds, sample_s, bar, case.label),
        "compile_s": comp,  # one compilation each: indicative only
        "memory": mem,
        "accuracy": acc,
        "notes": {n: p.note for n, p in prepared.items() if p.note},
      }
    )
    del prepared
    jax.clear_caches()
  if bar:
    bar.close()
  _summarize_fused(out)
  return out


def _kept(case: dict, name: str) -> dict | None:
  """Residuals of ``name``; ``torch``: those of its faster fwd+bwd layout."""
  if name == "torch":
    name = "torch_cl" if _torch_layout(case, "fwdbwd") == " cl" else "torch_nchw"
  return case["memory"].get(name, {}).get("residuals")


def _summarize_fused(fused: dict) -> None:
  cases = fused["cases"]
  summary = {}
  _add_ratio_summaries(
    summary, cases, "gnorm_fused", ("gnorm_unfused", "flax", "torch"),
    ("gnorm_fused", "gnorm_unfused", "flax", "torch", "floor"))
  checks = []
  big = [
    f"{c['label']}: {s}"
    for c in cases
    if (r := _kept(c, "gnorm_fused"))
    for s in r["full_size_leaves"]
    if not s.endswith("(= x)")
  ]
  checks.append(
    (
      "fused backward keeps only x and per-(N, G) statistics",
      not big,
      "full-size: " + ", ".join(big) if big else "no full-size leaf besides x",
    )
  )
  worse = [
    c["label"]
    for c in cases
    if (f := c["memory"].get("gnorm_fused", {}).get("fwdbwd_temp_bytes")) is not None
    and (u := c["memory"].get("gnorm_unfused", {}).get("fwdbwd_temp_bytes")) is not None
    and f > 1.01 * u
  ]
  checks.append(
    (
      "fused fwd+bwd temp bytes <= unfused (1% slack)",
      not worse,
      "more on: " + ", ".join(worse) if worse else "on every shape",
    )
  )
  if "gnorm_unfused/gnorm_fused/fwdbwd" in summary:
    e = summary["gnorm_unfused/gnorm_fused/fwdbwd"]
    checks.append(
      (
        "fused fwd+bwd no slower than unfused (geomean unfused/fused >= 1)",
        e["geomean"] >= 1.0,
        f"{e['geomean']:.2f}× (best-of-rounds {e['geomean_of_min']:.2f}×; forward "
        f"{summary['gnorm_unfused/gnorm_fused/fwd']['geomean']:.2f}×)",
      )
    )
  checks.append(_accuracy_check(cases))
  fused["summary"] = summary
  fused["checks"] = _check_records(checks)


def _accuracy_check(cases: list) -> tuple[str, bool, str]:
  """The target every section shares: no implementation outside its bound."""
  bad = [
    f"{c['label']} {n}" for c in cases for n, a in c["accuracy"].items() if not a["ok"]
  ]
  return (
    "every implementation within the accuracy bound",
    not bad,
    "mismatch: " + ", ".join(bad) if bad else "all agree",
  )


def _check_records(checks: list) -> list[dict]:
  return [{"target": t, "met": bool(ok), "detail": d} for t, ok, d in checks]


def _t(case: dict, name: str, direction: str, stat: str = "median_s") -> float | None:
  """Median (or ``stat``) seconds; ``torch``: the faster of its two layouts."""
  if name == "torch":
    ts = [_t(case, v, direction, stat) for v in ("torch_nchw", "torch_cl")]
    ts = [t for t in ts if t is not None]
    return min(ts) if ts else None
  e = case["times"].get(f"{name}/{direction}")
  return e[stat] if e else None


def _ratios(cases: list, num: tuple, den: tuple) -> list:
  """``_t(c, *num) / _t(c, *den)`` per case, None where either is missing."""
  out = []
  for c in cases:
    a, b = _t(c, *num), _t(c, *den)
    out.append(a / b if a and b else None)
  return out


def _add_ratio_summaries(summary: dict, cases: list, ref: str, others: tuple,
                         names: tuple) -> None:
  """Speedups other/ref (medians, and best-of-rounds as a second opinion on a
  loaded machine) and time / the floor's forward, per direction."""
  for d in ("fwd", "fwdbwd"):
    for other in others:
      sp = _ratios(cases, (other, d), (ref, d))
      if any(s is not None for s in sp):
        sm = _ratios(cases, (other, d, "min_s"), (ref, d, "min_s"))
        summary[f"{other}/{ref}/{d}"] = {
          "per_case": sp,
          "geomean": geomean(sp),
          "geomean_of_min": geomean(sm),
        }
    for name in names:
      fl = _ratios(cases, (name, d), ("floor", "fwd"))
      if any(s is not None for s in fl):
        summary[f"{name}/floor/{d}"] = {"per_case": fl, "geomean": geomean(fl)}


def _traffic(case: dict, name: str, direction: str) -> int | None:
  return case["memory"].get(name, {}).get(f"{direction}_bytes_accessed")


def _traffic_ratio(case: dict, name: str, direction: str) -> float | None:
  """Bytes ``name`` moves / bytes gnorm moves (XLA's estimate)."""
  a, g = _traffic(case, name, direction), _traffic(case, "gnorm", direction)
  return a / g if a and g else None


def summarize(results: dict) -> None:
  """Adds ratios, geometric means and the issue's target checks."""
  cases = results["cases"]
  summary = {}
  _add_ratio_summaries(
    summary, cases, "gnorm", ("flax", "haiku", "equinox", "torch"),
    ("gnorm", "flax", "haiku", "equinox", "torch", "floor"))
  for d in ("fwd", "fwdbwd"):
    cg = [c["compile_s"].get("gnorm", {}).get(d) for c in cases]
    cf = [c["compile_s"].get("flax", {}).get(d) for c in cases]
    if all(cg) and all(cf):
      summary[f"compile/flax/gnorm/{d}"] = geomean(
        [f / g for f, g in zip(cf, cg, strict=True)]
      )

  for d in ("fwd", "fwdbwd"):
    tr = [_traffic_ratio(c, "flax", d) for c in cases]
    if any(t is not None for t in tr):
      summary[f"traffic/flax/gnorm/{d}"] = {"per_case": tr, "geomean": geomean(tr)}

  checks = []
  if "flax/gnorm/fwd" in summary and "flax/gnorm/fwdbwd" in summary:
    f, fb = summary["flax/gnorm/fwd"], summary["flax/gnorm/fwdbwd"]
    losing = [
      f"{c['label']} {dn}"
      for c in cases
      for d, dn in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))
      if (s := summary[f"flax/gnorm/{d}"]["per_case"][cases.index(c)]) is not None
      and s < 1
    ]
    checks.append(
      (
        "faster than flax on every shape, both directions",
        not losing,
        "losing: " + ", ".join(losing) if losing else "all faster",
      )
    )
    checks.append(
      (
        "geomean flax/gnorm forward >= 1.5x",
        f["geomean"] >= 1.5,
        f"{f['geomean']:.2f}x",
      )
    )
    checks.append(
      (
        "geomean flax/gnorm fwd+bwd >= 2.0x",
        fb["geomean"] >= 2.0,
        f"{fb['geomean']:.2f}x",
      )
    )
  if "torch/gnorm/fwdbwd" in summary:
    tb = summary["torch/gnorm/fwdbwd"]["geomean"]
    tf = summary["torch/gnorm/fwd"]["geomean"]
    checks.append(
      (
        "fwd+bwd at least on par with torch (geomean torch/gnorm >= 1)",
        tb >= 1.0,
        f"{tb:.2f}x (forward: {tf:.2f}x)",
      )
    )
  for c in cases:
    if c["dtype"] != MEMORY_CASE.dtype:
      continue
    m = c["memory"]
    if "gnorm" in m and "flax" in m:
      tg, tf = m["gnorm"].get("fwdbwd_temp_bytes"), m["flax"].get("fwdbwd_temp_bytes")
      if tg is not None and tf:
        checks.append(
          (
            "bf16 fwd+bwd temp bytes <= half of flax's",
            tg <= tf / 2,
            f"gnorm {tg:,} B vs flax {tf:,} B ({tg / tf:.2f}x)",
          )
        )
    if "gnorm" in m and "residuals" in m["gnorm"]:
      r = m["gnorm"]["residuals"]
      big = [s for s in r["full_size_leaves"] if not s.endswith("(= x)")]
      checks.append(
        (
          "backward keeps only x and per-(N, G) statistics",
          not big,
          f"residuals {r['total_bytes']:,} B, {r['bytes_excluding_x']:,} B besides x"
          + (f"; full-size: {', '.join(big)}" if big else ""),
        )
      )
  if "compile/flax/gnorm/fwd" in summary:
    cf, cb = summary["compile/flax/gnorm/fwd"], summary["compile/flax/gnorm/fwdbwd"]
    checks.append(
      (
        "compile time no worse than flax (geomean flax/gnorm >= 1)",
        cf >= 1.0 and cb >= 1.0,
        f"fwd {cf:.2f}x, fwd+bwd {cb:.2f}x",
      )
    )
  checks.append(_accuracy_check(cases))
  results["summary"] = summary
  results["checks"] = _check_records(checks)


# --------------------------------------------------------------------------
# Reports.


def _fmt_t(s: float | None) -> str:
  if s is None:
    return "—"
  if s < 1e-3:
    return f"{s * 1e6:.0f} µs"
  return f"{s * 1e3:.2f} ms"


def _fmt_b(b: int | None) -> str:
  if b is None:
    return "—"
  return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def _torch_layout(case: dict, d: str) -> str:
  a, b = _t(case, "torch_nchw", d), _t(case, "torch_cl", d)
  if a is None or b is None:
    return ""
  return " cl" if b < a else " nchw"


def to_markdown(results: dict, command: str) -> str:
  m = results["machine"]
  cases = results["cases"]
  present = [
    n
    for n in ("gnorm", "flax", "haiku", "equinox", "torch")
    if any(_t(c, n, "fwd") for c in cases)
  ]
  fused_torch = any(
    _t(c, "torch", "fwd") for c in results.get("fused", {}).get("cases", [])
  )
  v = m["versions"]
  lines = [
    "# gnorm benchmark",
    "",
    f"`{command}` — {m['date_utc']}",
    "",
    f"Machine: {m['cpu']}, {m['cores']} cores ({m['platform']}), JAX backend "
    f"`{m['jax_backend']}`; Python {m['python']}; "
    + ", ".join(f"{k} {val}" for k, val in v.items() if val)
    + ".",
    (
      f"torch threads = {m['cores']}, OMP_WAIT_POLICY={m.get('omp_wait_policy') or 'unset'}"
      " (idle OpenMP threads sleep instead of spinning on the cores XLA needs). "
      if "torch" in present or fused_torch
      else ""
    )
    + f"Load average (1, 5, 15 min) at start {m.get('loadavg_start')}, "
    f"at end {m.get('loadavg_end')} (above the core count, other processes "
    "shared the machine: trust ratios more than times).",
    "",
    "Times are medians over interleaved rounds; `×` is time / floor, where the floor"
    " is XLA's one-pass `jit(lambda x, g, b: x * g + b)` **forward** on the same tensor"
    " (also for the forward+backward table). Speedup columns are other / gnorm"
    " (> 1: gnorm faster). torch is the faster of contiguous NCHW and channels_last"
    " (marked). Equinox runs vmapped on NCHW input (its layout).",
    "",
  ]
  if not cases:  # --sections fused
    return "\n".join(lines + _fused_markdown(results))
  for d, title in (
    ("fwd", "Forward"),
    ("fwdbwd", "Forward + backward (y and grads for x, gamma, beta)"),
  ):
    head = (
      ["shape", "floor"]
      + present
      + [f"{o}/gnorm" for o in ("flax", "torch") if o in present]
    )
    lines += [
      f"## {title}",
      "",
      "| " + " | ".join(head) + " |",
      "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|",
    ]
    for c in cases:
      fl = _t(c, "floor", "fwd")
      row = [c["label"], _fmt_t(_t(c, "floor", d)) + ("" if d == "fwd" else " (fb)")]
      for n in present:
        t = _t(c, n, d)
        cell = "—" if t is None else f"{_fmt_t(t)} ({t / fl:.2f}×)"
        if n == "torch" and t is not None:
          cell += _torch_layout(c, d)
        if n in c["accuracy"] and not c["accuracy"][n]["ok"]:
          cell += " **WRONG**"
        row.append(cell)
      for o in ("flax", "torch"):
        if o in present:
          a, g = _t(c, o, d), _t(c, "gnorm", d)
          row.append(f"{a / g:.2f}×" if a and g else "—")
      lines.append("| " + " | ".join(row) + " |")
    s = results["summary"]
    gm = ["**geomean**", ""]
    for n in present:
      e = s.get(f"{n}/floor/{d}")
      gm.append(f"{e['geomean']:.2f}×" if e else "—")
    for o in ("flax", "torch"):
      if o in present:
        e = s.get(f"{o}/gnorm/{d}")
        gm.append(f"**{e['geomean']:.2f}×**" if e else "—")
    lines += ["| " + " | ".join(gm) + " |", ""]
    mins = [
      f"{o}/gnorm {s[f'{o}/gnorm/{d}']['geomean_of_min']:.2f}×"
      for o in ("flax", "haiku", "equinox", "torch")
      if f"{o}/gnorm/{d}" in s
    ]
    if mins:
      lines += [
        "Geometric-mean speedups from best-of-rounds instead of median times: "
        + ", ".join(mins)
        + ".",
        "",
      ]
    if d == "fwdbwd":
      lines += [
        "The floor column here is the floor's own forward+backward (fb);"
        " the × ratios still divide by its forward.",
        "",
      ]

  jax_present = [n for n in JAX_IMPLS if any(n in c["compile_s"] for c in cases)]
  lines += [
    "## Compile time (lower + compile, fresh function, warm process)",
    "",
    "| shape | " + " | ".join(f"{n} fwd / fwd+bwd" for n in jax_present) + " |",
    "|---|" + "|".join(["--:"] * len(jax_present)) + "|",
  ]
  for c in cases:
    row = [c["label"]]
    for n in jax_present:
      e = c["compile_s"].get(n)
      row.append(f"{e['fwd'] * 1e3:.0f} / {e['fwdbwd'] * 1e3:.0f} ms" if e else "—")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")

  mem_impls = [n for n in jax_present if n != "floor"]
  lines += [
    "## Memory",
    "",
    "Compiled temp bytes (`jax.jit(f).lower(...).compile().memory_analysis()"
    ".temp_size_in_bytes`), forward / forward+backward.",
    "",
    "| shape | "
    + " | ".join(mem_impls)
    + (" | fwd+bwd gnorm/flax |" if {"gnorm", "flax"} <= set(mem_impls) else " |"),
    "|---|"
    + "|".join(["--:"] * len(mem_impls))
    + ("|--:|" if {"gnorm", "flax"} <= set(mem_impls) else "|"),
  ]
  for c in cases:
    row = [c["label"]]
    for n in mem_impls:
      mm = c["memory"].get(n, {})
      row.append(
        f"{_fmt_b(mm.get('fwd_temp_bytes'))} / {_fmt_b(mm.get('fwdbwd_temp_bytes'))}"
      )
    if {"gnorm", "flax"} <= set(mem_impls):
      tg = c["memory"].get("gnorm", {}).get("fwdbwd_temp_bytes")
      tf = c["memory"].get("flax", {}).get("fwdbwd_temp_bytes")
      row.append(f"{tg / tf:.2f}×" if tg is not None and tf else "—")
    lines.append("| " + " | ".join(row) + " |")
  lines += [
    "",
    "Residuals the backward keeps alive, for the bfloat16 input: the array"
    " leaves of the function `jax.vjp(f, x, gamma, beta)` returns (listed by tracing),"
    " in total and without the input `x` itself (the caller holds `x` anyway);"
    " ×x = in units of x's bytes.",
    "",
    "| shape | impl | residuals total | residuals besides x | full-size leaves |",
    "|---|---|--:|--:|---|",
  ]
  for c in cases:
    for n in mem_impls:
      r = c["memory"].get(n, {}).get("residuals")
      if not r:
        continue
      xb = r["x_bytes"] or 1
      lines.append(
        f"| {c['label']} | {n} | {_fmt_b(r['total_bytes'])} "
        f"({r['total_bytes'] / xb:.2f}×x) | "
        f"{_fmt_b(r['bytes_excluding_x'])} ({r['bytes_excluding_x'] / xb:.2f}×x) | "
        f"{', '.join(r['full_size_leaves']) or '—'} |"
      )
  lines.append("")

  lines += _traffic_markdown(results, jax_present)

  impls_acc = [n for n in present if any(n in c["accuracy"] for c in cases)]
  lines += [
    "## Accuracy (same eps = 1e-5 for all)",
    "",
    "max |Δy| vs gnorm; and max|error|/max|reference| of y and of the worst gradient"
    " against a float64 NumPy reference (bound: "
    + ", ".join(f"{k} {v:g}" for k, v in TOL.items())
    + ").",
    "",
    "| shape | "
    + " | ".join(f"{n}: \\|Δy\\| vs gnorm; y, grad vs f64" for n in impls_acc)
    + " |",
    "|---|" + "|".join(["--:"] * len(impls_acc)) + "|",
  ]
  for c in cases:
    row = [c["label"]]
    for n in impls_acc:
      variants = ["torch_nchw", "torch_cl"] if n == "torch" else [n]
      cells = []
      for vn in variants:
        a = c["accuracy"].get(vn)
        if a is None:
          continue
        cells.append(
          f"{a.get('max_abs_dy_vs_gnorm', float('nan')):.1e}; {a['y_vs_ref']:.1e}, "
          f"{a['grad_vs_ref']:.1e}" + ("" if a["ok"] else " **WRONG**")
        )
      row.append(" / ".join(cells) or "—")
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")

  lines += ["## Issue #5 targets", "", "| target | met | detail |", "|---|---|---|"]
  for ch in results["checks"]:
    lines.append(
      f"| {ch['target']} | {'yes' if ch['met'] else '**no**'} | {ch['detail']} |"
    )
  lines.append("")
  lines += _fused_markdown(results)
  return "\n".join(line for line in lines if line is not None)


def _traffic_markdown(results: dict, jax_present: list) -> list[str]:
  """Bytes moved per call (XLA's cost analysis), in units of x's bytes."""
  cases, s = results["cases"], results["summary"]
  impls = [n for n in jax_present if any(_traffic(c, n, "fwd") for c in cases)]
  if "gnorm" not in impls or "flax" not in impls:
    return []
  lines = [
    "## Memory traffic",
    "",
    "Bytes a compiled call reads and writes, XLA's own estimate"
    " (`compiled.cost_analysis()['bytes accessed']`), in units of x's bytes,"
    " forward / forward+backward. Where a shape's time is set by memory"
    " bandwidth, no implementation can beat another by more than the ratio of"
    " their traffic: the last two columns put that ceiling beside the measured"
    " forward+backward speedup.",
    "",
    "| shape | " + " | ".join(impls)
    + " | fwd+bwd traffic flax/gnorm | fwd+bwd speed flax/gnorm |",
    "|---|" + "|".join(["--:"] * (len(impls) + 2)) + "|",
  ]
  for c in cases:
    xb = math.prod(c["shape"]) * jnp.dtype(c["dtype"]).itemsize
    row = [c["label"]]
    for n in impls:
      f, fb = _traffic(c, n, "fwd"), _traffic(c, n, "fwdbwd")
      row.append(
        f"{f / xb:.1f} / {fb / xb:.1f}" if f and fb else "—"
      )
    tr = _traffic_ratio(c, "flax", "fwdbwd")
    a, g = _t(c, "flax", "fwdbwd"), _t(c, "gnorm", "fwdbwd")
    row.append(f"{tr:.2f}×" if tr else "—")
    row.append(f"{a / g:.2f}×" if a and g else "—")
    lines.append("| " + " | ".join(row) + " |")
  e = s.get("traffic/flax/gnorm/fwdbwd")
  if e:
    sp = s.get("flax/gnorm/fwdbwd", {}).get("geomean")
    lines += [
      "| **geomean** | " + " | ".join([""] * len(impls))
      + f" | **{e['geomean']:.2f}×** | "
      + (f"**{sp:.2f}×**" if sp else "—") + " |",
    ]
  lines.append("")
  return lines


def _fused_markdown(results: dict) -> list[str]:
  fused = results.get("fused")
  if not fused or not fused["cases"]:
    return []
  cases, s = fused["cases"], fused["summary"]
  present = [n for n in FUSED_TITLES if any(_t(c, n, "fwd") for c in cases)]
  others = [
    (n, t)
    for n, t in (("gnorm_unfused", "unfused"), ("flax", "flax"), ("torch", "torch"))
    if n in present
  ]
  head = (
    ["shape", "pass", "floor"]
    + [FUSED_TITLES[n] for n in present]
    + [f"{t}/fused" for _, t in others]
  )
  lines = [
    "## Fused GroupNorm + SiLU",
    "",
    '`gnorm fused`: `group_norm(p, x, G, activation="silu")`, SiLU in the same'
    " pass, the backward recomputing the pre-activation from `x`; `gnorm + silu`:"
    " `jax.nn.silu(group_norm(p, x, G))`; `flax + silu`:"
    " `jax.nn.silu(flax.linen.GroupNorm(G)(x))`; `torch + silu`:"
    " `F.silu(F.group_norm(x, G, w, b))`, the faster of NCHW and channels_last."
    " Interleaved medians; `×` is time / the floor's forward, as above;"
    " `other/fused` > 1: the fused gnorm is faster.",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "|".join(["---", "---"] + ["--:"] * (len(head) - 2)) + "|",
  ]
  for c in cases:
    fl = _t(c, "floor", "fwd")
    for d, dn in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
      row = [c["label"], dn, _fmt_t(_t(c, "floor", d)) if fl else "—"]
      for n in present:
        t = _t(c, n, d)
        cell = "—" if t is None else _fmt_t(t) + (f" ({t / fl:.2f}×)" if fl else "")
        if n == "torch" and t is not None:
          cell += _torch_layout(c, d)
        acc = [a for k, a in c["accuracy"].items() if k == n or k.startswith(n + "_")]
        if acc and not all(a["ok"] for a in acc):
          cell += " **WRONG**"
        row.append(cell)
      for n, _ in others:
        a, g = _t(c, n, d), _t(c, "gnorm_fused", d)
        row.append(f"{a / g:.2f}×" if a and g else "—")
      lines.append("| " + " | ".join(row) + " |")
  for d, dn in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
    gm = ["**geomean**", dn, ""]
    for n in present:
      e = s.get(f"{n}/floor/{d}")
      gm.append(f"{e['geomean']:.2f}×" if e else "—")
    for n, _ in others:
      e = s.get(f"{n}/gnorm_fused/{d}")
      gm.append(f"**{e['geomean']:.2f}×**" if e else "—")
    lines.append("| " + " | ".join(gm) + " |")
  mins = [
    f"{t}/fused {s[key]['geomean_of_min']:.2f}× ({dn})"
    for d, dn in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd"))
    for n, t in others
    if (key := f"{n}/gnorm_fused/{d}") in s
  ]
  lines += [
    "",
    "From best-of-rounds times instead of medians: " + ", ".join(mins) + ".",
    "",
    "Memory: compiled temp bytes (`memory_analysis().temp_size_in_bytes`) of the"
    " forward / forward+backward, and what the backward keeps: the array leaves of"
    " `jax.vjp(f, x, gamma, beta)`'s function (torch: the tensors autograd saves,"
    " seen through `saved_tensors_hooks`, for the layout of its fwd+bwd time), in"
    " total and without `x` itself; ×x = in units of x's bytes. Last column: max"
    " error / max reference of y and of the worst gradient against a float64 NumPy"
    " reference of silu(group_norm(x)).",
    "",
    "| shape | impl | temp fwd / fwd+bwd | kept total | kept besides x"
    " | full-size kept | y, grad vs f64 |",
    "|---|---|--:|--:|--:|---|--:|",
  ]
  for c in cases:
    for n in present:
      mm = c["memory"].get(n, {})
      temp = (
        f"{_fmt_b(mm.get('fwd_temp_bytes'))} / {_fmt_b(mm.get('fwdbwd_temp_bytes'))}"
        if mm.get("fwdbwd_temp_bytes") is not None
        else "—"
      )
      r = _kept(c, n)
      if r:
        xb = r["x_bytes"] or 1
        kept = [
          f"{_fmt_b(r['total_bytes'])} ({r['total_bytes'] / xb:.2f}×x)",
          f"{_fmt_b(r['bytes_excluding_x'])} ({r['bytes_excluding_x'] / xb:.2f}×x)",
          ", ".join(r["full_size_leaves"]) or "—",
        ]
      else:
        kept = ["—", "—", "—"]
      errs = []
      for k in ("torch_nchw", "torch_cl") if n == "torch" else (n,):
        a = c["accuracy"].get(k)
        if a:
          errs.append(
            f"{a['y_vs_ref']:.1e}, {a['grad_vs_ref']:.1e}"
            + ("" if a["ok"] else " **WRONG**")
          )
      lines.append(
        f"| {c['label']} | {FUSED_TITLES[n]} | {temp} | "
        + " | ".join(kept)
        + f" | {' / '.join(errs) or '—'} |"
      )
  lines += ["", "| fused target | met | detail |", "|---|---|---|"]
  for ch in fused["checks"]:
    lines.append(
      f"| {ch['target']} | {'yes' if ch['met'] else '**no**'} | {ch['detail']} |"
    )
  lines.append("")
  return lines


def to_png(results: dict, path: str) -> bool:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except Exception:  # noqa: BLE001
    print("matplotlib not importable: no chart written", file=sys.stderr)
    return False
  cases = results["cases"]
  if not cases:  # --sections fused: the chart is of the main section
    return False
  names = [
    n
    for n in ("gnorm", "flax", "haiku", "equinox", "torch")
    if any(_t(c, n, "fwd") for c in cases)
  ]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cases) + 3), 8), sharex=True)
  width = 0.8 / max(1, len(names))
  xs = np.arange(len(cases))
  panels = (("fwd", "forward"), ("fwdbwd", "forward + backward"))
  for ax, (d, title) in zip(axes, panels, strict=True):
    for i, n in enumerate(names):
      vals = [(_t(c, n, d) or np.nan) / _t(c, "floor", "fwd") for c in cases]
      ax.bar(xs + (i - (len(names) - 1) / 2) * width, vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("time / XLA floor (x*g+b fwd)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(axis="y", which="both", alpha=0.3)
  axes[0].legend(ncol=len(names), fontsize=8)
  axes[1].set_xticks(xs, [c["label"].replace(" ", "\n", 1) for c in cases], fontsize=7)
  m = results["machine"]
  fig.suptitle(
    f"gnorm vs others, lower is better — {m['cpu']}, {m['cores']} cores, "
    f"jax {m['versions']['jax']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  raise TypeError(type(o))


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n", 1)[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="tiny shapes, 2 rounds: a smoke test (< 30 s), not a measurement",
  )
  p.add_argument(
    "--rounds",
    type=int,
    default=None,
    help="timing rounds per shape (default 20; 2 with --quick)",
  )
  p.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    help="output directory (default: benchmarks/results)",
  )
  p.add_argument(
    "--only",
    default=",".join(n for n in ALL_IMPLS if n != "floor"),
    help="comma-separated implementations: gnorm,flax,haiku,equinox,torch"
    " (the floor always runs)",
  )
  p.add_argument(
    "--sample-ms",
    type=float,
    default=None,
    help="target duration of one timing sample (default 25; 2 with --quick)",
  )
  p.add_argument(
    "--compile-reps",
    type=int,
    default=None,
    help="fresh compiles per function, median taken (default 3; 1 with --quick)",
  )
  p.add_argument(
    "--sections",
    default=",".join(SECTIONS),
    help="comma-separated sections to run: main (the GroupNorm comparison),"
    " fused (GroupNorm + SiLU, fused vs unfused); default both",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)

  sections = {s.strip() for s in args.sections.split(",") if s.strip()}
  if not sections or sections - set(SECTIONS):
    p.error(
      f"unknown section(s) {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}"
    )

  only = {s.strip() for s in args.only.split(",") if s.strip()}
  unknown = only - set(ALL_IMPLS)
  if unknown:
    p.error(f"unknown implementation(s) {sorted(unknown)}; choose from {ALL_IMPLS}")
  impls, skipped = _available(only)
  for n, why in skipped.items():
    print(f"skipping {n}: {why}", file=sys.stderr)

  cases = QUICK_CASES if args.quick else FULL_CASES
  rounds = args.rounds or (2 if args.quick else 20)
  sample_s = (args.sample_ms or (2.0 if args.quick else 25.0)) / 1e3
  compile_reps = args.compile_reps or (1 if args.quick else 3)

  t0 = time.perf_counter()
  if "main" in sections:
    results = run(
      cases, impls, rounds, sample_s, compile_reps, progress=not args.no_progress
    )
  else:
    results = {"machine": machine_info(_threads()), "cases": []}
    results["summary"], results["checks"] = {}, []
  if "fused" in sections:
    if "gnorm" in impls:
      results["fused"] = run_fused(
        QUICK_FUSED_CASES if args.quick else FUSED_CASES,
        impls,
        rounds,
        sample_s,
        progress=not args.no_progress,
      )
      results["machine"]["loadavg_end"] = _loadavg()
    else:
      print("skipping the fused section: it needs gnorm", file=sys.stderr)
  results["skipped"] = skipped
  results["settings"] = {
    "rounds": rounds,
    "sample_s": sample_s,
    "compile_reps": compile_reps,
    "quick": args.quick,
    "sections": [s for s in SECTIONS if s in sections],
    "wall_s": time.perf_counter() - t0,
  }
  command = (
    "python benchmarks/bench.py"
    + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
  )
  os.makedirs(args.out, exist_ok=True)
  md = to_markdown(results, command.strip())
  with open(os.path.join(args.out, "latest.md"), "w") as fh:
    fh.write(md)
  with open(os.path.join(args.out, "latest.json"), "w") as fh:
    json.dump(results, fh, indent=1, default=_json_default)
  png = to_png(results, os.path.join(args.out, "latest.png"))
  print(md)
  print(
    f"\nwrote {args.out}/latest.{{md,json{',png' if png else ''}}} "
    f"in {results['settings']['wall_s']:.0f} s",
    file=sys.stderr,
  )
  return results


if __name__ == "__main__":
  main()
