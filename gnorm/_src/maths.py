"""The Group Normalization maths: statistics and normalisation.

Everything here takes already-validated arguments (see ``validation.py``):
``x`` is a floating array whose axis 0 is the batch and whose channel axis is
``cfg.channel_axis`` (positive); ``gamma`` and ``beta`` are ``None`` or arrays
of shape ``(1, C)`` (per channel) or ``(N, C)`` (per sample and channel);
``mask`` is ``None`` or a bool array of ``x``'s rank whose every axis has
``x``'s length or 1 (not broadcast: what the backward keeps stays small).

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
which keeps the two-pass accuracy with a single collective. With
``axis_index_groups`` the gather, and the derivative's sum, run within each
group of devices only.

Where XLA:CPU needs steering, the maths calls ``backends/xla_cpu.py``'s hooks
(optimization barriers on the CPU, the identity on every other platform);
CUDA and ROCm GPUs reduce the statistics by a plan of their own
(``backends/xla_gpu.py``, passed to ``forward`` as ``moments``). The
derivative's maths is in ``tangent.py``.
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

from gnorm._src.backends import xla_cpu


class Config(NamedTuple):
  """Static (hashable) settings of one normalisation."""

  n_groups: int
  eps: float
  channel_axis: int  # positive: axis 0 is the batch
  axis_name: Hashable | tuple[Hashable, ...] | None = None
  activation: Callable[[jax.Array], jax.Array] | None = None
  # "auto", "xla", "pallas" or a name of dispatch.IMPLEMENTATIONS; each
  # platform resolves "auto" and "xla" when the program is lowered.
  implementation: str = "auto"
  # With axis_name: statistics combined within these groups of indices along
  # it (as lax.psum's argument), tuples so that the Config stays hashable.
  axis_index_groups: tuple[tuple[int, ...], ...] | None = None


class View(NamedTuple):
  """How ``x`` is reshaped: the view's shape, where its channels are, and
  which axes of ``x`` each axis of the view merges."""

  shape: tuple[int, ...]
  c_pos: int
  groups: tuple[tuple[int, ...], ...]

  @property
  def axes(self) -> tuple[int, ...]:
    return tuple(a for a in range(1, len(self.shape)) if a != self.c_pos)

  @property
  def spatial_size(self) -> int:
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

  def count_nc(self, mv: jax.Array, dtype) -> jax.Array:
    """Counted elements per (sample, channel), ``(N, C)``, of a view mask.

    ``mv`` may keep unit axes where the mask broadcasts (see ``view_mask``);
    each such spatial axis multiplies the count by its length.
    """
    s = jnp.sum(mv.astype(dtype), axis=self.axes)
    s = s * math.prod(self.shape[a] for a in self.axes if mv.shape[a] == 1)
    s = s.reshape(mv.shape[0], mv.shape[self.c_pos])
    return jnp.broadcast_to(s, (self.shape[0], self.channels))

  def mask(self, m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A mask of ``x``'s rank (each axis 1 or ``x``'s) reshaped like the view.

    A view axis stays of size 1 where the mask does not vary along any of
    the axes it merges, so a ``(N, L, 1)`` mask is never made ``(N, L, C)``.
    Only axes merged with others that the mask does vary along are
    broadcast.
    """
    full = list(m.shape)
    for group in self.groups:
      if any(m.shape[a] != 1 for a in group):
        for a in group:
          full[a] = shape[a]
    m = jnp.broadcast_to(m, full)
    return m.reshape(tuple(math.prod(full[a] for a in g) for g in self.groups))


