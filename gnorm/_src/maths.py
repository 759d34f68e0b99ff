"""The Group Normalization maths: statistics and normalisation.

Everything here takes already-validated arguments (see ``validation.py``):
``x`` is a floating array whose axis 0 is the batch and whose channel axis is
``cfg.channel_axis`` (positive); ``gamma`` and ``beta`` are ``None`` or arrays
of shape ``(1, C)`` (per channel) or ``(N, C)`` (per sample and channel);
``mask`` is ``None`` or a bool array already broadcast to ``x.shape``.

Every computation works on a free reshape of ``x`` to ``(N, S, C)``
(channels-last), ``(N, C, S)`` (channels-first) or ``(N, A, C, B)`` (channel
axis in the middle), where ``S``, ``A`` and ``B`` merge the spatial axes.

The formulation:

* statistics are reductions over the spatial axes to per-(sample, channel)
  ``(N, C)`` sums, then a tiny combine per group: compilers run reductions
  that keep the channel axis whole far faster than ones over a split
  ``(G, C/G)`` axis;
* the variance is a true second pass, ``mean((x - mean)^2)``, which costs one
  more read of ``x`` but is as accurate as float32 allows;
* one elementwise pass writes ``act((x - mean) * (rstd * gamma) + beta)``.

Across devices (``axis_name``), each shard reduces its own part to a count,
a mean and a sum of squared deviations per (sample, group); one ``all_gather``
of those small arrays lets every shard combine them exactly (Chan et al.),
which keeps the two-pass accuracy with a single collective.

Functions that touch full-size arrays take a ``Hints`` first (see
``backends/``): the same maths, steered per platform. The derivative is in
``derivative.py``.
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

from gnorm._src.backends.hints import Hints


class Config(NamedTuple):
  """Static (hashable) settings of one normalisation."""

  n_groups: int
  eps: float
  channel_axis: int  # positive: axis 0 is the batch
  axis_name: Hashable | tuple[Hashable, ...] | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None


class View(NamedTuple):
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


def view(shape: tuple[int, ...], channel_axis: int) -> View:
  """The reshape of an input of ``shape`` that every computation works on."""
  # Unit axes are left out because XLA's CPU reductions are several times
  # slower over a view that keeps a trailing axis of size 1 (a free reshape
  # on every platform, so it is not a per-platform hint).
  a, b = math.prod(shape[1:channel_axis]), math.prod(shape[channel_axis + 1:])
  n, c = shape[0], shape[channel_axis]
  if b == 1:
    return View((n, a, c), 2)
  if a == 1:
    return View((n, c, b), 1)
  return View((n, a, c, b), 2)


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the statistics: at least float32, whatever the input."""
  return jnp.promote_types(dtype, jnp.float32)


def group_sum(t: jax.Array, n_groups: int) -> jax.Array:
  """``(N, C) -> (N, G)``: sums each group's contiguous run of channels."""
  n, c = t.shape
  return t.reshape(n, n_groups, c // n_groups).sum(axis=2)


def per_channel(t: jax.Array, channels: int) -> jax.Array:
  """``(N, G) -> (N, C)``: repeats each group's value over its channels."""
  n, g = t.shape
  return jnp.broadcast_to(t[:, :, None], (n, g, channels // g)).reshape(n, channels)


def masked(mask, t):
  """``t`` where ``mask`` holds, 0 elsewhere (no mask: ``t``)."""
  # where, not multiply: NaN or Inf at a masked-out position must not leak.
  return t if mask is None else jnp.where(mask, t, jnp.zeros((), t.dtype))


def moments(h: Hints, v: View, xv: jax.Array, mv: jax.Array | None, cfg: Config):
  """Per-(sample, group) count, mean and biased variance, each ``(N, G)``.

  Args:
    h: the platform's hints.
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
    count = group_sum(v.sum_nc(mv.astype(cdt)), g)
  safe = jnp.maximum(count, 1)
  (x1,) = h.separate(xv)
  s1 = h.fence(v.sum_nc(masked(mv, x1.astype(cdt))))
  mean = group_sum(s1, g) / safe
  # Two passes, not E[x^2] - E[x]^2: the one-pass formula cancels the digits
  # of the variance when |mean| >> std (pytorch#40302: randn * 0.01 + 100).
  x2, mean_c = h.separate(xv, per_channel(mean, c))
  xc = masked(mv, x2.astype(cdt) - v.bc(mean_c))
  m2 = group_sum(h.fence(v.sum_nc(xc * xc)), g)
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


def stats(h: Hints, v: View, xv, mv, cfg: Config):
  """``(count, mean, rstd)`` per (sample, group), in the compute dtype."""
  count, mean, var = moments(h, v, xv, mv, cfg)
  # var is a mean of squares, never negative; eps goes inside the square
  # root, as in the paper and the seed. An empty group (everything masked)
  # gets rstd 0, so its output is beta: finite, and independent of x.
  rstd = h.rsqrt(var + jnp.asarray(cfg.eps, var.dtype))
  if mv is not None:
    rstd = jnp.where(count > 0, rstd, jnp.zeros((), rstd.dtype))
  return count, mean, rstd


def preactivation(h: Hints, v: View, xv, gamma, beta, mean, rstd, tag=()):
  """``(x - mean) * rstd * gamma + beta`` in the compute dtype.

  ``tag``: extra operands for ``h.separate`` that make this pass's handle
  distinct when another pass starts from the same operands.
  """
  c = v.channels
  cdt = mean.dtype
  scale = per_channel(rstd, c)
  if gamma is not None:
    scale = scale * gamma.astype(cdt)
  # (x - mean) * scale + beta keeps the digits that folding everything into
  # x * scale + (beta - mean * scale) would cancel when |mean| is large.
  xq, mean_c, scale, *_ = h.separate(xv, per_channel(mean, c), scale, *tag)
  z = (xq.astype(cdt) - v.bc(mean_c)) * v.bc(scale)
  if beta is not None:
    z = z + v.bc(beta.astype(cdt))
  return z


def forward(h: Hints, cfg: Config, x, gamma, beta, mask):
  """``(y, (count, mean, rstd))``: the output in ``x``'s dtype and the stats."""
  v = view(x.shape, cfg.channel_axis)
  xv = x.reshape(v.shape)
  mv = None if mask is None else mask.reshape(v.shape)
  count, mean, rstd = stats(h, v, xv, mv, cfg)
  z = preactivation(h, v, xv, gamma, beta, mean, rstd)
  if cfg.activation is not None:
    z = cfg.activation(z)
  return z.astype(x.dtype).reshape(x.shape), (count, mean, rstd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
