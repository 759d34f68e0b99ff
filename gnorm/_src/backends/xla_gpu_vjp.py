"""XLA on CUDA and ROCm GPUs: the cotangent map (the backward pass) in closed form.

XLA:GPU compiles JAX's transpose of the tangent map (``tangent.py``, what the
CPU runs) into many kernels, with the float32 ``x - mean`` and ``dy * xhat``
written out at full size. Here the backward is written out directly, with
``xla_gpu.py``'s split reductions:

1. one reduction reads ``x`` and the cotangent ``dy`` once and sums, per
   partial, ``dz`` and ``dz * (x - mean)``, where ``dz`` is ``dy`` through
   the activation's derivative at the pre-activation ``z`` (recomputed from
   ``x``: nothing of the forward pass is kept but ``x`` and the statistics);
2. small reductions finish those sums per (sample, channel): ``dbeta`` and
   ``dgamma`` are their sums over the batch, and per (sample, group)
   ``a1 = sum(gamma dz)``, ``a2 = sum(gamma dz (x - mean))``;
3. one elementwise pass reads ``x`` and ``dy`` again and writes
   ``dx = rstd (gamma dz - a1 / n - (x - mean) rstd^2 a2 / n)``.

Each pass over ``x`` starts from a handle of its own (``xla_gpu.barrier`` over
a tuple no other pass shares), so XLA recomputes ``dz`` where it is needed
instead of writing it out in float32 for the others to read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gnorm._src import maths
from gnorm._src.backends import xla_gpu


def cotangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, ct):
  """``(dx, dgamma, dbeta)`` of ``maths.forward``'s output for cotangent ``ct``.

  The contract of ``tangent.cotangent``, for the statistics of one device
  (``cfg.axis_name`` None): ``dgamma`` and ``dbeta`` in the shape and dtype
  of ``gamma`` and ``beta``, ``None`` where those are.
  """
  v = maths.view(x.shape, cfg.channel_axis)
  ch = xla_gpu.chunks(v)
  c, g = v.channels, cfg.n_groups
  cdt = mean.dtype
  x6, ct6 = x.reshape(ch.shape), ct.reshape(ch.shape)
  m6 = None if mask is None else xla_gpu.as_chunks(v.mask(mask, x.shape), v, ch)
  if count is None:
    count = jnp.full(mean.shape, v.spatial_size * (c // g), cdt)
  safe = jnp.maximum(count, 1)
  mean_c, rstd_c = maths.per_channel(mean, c), maths.per_channel(rstd, c)
  gam = jnp.ones((1, c), cdt) if gamma is None else gamma.astype(cdt)

  def dz_and_xc(x6, ct6):
    xc = maths.masked(m6, x6.astype(cdt) - xla_gpu.bc(mean_c))
    dz = ct6.astype(cdt)
    if cfg.activation is not None:
      z = xc * xla_gpu.bc(rstd_c * gam)
      if beta is not None:
        z = z + xla_gpu.bc(beta.astype(cdt))
      dz = jax.vjp(cfg.activation, z)[1](dz)[0]
    # Masked-out outputs are constant 0: their cotangent goes no further.
    return maths.masked(m6, dz), xc

  # 1. Per-partial sums of dz and dz * xc, in one reduction. With an
  # activation, each sum gets its own handle on x and dy (the second tuple
  # differs from the first by `mean`), so that dz is computed twice in
  # registers rather than once into memory.
  dz, xc = dz_and_xc(*xla_gpu.barrier((x6, ct6)))
  if cfg.activation is not None:
    dz_b, xc = dz_and_xc(*xla_gpu.barrier((x6, ct6, mean))[:2])
  else:
    dz_b = dz
  s_dz, s_dzxc = xla_gpu.barrier(xla_gpu.sums(dz, dz_b * xc))
  # 2. Per (sample, channel), then per (sample, group).
  s_dz, s_dzxc = xla_gpu.sums(s_dz, s_dzxc, axes=(1, 3))
  a1 = maths.group_sum(s_dz * gam, g) / safe
  a2 = maths.group_sum(s_dzxc * gam, g) * (rstd * rstd) / safe
  # 3. dx, from a third handle on x and dy (the tuple holds a1 and a2).
  x6, ct6, a1, a2 = xla_gpu.barrier((x6, ct6, a1, a2))
  dz, xc = dz_and_xc(x6, ct6)
  dx = xla_gpu.bc(rstd_c) * (dz * xla_gpu.bc(gam) - xla_gpu.bc(maths.per_channel(a1, c))
                             - xc * xla_gpu.bc(maths.per_channel(a2, c)))
  dx = maths.masked(m6, dx).astype(x.dtype).reshape(x.shape)
  return (dx, maths.affine_cotangent(gamma, s_dzxc * rstd_c),
          maths.affine_cotangent(beta, s_dz))
