"""The derivative of Group Normalization: a lean, forward-mode-safe rule.

``group_norm_core`` is a ``jax.custom_jvp``. Its rule evaluates the forward
(each platform's plan: ``primitives.forward_p``) and returns the tangent map
``tangent`` below, through ``primitives.tangent_p``: a primitive whose transpose
is the backward pass. Reverse mode (linearise, then transpose) therefore keeps
only ``x``, the affine parameters and the per-(N, G) statistics alive, and
each platform lowers a backward pass of its own (the CPU: JAX's transpose of
``tangent`` with the CPU's hints; CUDA and ROCm: the closed form of
``backends/xla_gpu_vjp.py``). Forward mode and higher orders keep working
because the primitives' derivatives are those of plain JAX code (a
``custom_vjp`` would make ``jax.jvp`` and ``jax.jacfwd`` raise).

With ``axis_name`` (statistics across devices) the sums need collectives,
which stay in plain JAX: the tangent map is then wrapped in
``jax.checkpoint`` instead, for the same lean residuals, and transposed by
JAX on every platform. With ``implementation="pallas"`` the primitives lower
the kernels of ``backends/pallas.py``, forward and backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gnorm._src import backends
from gnorm._src import primitives
from gnorm._src.backends.hints import Hints
from gnorm._src.maths import Config
from gnorm._src.maths import group_sum
from gnorm._src.maths import masked
from gnorm._src.maths import per_channel
from gnorm._src.maths import preactivation
from gnorm._src.maths import shard_sum
from gnorm._src.maths import view


def _forward(cfg: Config):
  """``forward``'s values by each platform's plan or the Pallas kernels."""
  if cfg.axis_name is not None:  # collectives: plain JAX, every plan traced
    return backends.forward(cfg)
  return functools.partial(primitives.forward, cfg)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def group_norm_core(x, gamma, beta, mask, cfg: Config):
  """Normalises validated input; see ``maths.py`` for the conventions."""
  return _forward(cfg)(x, gamma, beta, mask)[0]


def tangent(h: Hints, cfg: Config, x, gamma, beta, mask, count, mean, rstd,
            tx, tgamma, tbeta):
  """The tangent map of ``group_norm_core``; linear in ``(tx, tgamma, tbeta)``.

  Written with per-(sample, channel) reductions only, so that its transpose,
  the backward pass, has the same fast reduction shape as the forward pass.
  """
  v = view(x.shape, cfg.channel_axis)
  n, c, g = v.shape[0], v.channels, cfg.n_groups
  cdt = mean.dtype
  xv = x.reshape(v.shape)
  txv = tx.reshape(v.shape)
  mv = None if mask is None else v.mask(mask, x.shape)
  if count is None:  # no mask, no shards: a compile-time constant
    count = jnp.full(mean.shape, v.spatial_size * (c // g), cdt)
  safe = jnp.maximum(count, 1)
  # With xhat = xc * rstd:  d mean = mean_g(tx),  d rstd = -rstd^3 mean_g(xc tx),
  # so d xhat = rstd (tx - d mean) - xc rstd^3 mean_g(xc tx), where mean_g
  # runs over the counted elements of the group (on every shard). Tangents
  # and primal values get separate handles (``h.separate``): their transposes
  # then hand each backward pass its own copy-free cotangent operand.
  (t1,) = h.separate(txv)
  s_tx = group_sum(h.fence(v.sum_nc(masked(mv, t1.astype(cdt)))), g)
  x2, mean_c2, _ = h.separate(xv, per_channel(mean, c), rstd)
  t2, s_tx = h.separate(txv, s_tx)
  # The mask goes on the centred x, not on the product: its transpose then
  # multiplies the cotangent by 0, not by a NaN from the padding.
  s_txxc = v.sum_nc(t2.astype(cdt) * masked(mv, x2.astype(cdt) - v.bc(mean_c2)))
  s_txxc = group_sum(h.fence(s_txxc), g)
  if cfg.axis_name is not None:
    s_tx, s_txxc = shard_sum(jnp.stack([s_tx, s_txxc]), cfg)
  dmean, dvar_half = s_tx / safe, s_txxc / safe
  rstd_c = per_channel(rstd, c)
  gam = None if gamma is None else gamma.astype(cdt)
  # tz = tx * a + c0 + xc * c1 with a, c0, c1 all (N, C): every per-channel
  # term is folded into c0 and c1 so that the transpose reads x and the
  # cotangent in one reduction pass (sum ct, sum ct * xc) and one elementwise
  # pass, and dgamma / dbeta fall out of those (N, C) sums.
  a = rstd_c if gam is None else rstd_c * gam
  c0 = -per_channel(rstd * dmean, c)
  c1 = -per_channel(rstd * rstd * rstd * dvar_half, c)
  if gam is not None:
    c0, c1 = c0 * gam, c1 * gam
  if tgamma is not None:
    c1 = c1 + rstd_c * jnp.broadcast_to(tgamma.astype(cdt), (n, c))
  if tbeta is not None:
    # The fence keeps the compiler from merging sum_n(sum_s ct) into a second
    # full pass over ct: dbeta then comes from the (N, C) sums already made.
    one = h.fence(jnp.ones((n, c), cdt))
    c0 = c0 + jnp.broadcast_to(tbeta.astype(cdt), (n, c)) * one
  x3, mean_c3, a = h.separate(xv, per_channel(mean, c), a)
  t3, c0, c1 = h.separate(txv, c0, c1)
  xc3 = masked(mv, x3.astype(cdt) - v.bc(mean_c3))
  tz = t3.astype(cdt) * v.bc(a) + v.bc(c0) + xc3 * v.bc(c1)
  if cfg.activation is not None:
    # Recompute the pre-activation from x rather than keep it: the backward
    # pass then holds no full-size array but x.
    z = preactivation(h, v, xv, mv, gamma, beta, mean, rstd, tag=(rstd, mean))
    _, tz = jax.jvp(cfg.activation, (z,), (tz,))
  # Masked-out outputs are constant 0; their cotangent is dropped here,
  # before it can meet anything from the padding.
  tz = masked(mv, tz)
  # The fence sits where the transpose receives the cotangent, before its
  # conversion to the compute dtype.
  return h.fence(tz.astype(x.dtype)).reshape(x.shape)


@group_norm_core.defjvp
def _group_norm_core_jvp(cfg: Config, primals, tangents):
  x, gamma, beta, mask = primals
  tx, tgamma, tbeta, _ = tangents
  y, (count, mean, rstd) = _forward(cfg)(x, gamma, beta, mask)
  count = None if mask is None and cfg.axis_name is None else count
  tgamma = None if gamma is None else tgamma
  tbeta = None if beta is None else tbeta
  if cfg.axis_name is None:
    # A primitive whose transpose is the backward pass of each platform's
    # plan (``primitives.py``); its operands are all reverse mode keeps.
    return y, primitives.tangent(cfg, x, gamma, beta, mask, count, mean, rstd, tx, tgamma, tbeta)
  # Across devices the sums take collectives, which stay in plain JAX:
  # checkpointing the tangent map is what keeps reverse mode lean there (its
  # residuals are its inputs, not the full-size float32 values it computes).
  ty = jax.checkpoint(backends.per_platform(tangent, cfg))(
      x, gamma, None if cfg.activation is None else beta, mask, count, mean, rstd, tx,
      tgamma, tbeta)
  return y, ty
