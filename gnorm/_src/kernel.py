"""The Group Normalization maths: statistics, normalisation and its derivative.

Everything here takes already-validated arguments (see ``validation.py``):
``x`` is a floating array whose axis 0 is the batch and whose channel axis is
``cfg.channel_axis`` (positive); ``gamma`` and ``beta`` are ``None`` or arrays
of shape ``(C,)``.

Every computation works on a free reshape of ``x`` to ``(N, S, C)``
(channels-last), ``(N, C, S)`` (channels-first) or ``(N, A, C, B)`` (channel
axis in the middle), where ``S``, ``A`` and ``B`` merge the spatial axes.

Layout of the computation, chosen for speed with XLA:

* statistics are reductions over the spatial axes to per-(sample, channel)
  ``(N, C)`` sums, then a tiny combine per group: XLA runs reductions that keep
  the channel axis whole far faster than ones over a split ``(G, C/G)`` axis;
* the variance is a true second pass, ``mean((x - mean)^2)``, which costs one
  more read of ``x`` but is as accurate as float32 allows;
* one elementwise pass writes ``(x - mean) * (rstd * gamma) + beta``.

The derivative is a ``jax.custom_jvp`` whose tangent map is wrapped in
``jax.checkpoint``: reverse mode (linearise, then transpose) keeps only ``x``
and the per-(N, G) statistics alive and recomputes ``x - mean`` in the backward
pass, while forward mode and higher orders keep working because the rule is
ordinary differentiable JAX code.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Config(NamedTuple):
  """Static (hashable) settings of one normalisation."""

  n_groups: int
  eps: float
  channel_axis: int  # positive: axis 0 is the batch


class _View(NamedTuple):
  """How ``x`` is reshaped: the view's shape and where its channels are."""

  shape: tuple[int, ...]
  c_pos: int

  @property
  def axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(1, len(self.shape)) if a != self.c_pos)

  @property
  def count(self) -> int:
    """Elements per (sample, channel)."""
    return math.prod(self.shape[a] for a in self.axes)

  def bc(self, t: jax.Array) -> jax.Array:
    """``(N, C)`` or ``(1, C)`` -> broadcastable against the view."""
    shape = [1] * len(self.shape)
    shape[0], shape[self.c_pos] = t.shape
    return t.reshape(shape)

  def sum_nc(self, t: jax.Array) -> jax.Array:
    """Sums a view-shaped array over its spatial axes, giving ``(N, C)``."""
    s = jnp.sum(t, axis=self.axes)
    return s.reshape(self.shape[0], self.shape[self.c_pos])


