"""Group Normalization's forward and its derivative's two linear maps as primitives.

``forward_p`` computes the output and the per-(sample, group) statistics,
``tangent_p`` the tangent map (forward mode) and ``cotangent_p`` its
transpose (reverse mode: the backward pass). Primitives let each platform
lower an implementation of its own (``dispatch.py``) while the maths is
traced once and forward mode keeps working:

* each is lowered, when the program is, by the platform's entry of
  ``dispatch.IMPLEMENTATIONS`` (the tangent map by ``tangent.py`` on all);
* ``tangent_p`` is linear in its tangents and ``cotangent_p`` is its
  transpose (and back): reverse mode keeps only ``x``, the parameters, the
  mask and the statistics;
* their derivatives (higher orders) are those of the plain XLA maths;
* under ``vmap`` the batch folds into the sample axis (one call of the same
  primitive); with ``x`` unbatched (``jacfwd``, ``jacrev``) the plain maths
  is vmapped instead.

The operands are fixed: ``RESIDUALS`` (x, gamma, beta, mask, count, mean,
rstd), then the tangents or the cotangent. An absent gamma, beta, mask or
count is a small stand-in (``_stand_in``) that ``Static`` marks absent, so the
implementations see ``None``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from gnorm._src import array_types
from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src import tangent as tangent_maths
from gnorm._src.backends import pallas_support

RESIDUALS = ("x", "gamma", "beta", "mask", "count", "mean", "rstd")
_MASK = RESIDUALS.index("mask")
_PARAMS = (1, 2)  # gamma, beta; in tangent_p their tangents follow at 7 + 1, 7 + 2


class Static(NamedTuple):
  """The primitives' static parameter: the settings and which operands are real."""

  cfg: maths.Config
  has_gamma: bool
  has_beta: bool
  has_mask: bool
  has_count: bool

  def unpack(self, x, gamma, beta, mask, count=None, mean=None, rstd=None):
    """The residuals with ``None`` for the stand-ins."""
    return (x, gamma if self.has_gamma else None, beta if self.has_beta else None,
            mask if self.has_mask else None, count if self.has_count else None, mean, rstd)


forward_p = Primitive("gnorm_forward")
forward_p.multiple_results = True
tangent_p = Primitive("gnorm_tangent")
cotangent_p = Primitive("gnorm_cotangent")
cotangent_p.multiple_results = True


def _maths_forward(static: Static, *ops):
  y, stats = maths.forward(static.cfg, *static.unpack(*ops)[:4])
  return (y, *stats)


def _maths_tangent(static: Static, *ops):
  x, gamma, beta, mask, count, mean, rstd = static.unpack(*ops[:7])
  tx, tgamma, tbeta = ops[7:]
  # beta enters the tangent map only through the activation's derivative.
  beta = beta if static.cfg.activation is not None else None
  return tangent_maths.tangent(static.cfg, x, gamma, beta, mask, count, mean, rstd, tx,
                               tgamma if static.has_gamma else None,
                               tbeta if static.has_beta else None)


def _parameter_cotangents(dx, dgamma, dbeta, gamma, beta):
  """The cotangent map's outputs, with zeros for a stand-in's (nothing reads them)."""
  return (dx, *[jnp.zeros(p.shape, p.dtype) if d is None else d
                for d, p in zip((dgamma, dbeta), (gamma, beta), strict=True)])


def _maths_cotangent(static: Static, *ops):
  x, gamma, beta, mask, count, mean, rstd = static.unpack(*ops[:7])
  cts = tangent_maths.cotangent(static.cfg, x, gamma, beta, mask, count, mean, rstd, ops[7])
  return _parameter_cotangents(*cts, *ops[1:3])


_MATHS = {forward_p: _maths_forward, tangent_p: _maths_tangent, cotangent_p: _maths_cotangent}


def _eager(p):
  """Outside ``jit``, a primitive runs as a jitted call of itself (so that it
  is lowered, for the platform it runs on, like everywhere else)."""

  @functools.partial(jax.jit, static_argnames="static")
  def run(*ops, static):
    return p.bind(*ops, static=static)

  return run


for _p in _MATHS:
  _p.def_impl(_eager(_p))


@forward_p.def_abstract_eval
def _forward_abstract(x, *_, static):
  stats = array_types.like(x, (x.shape[0], static.cfg.n_groups), maths.compute_dtype(x.dtype))
  return [x.update(weak_type=False), stats, stats, stats]


@tangent_p.def_abstract_eval
def _tangent_abstract(x, *_, static):
  del static
  return x.update(weak_type=False)


@cotangent_p.def_abstract_eval
def _cotangent_abstract(x, gamma, beta, *_, static):
  del static
  return [a.update(weak_type=False) for a in (x, gamma, beta)]


def _lowering(p, platform: str):
  """``p``'s lowering rule for ``platform``: its entry of ``dispatch.IMPLEMENTATIONS``."""
  def fn(*ops, static):
    if p is tangent_p:
      return _maths_tangent(static, *ops)
    which = "forward" if p is forward_p else "cotangent"
    impl = dispatch.lowered(static.cfg.implementation, platform, which)
    if p is forward_p:
      y, stats = impl(static.cfg, *static.unpack(*ops)[:4])
      return (y, *stats)
    return _parameter_cotangents(*impl(static.cfg, *static.unpack(*ops[:7]), ops[7]), *ops[1:3])

  rule = mlir.lower_fun(fn, multiple_results=p.multiple_results)
  # Where Triton compiles the kernels, its deprecation warning is gnorm's.
  return pallas_support.quiet_lowering(rule) if platform == "cuda" else rule


_PLATFORMS = dict.fromkeys([*dispatch.DEFAULT, *[
    q for impl in dispatch.IMPLEMENTATIONS.values() for q in impl.compiled_on or ()]])
