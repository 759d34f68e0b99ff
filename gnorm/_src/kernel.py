"""The Group Normalization maths: statistics, normalisation and its derivative.

Everything here takes already-validated arguments (see ``validation.py``):
``x`` is a floating array whose axis 0 is the batch and whose channel axis is
``cfg.channel_axis`` (positive); ``gamma`` and ``beta`` are ``None`` or arrays
of shape ``(1, C)`` (per channel) or ``(N, C)`` (per sample and channel);
``mask`` is ``None`` or a bool array already broadcast to ``x.shape``.

Every computation works on a free reshape of ``x`` to ``(N, S, C)``
(channels-last), ``(N, C, S)`` (channels-first) or ``(N, A, C, B)`` (channel
axis in the middle), where ``S``, ``A`` and ``B`` merge the spatial axes.

Layout of the computation, chosen for speed with XLA:

* statistics are reductions over the spatial axes to per-(sample, channel)
  ``(N, C)`` sums, then a tiny combine per group: XLA runs reductions that keep
  the channel axis whole far faster than ones over a split ``(G, C/G)`` axis;
* the variance is a true second pass, ``mean((x - mean)^2)``, which costs one
  more read of ``x`` but is as accurate as float32 allows;
* one elementwise pass writes ``act((x - mean) * (rstd * gamma) + beta)``.

Across devices (``axis_name``), each shard reduces its own part to a count,
a mean and a sum of squared deviations per (sample, group); one ``all_gather``
of those small arrays lets every shard combine them exactly (Chan et al.),
which keeps the two-pass accuracy with a single collective.

The derivative is a ``jax.custom_jvp`` whose tangent map is wrapped in
``jax.checkpoint``: reverse mode (linearise, then transpose) keeps only ``x``
and the per-(N, G) statistics alive and recomputes ``x - mean`` (and the
pre-activation) in the backward pass, while forward mode and higher orders keep
working because the rule is ordinary differentiable JAX code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Config(NamedTuple):
  """Static (hashable) settings of one normalisation."""

  n_groups: int
  eps: float
  channel_axis: int  # positive: axis 0 is the batch
  axis_name: Hashable | tuple[Hashable, ...] | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None


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

  @property
  def channels(self) -> int:
    return self.shape[self.c_pos]

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


def _own(*arrays):
  """Gives one full-size consumer its own handle on its operands (no copy).

  XLA's CPU backend runs each reduction as a library kernel that can fuse
  the elementwise prologue of its own input (a dtype convert, ``x - mean``)
  but not share it: when common-subexpression elimination merges the same
  prologue feeding several passes, XLA writes it out as a full-size float32
  temporary instead. An ``optimization_barrier`` over a tuple that is
  distinct for each consumer keeps the prologues apart, so every pass
  re-reads ``x`` itself. The barrier copies nothing.
  """
  return lax.optimization_barrier(arrays)


def _masked(mask, t):
  # where, not multiply: NaN or Inf at a masked-out position must not leak.
  return t if mask is None else jnp.where(mask, t, jnp.zeros((), t.dtype))


def moments(v: _View, xv: jax.Array, mv: jax.Array | None, cfg: Config):
  """Per-(sample, group) count, mean and biased variance, each ``(N, G)``.

  Args:
    v: the view of ``x``.
    xv: ``x`` reshaped to ``v``, in its own dtype.
    mv: the mask reshaped to ``v`` (True = counted), or None.
    cfg: the settings; with ``cfg.axis_name`` the statistics cover every
      shard along that axis.

  Returns:
    ``(count, mean, var)`` in the compute dtype. A group with no counted
    element has count 0, mean 0 and variance 0.
  """
  c, g = v.channels, cfg.n_groups
  cdt = compute_dtype(xv.dtype)
  if mv is None:
    count = jnp.full((v.shape[0], g), v.count * (c // g), cdt)
  else:
    count = _group_sum(v.sum_nc(mv.astype(cdt)), g)
  safe = jnp.maximum(count, 1)
  (x1,) = _own(xv)
  # The barrier on the (N, C) sums keeps XLA from rewriting the small group
  # combine that follows into further full-size passes.
  s1 = lax.optimization_barrier(v.sum_nc(_masked(mv, x1.astype(cdt))))
  mean = _group_sum(s1, g) / safe
  # Two passes, not E[x^2] - E[x]^2: the one-pass formula cancels the digits
  # of the variance when |mean| >> std (pytorch#40302: randn * 0.01 + 100).
  x2, mean_c = _own(xv, _per_channel(mean, c))
  xc = _masked(mv, x2.astype(cdt) - v.bc(mean_c))
  m2 = _group_sum(lax.optimization_barrier(v.sum_nc(xc * xc)), g)
  if cfg.axis_name is not None:
    # One small collective; then Chan et al.'s exact pairwise combine.
    parts = lax.all_gather(jnp.stack([count, mean, m2]), cfg.axis_name)
    parts = parts.reshape(-1, 3, *count.shape)
    counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
    count = jnp.sum(counts, axis=0)
    safe = jnp.maximum(count, 1)
    mean = jnp.sum(counts * means, axis=0) / safe
    dev = means - mean[None]
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * dev * dev, axis=0)
  return count, mean, m2 / safe


def _rsqrt(t: jax.Array) -> jax.Array:
  """``lax.rsqrt`` of a small ``(N, G)`` array, on a flat copy.

  XLA:CPU (jax 0.10) takes 150-200 ms longer to compile an ``rsqrt`` fused
  over some 2-D shapes, such as (8, 32), than over the same elements in one
  dimension; barriers keep the flat shape from being folded back. They copy
  nothing, and the values are identical.
  """
  flat = lax.optimization_barrier(t.reshape(-1))
  return lax.optimization_barrier(lax.rsqrt(flat)).reshape(t.shape)


def _stats(v: _View, xv, mv, cfg: Config):
  """``(count, mean, rstd)`` per (sample, group), in the compute dtype."""
  count, mean, var = moments(v, xv, mv, cfg)
  # var is a mean of squares, never negative; eps goes inside the square
  # root, as in the paper and the seed. An empty group (everything masked)
  # gets rstd 0, so its output is beta: finite, and independent of x.
  rstd = _rsqrt(var + jnp.asarray(cfg.eps, var.dtype))
  if mv is not None:
    rstd = jnp.where(count > 0, rstd, jnp.zeros((), rstd.dtype))
  return count, mean, rstd


def _preactivation(v: _View, xv, gamma, beta, mean, rstd, tag=()):
  """``(x - mean) * rstd * gamma + beta`` in the compute dtype."""
  c = v.channels
  cdt = mean.dtype
  scale = _per_channel(rstd, c)
  if gamma is not None:
    scale = scale * gamma.astype(cdt)
  # (x - mean) * scale + beta keeps the digits that folding everything into
  # x * scale + (beta - mean * scale) would cancel when |mean| is large.
  # ``tag`` makes the barrier tuple unique when another pass uses the same
  # operands (see _own).
  xq, mean_c, scale, *_ = _own(xv, _per_channel(mean, c), scale, *tag)
  z = (xq.astype(cdt) - v.bc(mean_c)) * v.bc(scale)
  if beta is not None:
    z = z + v.bc(beta.astype(cdt))
  return z


def _forward(x, gamma, beta, mask, cfg: Config):
  v = _view(x.shape, cfg.channel_axis)
  xv = x.reshape(v.shape)
  mv = None if mask is None else mask.reshape(v.shape)
  count, mean, rstd = _stats(v, xv, mv, cfg)
  z = _preactivation(v, xv, gamma, beta, mean, rstd)
  if cfg.activation is not None:
    z = cfg.activation(z)
  return z.astype(x.dtype).reshape(x.shape), (count, mean, rstd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def group_norm_core(x, gamma, beta, mask, cfg: Config):
  """Normalises validated input; see the module docstring."""
  return _forward(x, gamma, beta, mask, cfg)[0]


def _tangent(cfg: Config, x, gamma, beta, mask, count, mean, rstd,
             tx, tgamma, tbeta):
  """The tangent map of ``group_norm_core``; linear in ``(tx, tgamma, tbeta)``.

  Written with per-(sample, channel) reductions only, so that its transpose,
  the backward pass, has the same fast reduction shape as the forward pass.
  """
  v = _view(x.shape, cfg.channel_axis)
  n, c, g = v.shape[0], v.channels, cfg.n_groups
  cdt = mean.dtype
  xv = x.reshape(v.shape)
  txv = tx.reshape(v.shape)
  mv = None if mask is None else mask.reshape(v.shape)
  if count is None:  # no mask, no shards: a compile-time constant
    count = jnp.full(mean.shape, v.count * (c // g), cdt)
  safe = jnp.maximum(count, 1)
  # With xhat = xc * rstd:  d mean = mean_g(tx),  d rstd = -rstd^3 mean_g(xc tx),
  # so d xhat = rstd (tx - d mean) - xc rstd^3 mean_g(xc tx), where mean_g
  # runs over the counted elements of the group (on every shard). Tangents
  # and primal values get separate barriers (see _own): their transposes
  # then hand each backward pass its own copy-free cotangent operand.
  (t1,) = _own(txv)
  s_tx = lax.optimization_barrier(v.sum_nc(_masked(mv, t1.astype(cdt))))
  s_tx = _group_sum(s_tx, g)
  x2, mean_c2, _ = _own(xv, _per_channel(mean, c), rstd)
  t2, s_tx = _own(txv, s_tx)
  s_txxc = v.sum_nc(_masked(mv, t2.astype(cdt) * (x2.astype(cdt) - v.bc(mean_c2))))
  s_txxc = _group_sum(lax.optimization_barrier(s_txxc), g)
  if cfg.axis_name is not None:
    s_tx, s_txxc = lax.psum(jnp.stack([s_tx, s_txxc]), cfg.axis_name)
  dmean, dvar_half = s_tx / safe, s_txxc / safe
  rstd_c = _per_channel(rstd, c)
  gam = None if gamma is None else gamma.astype(cdt)
  # tz = tx * a + c0 + xc * c1 with a, c0, c1 all (N, C): every per-channel
  # term is folded into c0 and c1 so that the transpose reads x and the
  # cotangent in one reduction pass (sum ct, sum ct * xc) and one elementwise
  # pass, and dgamma / dbeta fall out of those (N, C) sums.
  a = rstd_c if gam is None else rstd_c * gam
  c0 = -_per_channel(rstd * dmean, c)
  c1 = -_per_channel(rstd * rstd * rstd * dvar_half, c)
  if gam is not None:
    c0, c1 = c0 * gam, c1 * gam
  if tgamma is not None:
    c1 = c1 + rstd_c * jnp.broadcast_to(tgamma.astype(cdt), (n, c))
  if tbeta is not None:
    # The barrier keeps XLA from merging sum_n(sum_s ct) into a second full
    # pass over ct: dbeta then comes from the (N, C) sums already computed.
    one = lax.optimization_barrier(jnp.ones((n, c), cdt))
    c0 = c0 + jnp.broadcast_to(tbeta.astype(cdt), (n, c)) * one
  x3, mean_c3, a = _own(xv, _per_channel(mean, c), a)
  t3, c0, c1 = _own(txv, c0, c1)
  tz = t3.astype(cdt) * v.bc(a) + v.bc(c0) + (x3.astype(cdt) - v.bc(mean_c3)) * v.bc(c1)
  if cfg.activation is not None:
    # Recompute the pre-activation from x rather than keep it: the backward
    # pass then holds no full-size array but x.
    z = _preactivation(v, xv, gamma, beta, mean, rstd, tag=(rstd, mean))
    _, tz = jax.jvp(cfg.activation, (z,), (tz,))
  # The barrier sits where the transpose receives the cotangent, before its
  # conversion to the compute dtype: XLA then converts a half-precision
  # cotangent once instead of writing one float32 copy per backward pass.
  return lax.optimization_barrier(tz.astype(x.dtype)).reshape(x.shape)


@group_norm_core.defjvp
def _group_norm_core_jvp(cfg: Config, primals, tangents):
  x, gamma, beta, mask = primals
  tx, tgamma, tbeta, _ = tangents
  y, (count, mean, rstd) = _forward(x, gamma, beta, mask, cfg)
  # Checkpointing the tangent map is what keeps reverse mode lean: its
  # residuals are its inputs (x, the (N, G) statistics and the small affine
  # parameters), not the full-size float32 intermediates it computes.
  ty = jax.checkpoint(functools.partial(_tangent, cfg))(
      x, gamma, None if cfg.activation is None else beta, mask,
      None if mask is None and cfg.axis_name is None else count, mean, rstd, tx,
      None if gamma is None else tgamma,
      None if beta is None else tbeta)
  return y, ty


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

