"""What each of ``primitives.py``'s primitives computes, plan by plan.

Every primitive has a *plain* function per reduction plan (``"xla"``:
``maths.py`` with the platform's hints; ``"xla:gpu"``: ``backends/xla_gpu.py``
and ``xla_gpu_vjp.py``) and per implementation (``"pallas"``: the kernels of
``backends/pallas.py``); ``plain`` picks the one for a lowering, from the
platform, the forced plan and ``implementation`` (with the tuning table for
``"auto"`` on CUDA). The functions are ordinary JAX code: they are what the
primitives lower to, and, for higher derivatives and for ``vmap`` over a
tangent or cotangent alone, what JAX differentiates or batches instead.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gnorm._src import array_types
from gnorm._src import backends
from gnorm._src import maths
from gnorm._src.backends import tuning
from gnorm._src.backends import xla_gpu
from gnorm._src.backends import xla_gpu_vjp


class Spec(NamedTuple):
  """The primitives' static parameters: which optional operands are present."""

  cfg: maths.Config
  has_gamma: bool
  has_beta: bool  # beta is an operand (the linear maps need it only under an activation)
  has_mask: bool
  has_count: bool
  plan: str  # "auto", "xla" or "xla:gpu"
  # The linear maps: beta's (shape, dtype name) when there is a beta at all,
  # operand or not: its tangent and cotangent have that aval.
  beta_aval: tuple | None = None

  def beta_like(self):
    """A stand-in for beta with its shape and dtype (``None`` without beta)."""
    if self.beta_aval is None:
      return None
    shape, dtype = self.beta_aval
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))

  def inputs(self, ops):
    """``forward_p``'s operands: ``(x, gamma, beta, mask)``, ``None`` where absent."""
    it = iter(ops)
    x = next(it)
    return (x, *[next(it) if present else None
                 for present in (self.has_gamma, self.has_beta, self.has_mask)])

  def residuals(self, ops):
    """``(x, gamma, beta, mask, count, mean, rstd)`` (``None`` where absent)
    and the remaining operands."""
    it = iter(ops)
    x = next(it)
    got = [next(it) if present else None
           for present in (self.has_gamma, self.has_beta, self.has_mask, self.has_count)]
    return (x, *got, next(it), next(it)), list(it)


def pack(spec: Spec, x, gamma, beta, mask, count, mean, rstd) -> list:
  present = (True, spec.has_gamma, spec.has_beta, spec.has_mask, spec.has_count, True, True)
  return [a for a, p in zip((x, gamma, beta, mask, count, mean, rstd), present, strict=True) if p]


def tangent_plain(spec: Spec, *ops):
  res, (tx, *rest) = spec.residuals(ops)
  it = iter(rest)
  tgamma = next(it) if spec.has_gamma else None
  tbeta = next(it) if spec.beta_aval is not None else None
  return backends.per_platform(_tangent_fn(), spec.cfg)(*res, tx, tgamma, tbeta)


def _tangent_fn():
  from gnorm._src import derivative  # noqa: PLC0415 - derivative imports primitives, which imports this module

  return derivative.tangent


def _transposed_tangent(spec: Spec, *ops):
  """The cotangent map as JAX's transpose of the tangent map."""
  res, (ct,) = spec.residuals(ops)
  x, gamma = res[0], res[1]
  # The primals' full types (their varying manual axes too), as JAX checks
  # the cotangents against them.
  avals = [jax.typeof(x)] + [array_types.like(jax.typeof(x), p.shape, p.dtype)
                             for p in (gamma, spec.beta_like()) if p is not None]
  tangent = functools.partial(tangent_plain, spec, *pack(spec, *res))
  # jax.checkpoint, as the rule had before it was a primitive: its barriers
  # keep the backward's recomputations of x - mean apart, which makes this
  # the very program XLA:CPU compiled before (checked op by op).
  return jax.linear_transpose(jax.checkpoint(tangent), *avals)(ct)