def view(shape: tuple[int, ...], channel_axis: int) -> View:
  """The reshape of an input of ``shape`` that every computation works on."""
  # Unit axes are left out because XLA's CPU reductions are several times
  # slower over a view that keeps a trailing axis of size 1 (a free reshape
  # on every platform, so it is not a per-platform hint).
  a, b = math.prod(shape[1:channel_axis]), math.prod(shape[channel_axis + 1:])
  n, c = shape[0], shape[channel_axis]
  before = tuple(range(1, channel_axis))
  after = tuple(range(channel_axis + 1, len(shape)))
  if b == 1:
    return View((n, a, c), 2, ((0,), before, (channel_axis, *after)))
  if a == 1:
    return View((n, c, b), 1, ((0,), (*before, channel_axis), after))
  return View((n, a, c, b), 2, ((0,), before, (channel_axis,), after))


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the statistics: at least float32, whatever the input (chosen,
  not promoted, so that strict dtype promotion has nothing to object to)."""
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def group_sum(t: jax.Array, n_groups: int) -> jax.Array:
  """``(N, C) -> (N, G)``: sums each group's contiguous run of channels."""
  n, c = t.shape
  return t.reshape(n, n_groups, c // n_groups).sum(axis=2)


def per_channel(t: jax.Array, channels: int) -> jax.Array:
  """``(N, G) -> (N, C)``: repeats each group's value over its channels."""
  n, g = t.shape
  return jnp.broadcast_to(t[:, :, None], (n, g, channels // g)).reshape(n, channels)


def affine_cotangent(p, per_sample: jax.Array):
  """The cotangent of an affine parameter ``p`` (``None``, ``(1, C)`` or
  ``(N, C)``; anything with its shape and dtype) from its per-(sample,
  channel) value ``(N, C)``: summed over the batch for a per-channel one."""
  if p is None:
    return None
  if p.shape[0] == 1:
    per_sample = jnp.sum(per_sample, axis=0, keepdims=True)
  return per_sample.astype(p.dtype)


def masked(mask, t):
  """``t`` where ``mask`` holds, 0 elsewhere (no mask: ``t``)."""
  # where, not multiply: NaN or Inf at a masked-out position must not leak.
  return t if mask is None else jnp.where(mask, t, jnp.zeros((), t.dtype))


def pivot(x: jax.Array, mask: jax.Array | None, cfg: Config) -> jax.Array | None:
  """With ``eps=0``: one element of each (sample, group), the sums' shift.

  Summing ``x - k`` for an element ``k`` of the group, rather than ``x``,
  makes a constant group's mean exact (every term is 0), so its variance is
  exactly 0 and, with ``eps=0``, it normalises to 0 instead of to rounding
  noise divided by rounding noise. The element is the first of the group's
  first channel; where the mask leaves it out, 0 (no shift) replaces it, so
  padding never reaches the statistics. With ``eps > 0`` there is no shift
  (``None``): ``eps`` bounds ``rstd``, and on XLA:CPU the slice would cost a
  bfloat16 forward one more read of ``x`` in XLA's cost model.

  Returns:
    ``(N, G)`` in the compute dtype, or None.
  """
  if cfg.eps > 0:
    return None
  # Sliced from x itself, not from its view: XLA:CPU's cost model counts a
  # slice of the reshaped x as a full read of x in every fusion it joins.
  step = x.shape[cfg.channel_axis] // cfg.n_groups
  at: list[int | slice] = [0] * x.ndim
  at[0], at[cfg.channel_axis] = slice(None), slice(None, None, step)
  k = x[tuple(at)].astype(compute_dtype(x.dtype))
  if mask is not None:
    if mask.shape[cfg.channel_axis] == 1:
      at[cfg.channel_axis] = slice(None)
    k = jnp.where(mask[tuple(at)], k, jnp.zeros((), k.dtype))
  return jnp.broadcast_to(k, (x.shape[0], cfg.n_groups))


def moments(cfg: Config, x: jax.Array, mask: jax.Array | None, v: View, xv: jax.Array,
            mv: jax.Array | None):
  """Per-(sample, group) count, mean and biased variance, each ``(N, G)``.

  Args:
    cfg: the settings; with ``cfg.axis_name`` the statistics cover every
      shard along that axis.
    x: the input, and ``mask`` its mask (or None), as ``forward`` got them.
    v: the view of ``x``.
    xv: ``x`` reshaped to ``v``, in its own dtype.
    mv: the mask reshaped by ``v.mask`` (True = counted), or None.

  Returns:
    ``(count, mean, var)`` in the compute dtype. A group with no counted
    element has count 0, mean 0 and variance 0; a constant group has
    variance exactly 0.
  """
  k = pivot(x, mask, cfg)
  c, g = v.channels, cfg.n_groups
  cdt = compute_dtype(xv.dtype)
  if mv is None:
    count = jnp.full((v.shape[0], g), v.spatial_size * (c // g), cdt)
  else:
    count = group_sum(v.count_nc(mv, cdt), g)
  safe = jnp.maximum(count, 1)
  if k is None:
    (x1,) = xla_cpu.pass_inputs(xv)
    s1 = xla_cpu.barrier(v.sum_nc(masked(mv, x1.astype(cdt))))
    mean = group_sum(s1, g) / safe
  else:
    x1, k_c = xla_cpu.pass_inputs(xv, per_channel(k, c))
    s1 = xla_cpu.barrier(v.sum_nc(masked(mv, x1.astype(cdt) - v.bc(k_c))))
    mean = k + group_sum(s1, g) / safe
  # Two passes, not E[x^2] - E[x]^2: the one-pass formula cancels the digits
  # of the variance when |mean| >> std (pytorch#40302: randn * 0.01 + 100).
  x2, mean_c = xla_cpu.pass_inputs(xv, per_channel(mean, c))
  xc = masked(mv, x2.astype(cdt) - v.bc(mean_c))
  m2 = group_sum(xla_cpu.barrier(v.sum_nc(xc * xc)), g)
  if cfg.axis_name is not None:
    count, mean, m2 = combine_shards(count, mean, m2, cfg.axis_name, cfg.axis_index_groups)
  return count, mean, m2 / jnp.maximum(count, 1)


def combine_shards(count, mean, m2, axis_name, axis_index_groups=None):
  """Chan et al.'s exact combine of every shard's ``(count, mean, m2)``
  (with ``axis_index_groups``: of the shards of this shard's group)."""
  # One small collective, then the pairwise formula, shifted by the mean of
  # the shard that counts most: shards with equal means (a constant group
  # split across devices) then combine to exactly that mean and m2 = 0.
  parts = lax.all_gather(jnp.stack([count, mean, m2]), axis_name,
                         axis_index_groups=axis_index_groups)
  parts = parts.reshape(-1, 3, *count.shape)
  counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
  ref = jnp.take_along_axis(means, jnp.argmax(counts, axis=0)[None], axis=0)[0]
  count = jnp.sum(counts, axis=0)
  mean = ref + jnp.sum(counts * (means - ref[None]), axis=0) / jnp.maximum(count, 1)
  dev = means - mean[None]
  return count, mean, jnp.sum(m2s, axis=0) + jnp.sum(counts * dev * dev, axis=0)


def shard_sum(t: jax.Array, cfg: Config) -> jax.Array:
  """``t`` summed over the shards of ``cfg.axis_name`` (within this shard's group)."""
  if cfg.axis_index_groups is None:
    return lax.psum(t, cfg.axis_name)
  # JAX 0.10's psum raises NotImplementedError for axis_index_groups inside
  # shard_map (with its default check_vma=True); all_gather takes them there
  # and in pmap, so the grouped sum is a gather within the group and a local
  # sum: still one collective, of the same small (N, G) operands.
  return jnp.sum(lax.all_gather(t, cfg.axis_name, axis_index_groups=cfg.axis_index_groups),
                 axis=0)


def rsqrt_or_zero(var_eps: jax.Array, rsqrt=lax.rsqrt) -> jax.Array:
  """``1 / sqrt(var_eps)`` where ``var_eps > 0``, and 0 where it is not.

  The rule for a group whose variance plus eps is 0 (eps=0 and a constant
  or single-element group) or that counts nothing: it normalises to 0, not
  to 0 * inf = NaN. The double ``where`` keeps the gradient finite there
  too. The kernels (``backends/pallas_triton.py``) apply the same rule.
  """
  return jnp.where(var_eps > 0, rsqrt(jnp.where(var_eps > 0, var_eps, 1)), 0)


def rstd_of(var: jax.Array, count: jax.Array | None, cfg: Config, rsqrt=lax.rsqrt):
  """``1 / sqrt(var + eps)``, and 0 where that is undefined (``rsqrt_or_zero``).

  var is a mean of squares, never negative; eps goes inside the square root,
  as in the paper and neupy. With a mask (``count`` given), a group that
  counts nothing gets 0 too. Decided at trace time: with eps > 0 and no mask
  no group can have var + eps = 0, and nothing is added to the program.
  """
  var_eps = var + jnp.asarray(cfg.eps, var.dtype)
  if count is not None:
    var_eps = jnp.where(count > 0, var_eps, jnp.zeros((), var_eps.dtype))
  if cfg.eps == 0 or count is not None:
    return rsqrt_or_zero(var_eps, rsqrt)
  return rsqrt(var_eps)


def preactivation(v: View, xv, mv, gamma, beta, mean, rstd, tag=()):
  """``(x - mean) * rstd * gamma + beta`` in the compute dtype.

  Masked-out positions get ``beta`` (their centred value is taken as 0), so
  nothing there, not even NaN, reaches an output or a gradient. ``tag``:
  extra operands for ``xla_cpu.pass_inputs`` that make this pass's handle distinct
  when another pass starts from the same operands.
  """
  c = v.channels
  cdt = mean.dtype
  scale = per_channel(rstd, c)
  if gamma is not None:
    scale = scale * gamma.astype(cdt)
  # (x - mean) * scale + beta keeps the digits that folding everything into
  # x * scale + (beta - mean * scale) would cancel when |mean| is large.
  xq, mean_c, scale, *_ = xla_cpu.pass_inputs(xv, per_channel(mean, c), scale, *tag)
  z = masked(mv, xq.astype(cdt) - v.bc(mean_c)) * v.bc(scale)
  if beta is not None:
    z = z + v.bc(beta.astype(cdt))
  return z


Moments = Callable[..., tuple]
"""A reduction plan: ``moments(cfg, x, mask, v, xv, mv) -> (count, mean, var)``."""


def forward(cfg: Config, x, gamma, beta, mask, *, moments: Moments = moments,
            rsqrt: Callable[[jax.Array], jax.Array] = xla_cpu.rsqrt):
  """``(y, (count, mean, rstd))``: the output in ``x``'s dtype and the stats.

  ``moments`` reduces the statistics (``backends/xla_gpu.py`` has the GPU's
  plan) and ``rsqrt`` turns their variance into ``rstd``.
  """
  v = view(x.shape, cfg.channel_axis)
  xv = x.reshape(v.shape)
  mv = None if mask is None else v.mask(mask, x.shape)
  count, mean, var = moments(cfg, x, mask, v, xv, mv)
  rstd = rstd_of(var, None if mv is None else count, cfg, rsqrt)
  z = preactivation(v, xv, mv, gamma, beta, mean, rstd)
  if cfg.activation is not None:
    z = cfg.activation(z)
  # Masked-out positions output 0, like the padding they stand for.
  z = masked(mv, z)
  return z.astype(x.dtype).reshape(x.shape), (count, mean, rstd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
