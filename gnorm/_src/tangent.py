"""The derivative's maths: the tangent map of ``maths.forward`` and its transpose.

``tangent`` is linear in ``(tx, tgamma, tbeta)`` and written with
per-(sample, channel) reductions only, so that its transpose, the backward
pass, has the forward's fast reduction shape; ``cotangent`` is JAX's
transpose of it. Both read only ``x``, the affine parameters, the mask and
the per-(sample, group) statistics: nothing full-size of the forward pass is
kept. The conventions are ``maths.py``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gnorm._src import maths
from gnorm._src.backends import xla_cpu


def tangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, tx, tgamma, tbeta):
  """The output's tangent for tangents ``(tx, tgamma, tbeta)`` (``None``: zero).

  ``count`` is ``None`` when it is the constant group size (no mask, no
  shards); ``beta`` is read only by the activation's derivative.
  """
  v = maths.view(x.shape, cfg.channel_axis)
  n, c, g = v.shape[0], v.channels, cfg.n_groups
  cdt = mean.dtype
  xv = x.reshape(v.shape)
  txv = tx.reshape(v.shape)
  mv = None if mask is None else v.mask(mask, x.shape)
  if count is None:  # a compile-time constant
    count = jnp.full(mean.shape, v.spatial_size * (c // g), cdt)
  safe = jnp.maximum(count, 1)
  # With xhat = xc * rstd:  d mean = mean_g(tx),  d rstd = -rstd^3 mean_g(xc tx),
  # so d xhat = rstd (tx - d mean) - xc rstd^3 mean_g(xc tx), where mean_g
  # runs over the counted elements of the group (on every shard). Tangents
  # and primal values get separate handles: their transposes then hand each
  # backward pass its own copy-free cotangent operand.
  (t1,) = xla_cpu.pass_inputs(txv)
  s_tx = maths.group_sum(xla_cpu.barrier(v.sum_nc(maths.masked(mv, t1.astype(cdt)))), g)
  x2, mean_c2, _ = xla_cpu.pass_inputs(xv, maths.per_channel(mean, c), rstd)
  t2, s_tx = xla_cpu.pass_inputs(txv, s_tx)
  # The mask goes on the centred x, not on the product: its transpose then
  # multiplies the cotangent by 0, not by a NaN from the padding.
  xc2 = maths.masked(mv, x2.astype(cdt) - v.bc(mean_c2))
  s_txxc = maths.group_sum(xla_cpu.barrier(v.sum_nc(t2.astype(cdt) * xc2)), g)
  if cfg.axis_name is not None:
    s_tx, s_txxc = maths.shard_sum(jnp.stack([s_tx, s_txxc]), cfg)
  dmean, dvar_half = s_tx / safe, s_txxc / safe
  rstd_c = maths.per_channel(rstd, c)
  gam = None if gamma is None else gamma.astype(cdt)
  # tz = tx * a + c0 + xc * c1 with a, c0, c1 all (N, C): every per-channel
  # term is folded into c0 and c1 so that the transpose reads x and the
  # cotangent in one reduction pass and one elementwise pass, and dgamma and
  # dbeta fall out of those (N, C) sums.
  a = rstd_c if gam is None else rstd_c * gam
  c0 = -maths.per_channel(rstd * dmean, c)
  c1 = -maths.per_channel(rstd * rstd * rstd * dvar_half, c)
  if gam is not None:
    c0, c1 = c0 * gam, c1 * gam
  if tgamma is not None:
    c1 = c1 + rstd_c * jnp.broadcast_to(tgamma.astype(cdt), (n, c))
  if tbeta is not None:
    # The barrier keeps the compiler from merging sum_n(sum_s ct) into a second
    # full pass over ct: dbeta then comes from the (N, C) sums already made.
    one = xla_cpu.barrier(jnp.ones((n, c), cdt))
    c0 = c0 + jnp.broadcast_to(tbeta.astype(cdt), (n, c)) * one
  x3, mean_c3, a = xla_cpu.pass_inputs(xv, maths.per_channel(mean, c), a)
  t3, c0, c1 = xla_cpu.pass_inputs(txv, c0, c1)
  xc3 = maths.masked(mv, x3.astype(cdt) - v.bc(mean_c3))
  tz = t3.astype(cdt) * v.bc(a) + v.bc(c0) + xc3 * v.bc(c1)
  if cfg.activation is not None:
    # The pre-activation is recomputed from x rather than kept.
    z = maths.preactivation(v, xv, mv, gamma, beta, mean, rstd, tag=(rstd, mean))
    _, tz = jax.jvp(cfg.activation, (z,), (tz,))
  # Masked-out outputs are constant 0: their cotangent is dropped here,
  # before it can meet anything from the padding.
  tz = maths.masked(mv, tz)
  # Where the transpose receives the cotangent, before its conversion.
  return xla_cpu.barrier(tz.astype(x.dtype)).reshape(x.shape)


def cotangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, ct):
  """``(dx, dgamma, dbeta)`` for the output's cotangent ``ct``: ``tangent``
  transposed by JAX (``None`` for an absent parameter)."""
  # The primals' full types (varying manual axes too), as JAX checks the
  # cotangents against them.
  params = [p for p in (gamma, beta) if p is not None]
  avals = [jax.typeof(x)] + [jax.typeof(p) for p in params]

  def linear(tx, *tparams):
    it = iter(tparams)
    tgamma = None if gamma is None else next(it)
    tbeta = None if beta is None else next(it)
    return tangent(cfg, x, gamma, beta if cfg.activation is not None else None, mask, count,
                   mean, rstd, tx, tgamma, tbeta)

  # jax.checkpoint: its barriers keep the backward's recomputations of
  # x - mean apart, which is the program XLA:CPU is fastest with.
  dx, *dparams = jax.linear_transpose(jax.checkpoint(linear), *avals)(ct)
  it = iter(dparams)
  return dx, None if gamma is None else next(it), None if beta is None else next(it)
