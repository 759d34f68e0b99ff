"""XLA on CUDA and ROCm GPUs: the statistics' own reduction plan.

The maths is ``maths.py``'s; what differs is how the reductions are laid out.
XLA:GPU runs a reduction of ``(N, S, C)`` over ``S`` with one thread block per
64 output columns (10 blocks for 2x64x64x320), and then finds it cheaper to
write ``x - mean`` out in float32 than to fuse it into so slow a reduction
(``benchmarks/xla_gpu_plan.py`` shows both in XLA's compiled programs). So
every reduction here has two stages: a highly parallel first one sums
*partials* of at most ``R_MAX`` consecutive elements of one channel, a small
second one combines them per (sample, group), and a barrier (an
optimization barrier on CUDA and ROCm only) keeps XLA from merging them back.

The variance is a shifted one-pass form with an exact combine, never
``E[x^2] - E[x]^2``: each partial sums ``x - k`` and ``(x - k)^2`` around its
own first element ``k``; partials combine exactly (Chan et al.). No element
of ``r`` values lies further than ``sqrt(r - 1)`` standard deviations from
their mean (Samuelson's inequality), so the variance's relative error is
bounded by about ``r * eps`` = 64 * 2^-24 whatever the data, with ``x`` read
once. With a mask the pivot may be padding: two passes (a group mean, then
shifted sums around it), still split.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gnorm._src import maths
from gnorm._src.backends.barrier import platform_barrier

# Elements per partial: at most R_MAX (the variance's error bound above); an
# axis is split only at a divisor of its length, and not into pieces smaller
# than R_MIN (partials that small would cost more than they save).
R_MAX = 64
R_MIN = 8
# Partials wanted at least, so that the first stage keeps every SM busy; for
# small tensors they then hold fewer than R_MAX elements. (Below about this
# many, XLA:GPU's cost model also stops fusing an activation's derivative
# into the backward's first stage and writes it out instead.)
MIN_PARTIALS = 1 << 16

gpu_barrier_p, barrier = platform_barrier("gnorm_gpu_barrier", ("cuda", "rocm"))


class Chunks(NamedTuple):
  """The view of ``x`` as ``(N, A1, ra, C, B1, rb)``: partials of ``ra * rb``.

  ``A = A1 * ra`` merges the spatial axes before the channels, ``B = B1 * rb``
  those after them (channels-last input has ``B = 1``, channels-first
  ``A = 1``). A partial is one ``(n, a1, c, b1)``.
  """

  shape: tuple[int, int, int, int, int, int]

  @property
  def r(self) -> int:
    """Elements per partial."""
    return self.shape[2] * self.shape[5]

  @property
  def partials(self) -> tuple[int, int, int, int]:
    n, a1, _, c, b1, _ = self.shape
    return (n, a1, c, b1)


def _inner(d: int, limit: int) -> int:
  """How much of an axis of length ``d`` goes into one partial."""
  if d <= limit:
    return d
  k = max(k for k in range(1, limit + 1) if d % k == 0)
  return k if k >= min(R_MIN, limit) else d


def chunks(v: maths.View) -> Chunks:
  """The partials of a view: as many as it takes to keep each within R_MAX."""
  n, c = v.shape[0], v.channels
  if len(v.shape) == 4:
    a, b = v.shape[1], v.shape[3]
  elif v.c_pos == 2:
    a, b = v.shape[1], 1
  else:
    a, b = 1, v.shape[2]
  limit = max(R_MIN, min(R_MAX, math.prod(v.shape) // MIN_PARTIALS))
  rb = _inner(b, limit)
  ra = _inner(a, max(1, limit // rb))
  return Chunks((n, a // ra, ra, c, b // rb, rb))


def as_chunks(t: jax.Array, v: maths.View, ch: Chunks) -> jax.Array:
  """An array of the view's rank (each axis the view's length or 1, as
  ``View.mask`` makes them) reshaped like ``ch``, unit axes kept."""
  if len(v.shape) == 3:
    t = t[..., None] if v.c_pos == 2 else t[:, None]
  n, a, c, b = t.shape
  _, a1, ra, _, b1, rb = ch.shape
  return t.reshape(n, *((a1, ra) if a > 1 else (1, 1)), c, *((b1, rb) if b > 1 else (1, 1)))


def bc(t: jax.Array) -> jax.Array:
  """``(N, C)`` or ``(1, C)`` -> broadcastable against a ``Chunks`` array."""
  return t[:, None, None, :, None, None]


def _add(a, b):
  return tuple(u + w for u, w in zip(a, b, strict=True))


def sums(*terms: jax.Array, axes: tuple[int, ...] = (2, 5)) -> tuple[jax.Array, ...]:
  """Sums of several same-shape terms as ONE reduction (a variadic reduce):
  XLA then fuses their shared elementwise producer instead of writing it out."""
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  return tuple(lax.reduce(terms, zeros, _add, axes))


def _per_channel_sums(*partials: jax.Array) -> tuple[jax.Array, ...]:
  """Partials ``(N, A1, C, B1)`` -> sums ``(N, C)``: a column reduction with
  one output per (sample, channel), which XLA:GPU runs as a parallel tree."""
  return sums(*partials, axes=(1, 3))


def _group_moments(count_c, mean_c, m2_c, g: int):
  """Channels' ``(count, mean, m2)`` ``(N, C)`` -> the groups' ``(N, G)``.

  Exact (Chan et al.'s combine, in two passes over the group's few
  channels), and shifted by each group's first channel so that a constant
  group comes out exactly: its mean is its value and its m2 is 0.
  """
  c = mean_c.shape[1]
  ref = _first_of_groups(mean_c, g)
  count = maths.group_sum(count_c, g)
  safe = jnp.maximum(count, 1)
  mean = ref + maths.group_sum(count_c * (mean_c - maths.per_channel(ref, c)), g) / safe
  dev = mean_c - maths.per_channel(mean, c)
  return count, mean, maths.group_sum(m2_c + count_c * dev * dev, g)


def _first_of_groups(t: jax.Array, g: int) -> jax.Array:
  """``(N|1, C)`` -> ``(N|1, G)``: each group's first channel."""
  return t[:, :: t.shape[1] // g]


def moments(cfg: maths.Config, x: jax.Array, mask: jax.Array | None, v: maths.View,
            xv: jax.Array, mv: jax.Array | None):
  """``maths.Moments`` for the GPU: ``(count, mean, var)`` per (sample, group).

  Same contract as ``maths.moments`` (exact zero variance for a constant
  group, an empty masked group has count, mean and variance 0, shards
  combined over ``cfg.axis_name``), with the reductions of this module.
  """
  del x, mask  # read through their views
  ch = chunks(v)
  g = cfg.n_groups
  cdt = maths.compute_dtype(xv.dtype)
  x6 = xv.reshape(ch.shape)
  if mv is None:
    count, mean, m2 = _pivoted(x6, ch, g, cdt)
  else:
    count, mean, m2 = _masked(x6, as_chunks(mv, v, ch), g, cdt)
  if cfg.axis_name is not None:
    count, mean, m2 = maths.combine_shards(count, mean, m2, cfg.axis_name,
                                           cfg.axis_index_groups)
  return count, mean, m2 / jnp.maximum(count, 1)


def _pivoted(x6, ch: Chunks, g: int, cdt):
  """No mask: one read of ``x``, each partial shifted by its first element.

  Partials combine per channel around the channel's first partial (partial
  means spread by about std / sqrt(r), so the shifted sums of their
  deviations keep their digits), then per group (``_group_moments``).
  """
  k = x6[:, :, :1, :, :, :1].astype(cdt)
  d = x6.astype(cdt) - k
  s1, s2 = barrier(sums(d, d * d))
  r = ch.r
  mean_p = k[:, :, 0, :, :, 0] + s1 / r
  m2_p = jnp.maximum(s2 - s1 * (s1 / r), 0)
  ref = mean_p[:, :1, :, :1]
  e = mean_p - ref
  e1, e2, m2_in = _per_channel_sums(e, e * e, m2_p)
  n, a1, c, b1 = mean_p.shape
  npart = a1 * b1
  mean_c = ref[:, 0, :, 0] + e1 / npart
  m2_c = m2_in + r * jnp.maximum(e2 - e1 * (e1 / npart), 0)
  return _group_moments(jnp.full((n, c), npart * r, cdt), mean_c, m2_c, g)


def _masked(x6, m6, g: int, cdt):
  """With a mask: a shifted mean, then sums of deviations from it.

  The first pass is shifted by each group's first element where that counts
  (0 otherwise), so a constant group's mean is exact; the second pass's
  ``sum(x - mean)`` corrects the mean's own rounding (the corrected two-pass
  form), which also makes a constant group's variance exactly 0.
  """
  n, c = x6.shape[0], x6.shape[3]
  first = jnp.where(m6[:, 0, 0, :, 0, 0], x6[:, 0, 0, :, 0, 0].astype(cdt), 0)
  k = _first_of_groups(jnp.broadcast_to(first, (n, c)), g)
  ones = jnp.broadcast_to(m6, x6.shape).astype(cdt)
  d = maths.masked(m6, x6.astype(cdt) - bc(maths.per_channel(k, c)))
  count_c, s_c = _per_channel_sums(*barrier(sums(ones, d)))
  count = maths.group_sum(count_c, g)
  safe = jnp.maximum(count, 1)
  mean = k + maths.group_sum(s_c, g) / safe
  e = maths.masked(m6, x6.astype(cdt) - bc(maths.per_channel(mean, c)))
  q1, q2 = (maths.group_sum(q, g) for q in _per_channel_sums(*barrier(sums(e, e * e))))
  return count, mean + q1 / safe, jnp.maximum(q2 - q1 * (q1 / safe), 0)


def forward(cfg: maths.Config, x, gamma, beta, mask):
  """``maths.forward`` with this module's statistics."""
  return maths.forward(cfg, x, gamma, beta, mask, moments=moments, rsqrt=lax.rsqrt)
