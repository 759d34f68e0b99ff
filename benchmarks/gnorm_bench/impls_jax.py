"""The JAX implementations: gnorm (XLA and Pallas), flax, haiku, equinox, XLA's floor and the
fused-section variants.

Each ``fn_*`` builds, for one case, ``f(x, gamma, beta) -> y``; ``prepare_jax``
jits it, forward and forward+backward, and wraps it in a ``Prepared``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .cases import EPS
from .cases import Case
from .prepared import Prepared
from .prepared import residual_summary


def _bc(t, ndim):
  """``(C,)`` -> broadcastable against channels-last rank ``ndim``."""
  return t.reshape((1,) * (ndim - 1) + (t.shape[0],))


def fn_gnorm(case: Case, implementation: str = "auto"):
  import gnorm

  def f(x, g, b):
    return gnorm.group_norm(
      {"gamma": g, "beta": b}, x, case.groups, EPS, implementation=implementation
    )

  return f


def fn_gnorm_pallas(case: Case):
  """gnorm's two Pallas kernels (Triton on CUDA; Pallas's interpreter elsewhere)."""
  return fn_gnorm(case, implementation="pallas")


def fn_flax(case: Case):
  import flax.linen as nn

  # Default settings except epsilon, which is set to gnorm's so that the
  # outputs can be compared (it does not change the speed).
  m = nn.GroupNorm(num_groups=case.groups, epsilon=EPS)

  def f(x, g, b):
    return m.apply({"params": {"scale": g, "bias": b}}, x)

  return f


def fn_haiku(case: Case):
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


def fn_equinox(case: Case):
  import equinox as eqx

  c = case.shape[-1]
  template = eqx.nn.GroupNorm(case.groups, c, eps=EPS)

  def f(x, g, b):  # x: NCHW
    m = eqx.tree_at(lambda m: (m.weight, m.bias), template, (g, b))
    return jax.vmap(m)(x)

  return f


def fn_floor(case: Case):
  del case

  def f(x, g, b):
    return x * _bc(g, x.ndim) + _bc(b, x.ndim)

  return f


JAX_FNS = {
  "gnorm": fn_gnorm,
  "gnorm_pallas": fn_gnorm_pallas,
  "flax": fn_flax,
  "haiku": fn_haiku,
  "equinox": fn_equinox,
  "floor": fn_floor,
}


# The fused section (issue #7): GroupNorm followed by SiLU, as a diffusion
# UNet block applies it. gnorm fuses the activation into its pass (and its
# backward recomputes the pre-activation from x); the others apply
# ``jax.nn.silu`` to the normalised output, which autodiff then keeps.
def fn_gnorm_fused(case: Case, implementation: str = "auto"):
  import gnorm

  def f(x, g, b):
    p = {"gamma": g, "beta": b}
    return gnorm.group_norm(
      p, x, case.groups, EPS, activation="silu", implementation=implementation
    )

  return f


def fn_gnorm_pallas_fused(case: Case):
  return fn_gnorm_fused(case, implementation="pallas")


def fn_gnorm_unfused(case: Case):
  gn = fn_gnorm(case)

  def f(x, g, b):
    return jax.nn.silu(gn(x, g, b))

  return f


def fn_flax_silu(case: Case):
  gn = fn_flax(case)

  def f(x, g, b):
    return jax.nn.silu(gn(x, g, b))

  return f


FUSED_FNS = {
  "gnorm_fused": fn_gnorm_fused,
  "gnorm_pallas_fused": fn_gnorm_pallas_fused,
  "gnorm_unfused": fn_gnorm_unfused,
  "flax": fn_flax_silu,
  "floor": fn_floor,
}


def _nchw(a):
  return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def prepare_jax(name: str, case: Case, data: dict, make=None) -> Prepared:
  """``name``'s function (or ``make``'s) on ``data``, jitted, on the default device."""
  make = make or JAX_FNS[name]
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

  def io_bytes():
    # y's dtype is the implementation's choice (flax and haiku promote
    # bfloat16 input to the float32 parameters' dtype).
    return int(x.nbytes), int(fwd().nbytes)

  def residuals():
    # The leaves of the function jax.vjp returns are the residuals; tracing
    # suffices to list them, and shows which of them is the input x itself.
    def leaves(x, g, b):
      return jax.tree_util.tree_leaves(jax.vjp(f, x, g, b)[1])

    jaxpr = jax.make_jaxpr(leaves)(x, g, b).jaxpr
    x_var = jaxpr.invars[0]
    return residual_summary(
      [
        (str(v.aval.dtype), list(v.aval.shape), v.aval.dtype.itemsize, v is x_var)
        for v in jaxpr.outvars
        if hasattr(v.aval, "shape")
      ],
      x.size,
      x.dtype.itemsize,
    )

  note = "NCHW input, vmapped over batch" if channels_first else ""
  return Prepared(fwd, fwdbwd, outputs, io_bytes, compile_once, residuals, note)
