"""Group Normalization's forward and its derivative's two linear maps as
primitives, each lowered per platform.

``forward_p`` computes the output and the per-(sample, group) statistics;
``tangent_p`` is the tangent map of ``group_norm_core`` (forward mode:
``derivative.tangent``); ``cotangent_p`` is its transpose (reverse mode: the
backward pass). Primitives are what let each platform have a reduction plan
and a backward pass of its own while the maths is traced once and ``jvp``,
``jacfwd``, ``hessian`` and ``check_grads`` keep working:

* each is lowered when the program is lowered, by platform: on CUDA and ROCm
  with ``backends/xla_gpu.py``'s plan (and ``xla_gpu_vjp.py``'s closed-form
  backward), elsewhere with ``maths.py``'s and the platform's hints (for the
  backward, JAX's transpose of the tangent map: on the CPU the program gnorm
  has always compiled there). A program lowered for one platform traces only
  that platform's plan (``lax.platform_dependent`` would trace every plan);
* ``tangent_p`` is linear in its tangent operands and its transpose rule is
  ``cotangent_p`` (and the other way round): reverse mode (linearise, then
  transpose) runs the cotangent map and keeps only the non-linear operands
  (``x``, the affine parameters, the mask and the statistics);
* their derivatives (higher orders) are those of plain JAX versions of the
  same functions, so anything JAX can differentiate twice works;
* under ``vmap`` the batch folds into the sample axis, so a batched call is
  one call of the same primitive; when ``x`` itself is not batched (``jacfwd``
  and ``jacrev`` batch a tangent or cotangent only) the plain functions are
  vmapped instead.

The ``plan`` parameter is ``backends.plan()`` at trace time: ``"auto"`` picks
per platform as above; tests force ``"xla"`` or ``"xla:gpu"`` on any platform.
Statistics across devices (``axis_name``) need collectives, which stay in
plain JAX (``derivative.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import core
from jax.extend.core import Primitive
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from gnorm._src import array_types
from gnorm._src import backends
from gnorm._src import lowerings
from gnorm._src import maths
from gnorm._src.backends import pallas_support

forward_p = Primitive("gnorm_forward")
forward_p.multiple_results = True
tangent_p = Primitive("gnorm_tangent")
cotangent_p = Primitive("gnorm_cotangent")
cotangent_p.multiple_results = True


def _eager(p):
  """Outside ``jit``, a primitive runs as a jitted call of itself (so that it
  is lowered, for the platform it runs on, like everywhere else)."""

  @functools.partial(jax.jit, static_argnames="spec")
  def run(*ops, spec):
    return p.bind(*ops, spec=spec)

  return run


forward_p.def_impl(_eager(forward_p))
tangent_p.def_impl(_eager(tangent_p))
cotangent_p.def_impl(_eager(cotangent_p))


@forward_p.def_abstract_eval
def _forward_abstract(*avals, spec):
  x = avals[0]
  stats = array_types.like(x, (x.shape[0], spec.cfg.n_groups), maths.compute_dtype(x.dtype))
  return [x.update(weak_type=False), stats, stats, stats]


@tangent_p.def_abstract_eval
def _tangent_abstract(*avals, spec):
  del spec
  return avals[0].update(weak_type=False)


@cotangent_p.def_abstract_eval
def _cotangent_abstract(*avals, spec):
  res, _ = spec.residuals(avals)
  x = res[0]
  params = [p for p in (res[1], spec.beta_like()) if p is not None]
  return [x.update(weak_type=False)] + [array_types.like(x, p.shape, p.dtype) for p in params]


def _register_lowerings(p, plain, multiple_results: bool) -> None:
  """``plain``'s "xla" plan everywhere, each platform's own where it has one."""
  def lower(platform, platform_plan):
    def fn(*ops, spec):
      out = plain(spec, *ops, platform_plan=platform_plan, platform=platform)
      return out if multiple_results else out[0]
    return mlir.lower_fun(fn, multiple_results=multiple_results)

  mlir.register_lowering(p, lower("default", "xla"))
  for platform in dict.fromkeys(("cuda", *backends.PLAN_PER_PLATFORM)):
    plan = backends.PLAN_PER_PLATFORM.get(platform, "xla")
    # Where Triton compiles the kernels, its deprecation warning is gnorm's
    # business, not the user's (pallas_support.quiet_lowering).
    rule = lower(platform, plan)
    mlir.register_lowering(p, pallas_support.quiet_lowering(rule) if platform == "cuda" else rule,
                           platform=platform)


_register_lowerings(forward_p, lowerings.forward_plain, multiple_results=True)
_register_lowerings(tangent_p, lambda spec, *ops, **_: (lowerings.tangent_plain(spec, *ops),),
                    multiple_results=False)
_register_lowerings(cotangent_p, lowerings.cotangent_plain, multiple_results=True)


def _tangent_transpose(ct, *ops, spec):
  res, lin = spec.residuals(ops)
  if any(ad.is_undefined_primal(a) for a in res if a is not None):
    raise NotImplementedError("group_norm's tangent map is linear in its tangents only")
  if type(ct) is ad.Zero:
    cts = [None] * len(lin)
  else:
    cts = cotangent_p.bind(*lowerings.pack(spec, *res), ct, spec=spec)
  return [None] * (len(ops) - len(lin)) + [c if ad.is_undefined_primal(t) else None
                                           for c, t in zip(cts, lin, strict=True)]


def _cotangent_transpose(cts, *ops, spec):
  res, (ct,) = spec.residuals(ops)
  if not ad.is_undefined_primal(ct) or any(
      ad.is_undefined_primal(a) for a in res if a is not None):
    raise NotImplementedError("group_norm's cotangent map is linear in its cotangent only")
  cts = [ad.instantiate_zeros(c) for c in cts]
  return [None] * (len(ops) - 1) + [tangent_p.bind(*lowerings.pack(spec, *res), *cts, spec=spec)]


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[cotangent_p] = _cotangent_transpose


def _jvp_rule(plain, primals, tangents, *, spec):
  """Higher orders: the plain map's own derivative. The mask (boolean) is
  closed over rather than differentiated."""
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  m = 1 + spec.has_gamma + spec.has_beta  # the mask's index, when present
  if spec.has_mask:
    mask = primals[m]
    primals, tangents = primals[:m] + primals[m + 1:], tangents[:m] + tangents[m + 1:]

    def fn(*ops):
      return plain(spec, *ops[:m], mask, *ops[m:])
  else:
    fn = functools.partial(plain, spec)
  return jax.jvp(fn, tuple(primals), tuple(tangents))


# The forward's higher derivatives are maths.py's (the GPU plan's sums are
# the same function, and jvp-ing its reductions would only be slower).
ad.primitive_jvps[forward_p] = functools.partial(_jvp_rule, lowerings.forward_xla)
ad.primitive_jvps[tangent_p] = functools.partial(_jvp_rule, lowerings.tangent_plain)
ad.primitive_jvps[cotangent_p] = functools.partial(_jvp_rule, lowerings.cotangent_plain)


def _fold(a, d, size: int, n: int, share: bool):
  """Moves batch axis ``d`` (None: unbatched) to the front and merges it into
  the sample axis: ``(B * N, ...)``. With ``share``, an unbatched operand
  whose sample axis is 1 (a mask or parameter common to all samples) stays
  as it is."""
  if d is None:
    if share and a.shape[0] == 1:
      return a
    a = a[None]
  else:
    a = jnp.moveaxis(a, d, 0)
  a = jnp.broadcast_to(a, (size, n, *a.shape[2:]))
  return a.reshape(size * n, *a.shape[2:])


def _batch(p, plain, args, dims, *, spec):
  """vmap: fold the batch into the samples when ``x`` is batched; otherwise
  (a batched tangent or cotangent only: ``jacfwd``, ``jacrev``) vmap the
  plain map."""
  if dims[0] is None:
    out = jax.vmap(functools.partial(plain, spec), in_axes=tuple(dims))(*args)
    return out, ([0] * len(out) if p.multiple_results else 0)
  size, n = args[0].shape[dims[0]], args[0].shape[1 if dims[0] == 0 else 0]
  # The cotangent map's parameter cotangents are per batch element: its
  # per-channel parameters are made per-sample, and their cotangents summed
  # back over the samples of each batch element below.
  m = 1 + spec.has_gamma + spec.has_beta  # the mask's index, when present
  n_res = m + spec.has_mask + spec.has_count + 2
  shared = {m} if spec.has_mask else set()
  if p is forward_p:
    shared |= set(range(1, m))  # gamma, beta
  elif p is tangent_p:
    # A parameter and its tangent stay common to all samples only if neither
    # is batched: their shapes must agree, for the transpose's sake.
    tangents = iter(range(n_res + 1, len(args)))
    pairs = [(1 if spec.has_gamma else None, next(tangents) if spec.has_gamma else None),
             (m - 1 if spec.has_beta else None,
              next(tangents) if spec.beta_aval is not None else None)]
    for param, tan in pairs:
      if tan is not None and dims[tan] is None and (param is None or dims[param] is None):
        shared |= {tan} | ({param} if param is not None else set())
      elif tan is None and param is not None and dims[param] is None:
        shared.add(param)
  folded = [_fold(a, d, size, n, share=i in shared)
            for i, (a, d) in enumerate(zip(args, dims, strict=True))]
  folded_spec = spec
  if spec.beta_aval is not None and p is not forward_p:
    # beta's (co)tangent has the folded shape: per sample, unless shared.
    samples = folded[-1].shape[0] if p is tangent_p else size * n
    folded_spec = spec._replace(beta_aval=((samples, spec.beta_aval[0][1]), spec.beta_aval[1]))
  out = p.bind(*folded, spec=folded_spec)
  if p is tangent_p:
    return out.reshape(size, n, *out.shape[1:]), 0
  if p is forward_p:
    return [o.reshape(size, n, *o.shape[1:]) for o in out], [0] * len(out)
  # Each parameter's own sample axis: 1 for a per-channel parameter.
  samples = []
  if spec.has_gamma:
    samples.append([k for j, k in enumerate(args[1].shape) if j != dims[1]][0])
  if spec.beta_aval is not None:
    samples.append(spec.beta_aval[0][0])
  unfolded = [out[0].reshape(size, n, *out[0].shape[1:])]
  for o, k in zip(out[1:], samples, strict=True):
    o = o.reshape(size, n, *o.shape[1:])
    unfolded.append(jnp.sum(o, axis=1, keepdims=True) if k == 1 else o)
  return unfolded, [0] * len(unfolded)


for _p, _plain in ((forward_p, lowerings.forward_plain), (tangent_p, lowerings.tangent_plain),
                   (cotangent_p, lowerings.cotangent_plain)):
  batching.primitive_batchers[_p] = functools.partial(_batch, _p, _plain)


def tangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, tx, tgamma, tbeta):
  """``derivative.tangent``'s value, through ``tangent_p``."""
  # beta enters the maps only through the activation's derivative: without
  # one, reverse mode need not keep it (its cotangent needs only its aval).
  spec = lowerings.Spec(cfg, gamma is not None, beta is not None and cfg.activation is not None,
                        mask is not None, count is not None, backends.plan(),
                        None if beta is None else (tuple(beta.shape), jnp.dtype(beta.dtype).name))
  ops = lowerings.pack(spec, x, gamma, beta if spec.has_beta else None, mask, count, mean, rstd)
  ops += [tx] + [t for t in (tgamma, tbeta) if t is not None]
  return tangent_p.bind(*ops, spec=spec)


def forward(cfg: maths.Config, x, gamma, beta, mask):
  """``(y, (count, mean, rstd))`` by each platform's plan, through ``forward_p``."""
  spec = lowerings.Spec(cfg, gamma is not None, beta is not None, mask is not None, False,
                        backends.plan())
  ops = [a for a in (x, gamma, beta, mask) if a is not None]
  y, count, mean, rstd = forward_p.bind(*ops, spec=spec)
  return y, (count, mean, rstd)