for _p in _MATHS:
  mlir.register_lowering(_p, _lowering(_p, "default"))
  for _platform in _PLATFORMS:
    mlir.register_lowering(_p, _lowering(_p, _platform), platform=_platform)


def _tangent_transpose(ct, *ops, static):
  if any(ad.is_undefined_primal(a) for a in ops[:7]):
    raise NotImplementedError("group_norm's tangent map is linear in its tangents only")
  if type(ct) is ad.Zero:
    return [None] * len(ops)
  cts = cotangent_p.bind(*ops[:7], ct, static=static)
  return [None] * 7 + [c if ad.is_undefined_primal(t) else None
                       for c, t in zip(cts, ops[7:], strict=True)]


def _cotangent_transpose(cts, *ops, static):
  if not ad.is_undefined_primal(ops[7]) or any(ad.is_undefined_primal(a) for a in ops[:7]):
    raise NotImplementedError("group_norm's cotangent map is linear in its cotangent only")
  cts = [ad.instantiate_zeros(c) for c in cts]
  return [None] * 7 + [tangent_p.bind(*ops[:7], *cts, static=static)]


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[cotangent_p] = _cotangent_transpose


def _jvp_rule(p, primals, tangents, *, static):
  """Higher orders: the plain XLA maths' own derivative; the mask (boolean)
  is closed over rather than differentiated."""
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  mask = primals[_MASK]

  def fn(*ops):
    return _MATHS[p](static, *ops[:_MASK], mask, *ops[_MASK:])

  drop = lambda a: a[:_MASK] + a[_MASK + 1:]  # noqa: E731
  return jax.jvp(fn, tuple(drop(primals)), tuple(drop(tangents)))


for _p in _MATHS:
  ad.primitive_jvps[_p] = functools.partial(_jvp_rule, _p)


def _fold(a, d, size: int, n: int, share: bool):
  """Moves batch axis ``d`` (None: unbatched) to the front and merges it into
  the sample axis: ``(B * N, ...)``. With ``share``, an unbatched operand
  whose sample axis is 1 (common to all samples) stays as it is."""
  if d is None:
    if share and a.shape[0] == 1:
      return a
    a = a[None]
  else:
    a = jnp.moveaxis(a, d, 0)
  a = jnp.broadcast_to(a, (size, n, *a.shape[2:]))
  return a.reshape(size * n, *a.shape[2:])


def _shared(p, dims) -> set[int]:
  """The operands that may stay common to all samples when folded."""
  shared = {1, 2, _MASK} | ({8, 9} if p is tangent_p else set())
  if p is cotangent_p:
    # Parameter cotangents are per batch element: the parameters are made
    # per-sample, and their cotangents summed back per element (``_batch``).
    shared -= set(_PARAMS)
  elif p is tangent_p:
    # A parameter and its tangent keep one shape, for the transpose's sake.
    for i in _PARAMS:
      if dims[i] is not None or dims[7 + i] is not None:
        shared -= {i, 7 + i}
  return shared


def _batch(p, args, dims, *, static):
  if dims[0] is None:
    out = jax.vmap(functools.partial(_MATHS[p], static), in_axes=tuple(dims))(*args)
    return out, ([0] * len(out) if p.multiple_results else 0)
  size, n = args[0].shape[dims[0]], args[0].shape[1 if dims[0] == 0 else 0]
  shared = _shared(p, dims)
  folded = [_fold(a, d, size, n, share=i in shared)
            for i, (a, d) in enumerate(zip(args, dims, strict=True))]
  out = p.bind(*folded, static=static)
  if p is tangent_p:
    return out.reshape(size, n, *out.shape[1:]), 0
  out = [o.reshape(size, n, *o.shape[1:]) for o in out]
  if p is cotangent_p:
    for i in _PARAMS:  # a per-channel parameter: summed over each element's samples
      samples = args[i].shape[0] if dims[i] is None else args[i].shape[1 if dims[i] == 0 else 0]
      if samples == 1:
        out[i] = jnp.sum(out[i], axis=1, keepdims=True)
  return out, [0] * len(out)


for _p in _MATHS:
  batching.primitive_batchers[_p] = functools.partial(_batch, _p)


def _stand_in(a, shape, dtype):
  return jnp.zeros(shape, dtype) if a is None else a


def forward(cfg: maths.Config, x, gamma, beta, mask):
  """``(y, (count, mean, rstd))`` by each platform's implementation."""
  cdt, c = maths.compute_dtype(x.dtype), x.shape[cfg.channel_axis]
  static = Static(cfg, gamma is not None, beta is not None, mask is not None, False)
  ops = (x, _stand_in(gamma, (1, c), cdt), _stand_in(beta, (1, c), cdt),
         _stand_in(mask, (1,) * x.ndim, jnp.bool_))
  y, count, mean, rstd = forward_p.bind(*ops, static=static)
  return y, (count, mean, rstd)


def tangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, tx, tgamma, tbeta):
  """The tangent map's value, through ``tangent_p`` (``count`` None: the
  constant group size)."""
  cdt, c = mean.dtype, x.shape[cfg.channel_axis]
  static = Static(cfg, gamma is not None, beta is not None, mask is not None, count is not None)
  gamma, tgamma = (_stand_in(a, (1, c), cdt) for a in (gamma, tgamma))
  beta, tbeta = (_stand_in(a, (1, c), cdt) for a in (beta, tbeta))
  ops = (x, gamma, beta, _stand_in(mask, (1,) * x.ndim, jnp.bool_),
         _stand_in(count, (1, cfg.n_groups), cdt), mean, rstd, tx, tgamma, tbeta)
  return tangent_p.bind(*ops, static=static)