def _view(shape: tuple[int, ...], channel_axis: int) -> _View:
  # Unit axes are left out because XLA's CPU reductions are several times
  # slower over a view that keeps a trailing axis of size 1.
  a, b = math.prod(shape[1:channel_axis]), math.prod(shape[channel_axis + 1:])
  n, c = shape[0], shape[channel_axis]
  if b == 1:
    return _View((n, a, c), 2)
  if a == 1:
    return _View((n, c, b), 1)
  return _View((n, a, c, b), 2)


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the statistics: at least float32, whatever the input."""
  return jnp.promote_types(dtype, jnp.float32)


def _group_sum(t: jax.Array, n_groups: int) -> jax.Array:
  """``(N, C) -> (N, G)``: sums each group's contiguous run of channels."""
  n, c = t.shape
  return t.reshape(n, n_groups, c // n_groups).sum(axis=2)


def _per_channel(t: jax.Array, channels: int) -> jax.Array:
  """``(N, G) -> (N, C)``: repeats each group's value over its channels."""
  n, g = t.shape
  return jnp.broadcast_to(t[:, :, None], (n, g, channels // g)).reshape(n, channels)


def _group_mean(v: _View, t: jax.Array, n_groups: int) -> jax.Array:
  """Mean over each (sample, group) of a view-shaped array, as ``(N, G)``."""
  c = v.shape[v.c_pos]
  return _group_sum(v.sum_nc(t), n_groups) / (v.count * (c // n_groups))


def moments(v: _View, xv: jax.Array, n_groups: int) -> tuple[jax.Array, jax.Array]:
  """Per-(sample, group) mean and biased variance, both ``(N, G)``.

  ``xv`` is ``x`` reshaped to ``v`` and already in the compute dtype.
  """
  c = v.shape[v.c_pos]
  mean = _group_mean(v, xv, n_groups)
  # Two passes, not E[x^2] - E[x]^2: the one-pass formula cancels the digits
  # of the variance when |mean| >> std (pytorch#40302: randn * 0.01 + 100).
  xc = xv - v.bc(_per_channel(mean, c))
  return mean, _group_mean(v, xc * xc, n_groups)


def _stats(v: _View, xv: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
  mean, var = moments(v, xv.astype(compute_dtype(xv.dtype)), cfg.n_groups)
  # var is a mean of squares, never negative; eps goes inside the square
  # root, as in the paper and the seed.
  return mean, lax.rsqrt(var + jnp.asarray(cfg.eps, var.dtype))


def _normalize(v: _View, xv, gamma, beta, mean, rstd):
  c = v.shape[v.c_pos]
  cdt = mean.dtype
  scale = _per_channel(rstd, c)
  if gamma is not None:
    scale = scale * gamma.astype(cdt)[None, :]
  # (x - mean) * scale + beta keeps the digits that folding everything into
  # x * scale + (beta - mean * scale) would cancel when |mean| is large.
  y = (xv.astype(cdt) - v.bc(_per_channel(mean, c))) * v.bc(scale)
  if beta is not None:
    y = y + v.bc(beta.astype(cdt)[None, :])
  return y.astype(xv.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def group_norm_core(x, gamma, beta, cfg: Config):
  """Normalises validated input; see the module docstring."""
  v = _view(x.shape, cfg.channel_axis)
  xv = x.reshape(v.shape)
  mean, rstd = _stats(v, xv, cfg)
  return _normalize(v, xv, gamma, beta, mean, rstd).reshape(x.shape)


def _tangent(cfg: Config, x, gamma, mean, rstd, tx, tgamma, tbeta):
  """The tangent map of ``group_norm_core``; linear in ``(tx, tgamma, tbeta)``.

  Written with per-(sample, channel) reductions only, so that its transpose,
  the backward pass, has the same fast reduction shape as the forward pass.
  """
  v = _view(x.shape, cfg.channel_axis)
  c, g = v.shape[v.c_pos], cfg.n_groups
  cdt = mean.dtype
  xc = x.reshape(v.shape).astype(cdt) - v.bc(_per_channel(mean, c))
  txf = tx.reshape(v.shape).astype(cdt)
  # With xhat = xc * rstd:  d mean = mean_g(tx),  d rstd = -rstd^3 mean_g(xc tx),
  # so d xhat = rstd (tx - d mean) - xc rstd^3 mean_g(xc tx).
  dmean = _group_mean(v, txf, g)
  dvar_half = _group_mean(v, txf * xc, g)
  n = v.shape[0]
  rstd_c = _per_channel(rstd, c)
  gam = gamma.astype(cdt)[None, :] if gamma is not None else None
  # ty = tx * a + c0 + xc * c1 with a, c0, c1 all (N, C): every per-channel
  # term is folded into c0 and c1 so that the transpose reads x and the
  # cotangent in one reduction pass (sum ct, sum ct * xc) and one elementwise
  # pass, and dgamma / dbeta fall out of those (N, C) sums.
  a = rstd_c if gam is None else rstd_c * gam
  c0 = -_per_channel(rstd * dmean, c)
  c1 = -_per_channel(rstd * rstd * rstd * dvar_half, c)
  if gam is not None:
    c0, c1 = c0 * gam, c1 * gam
  if tgamma is not None:
    c1 = c1 + rstd_c * jnp.broadcast_to(tgamma.astype(cdt)[None, :], (n, c))
  if tbeta is not None:
    # The barrier keeps XLA from merging sum_n(sum_s ct) into a second full
    # pass over ct: dbeta then comes from the (N, C) sums already computed.
    one = lax.optimization_barrier(jnp.ones((n, c), cdt))
    c0 = c0 + jnp.broadcast_to(tbeta.astype(cdt)[None, :], (n, c)) * one
  ty = txf * v.bc(a) + v.bc(c0) + xc * v.bc(c1)
  return ty.astype(x.dtype).reshape(x.shape)


@group_norm_core.defjvp
def _group_norm_core_jvp(cfg: Config, primals, tangents):
  x, gamma, beta = primals
  tx, tgamma, tbeta = tangents
  v = _view(x.shape, cfg.channel_axis)
  xv = x.reshape(v.shape)
  mean, rstd = _stats(v, xv, cfg)
  y = _normalize(v, xv, gamma, beta, mean, rstd).reshape(x.shape)
  # Checkpointing the tangent map is what keeps reverse mode lean: its
  # residuals are its inputs (x and the (N, G) statistics), not the
  # full-size float32 intermediates it computes.
  ty = jax.checkpoint(functools.partial(_tangent, cfg))(
      x, gamma, mean, rstd, tx,
      None if gamma is None else tgamma,
      None if beta is None else tbeta)
  return y, ty