def _closed_form(spec: Spec, *ops):
  """The cotangent map in closed form (``xla_gpu_vjp.py``)."""
  (x, gamma, beta, mask, count, mean, rstd), (ct,) = spec.residuals(ops)
  beta = spec.beta_like() if beta is None else beta  # only its shape and dtype, then
  dx, dgamma, dbeta = xla_gpu_vjp.cotangent(spec.cfg, x, gamma, beta, mask, count, mean, rstd, ct)
  return (dx, *[d for d in (dgamma, dbeta) if d is not None])


def forward_xla(spec: Spec, *ops):
  x, gamma, beta, mask = spec.inputs(ops)
  y, stats = maths.forward(backends.hints(), spec.cfg, x, gamma, beta, mask)
  return (y, *stats)


def _forward_gpu(spec: Spec, *ops):
  x, gamma, beta, mask = spec.inputs(ops)
  y, stats = maths.forward(backends.DEFAULT, spec.cfg, x, gamma, beta, mask, plan=xla_gpu.moments)
  return (y, *stats)


def _forward_pallas(spec: Spec, *ops, interpret: bool, chosen=None):
  from gnorm._src.backends import pallas  # noqa: PLC0415 - Triton loads on demand

  x, gamma, beta, _ = spec.inputs(ops)
  y, stats = pallas.forward(spec.cfg, x, gamma, beta, interpret=interpret, chosen=chosen)
  return (y, *stats)


def _cotangent_pallas(spec: Spec, *ops, interpret: bool, chosen=None):
  from gnorm._src.backends import pallas  # noqa: PLC0415 - Triton loads on demand

  (x, gamma, beta, mask, count, mean, rstd), (ct,) = spec.residuals(ops)
  beta = spec.beta_like() if beta is None else beta
  dx, dgamma, dbeta = pallas.cotangent(spec.cfg, x, gamma, beta, mask, count, mean, rstd, ct,
                                       interpret=interpret, chosen=chosen)
  return (dx, *[d for d in (dgamma, dbeta) if d is not None])


# Each function by reduction plan, and by Pallas kernels (compiled by Triton
# on CUDA, in Pallas's interpreter elsewhere); "auto" resolves per platform.
_FORWARD = {"xla": forward_xla, "xla:gpu": _forward_gpu, "pallas": _forward_pallas}
_COTANGENT = {"xla": _transposed_tangent, "xla:gpu": _closed_form, "pallas": _cotangent_pallas}


def _plain(table, spec: Spec, *ops, platform_plan: str = "xla", platform: str | None = None):
  """``table``'s function for ``spec``; ``platform``: where it is being lowered (None: any,
  as for higher derivatives, which take the XLA maths also for the Pallas kernels).

  ``implementation="pallas"`` lowers the kernels: compiled by Triton on CUDA
  (with the tiles the tuning table measured fastest on this GPU, if any), in
  Pallas's interpreter elsewhere. ``"auto"`` lowers them on CUDA where the
  tuning table measured them faster than XLA on this GPU, the XLA plan
  everywhere else.
  """
  impl = spec.cfg.implementation
  if platform is not None and impl != "xla":
    use, block = impl == "pallas", None
    if platform == "cuda":
      use, block = _tuned(spec, ops[0], table is _FORWARD, impl)
    if use:
      return tuple(table["pallas"](spec, *ops, interpret=platform != "cuda", chosen=block))
  plan = platform_plan if spec.plan == "auto" else spec.plan
  return tuple(table[plan](spec, *ops))


def _tuned(spec: Spec, x, forward: bool, impl: str):
  """``(use the kernels?, their tiles)`` for this call on this process's GPU,
  from the tuning table (no GPU, as when lowering for CUDA on a CPU host: the
  kernels only if asked for, with their heuristic tiles)."""
  v = maths.view(x.shape, spec.cfg.channel_axis)
  args = (tuning.gpu_device_kind(), jnp.dtype(x.dtype).name, v.c_pos == 2, v.shape[0],
          v.spatial_size, v.channels, spec.cfg.n_groups)
  if impl == "pallas":
    blocks = tuning.blocks_for(*args)
    return True, None if blocks is None else (blocks.forward if forward else blocks.backward)
  choice = tuning.choose(*args)
  return choice.implementation == "pallas", choice.forward if forward else choice.backward


forward_plain = functools.partial(_plain, _FORWARD)
cotangent_plain = functools.partial(_plain, _COTANGENT)
