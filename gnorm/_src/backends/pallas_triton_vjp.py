"""GroupNorm's backward kernels, in Pallas with Triton's lowering.

The same views and blocks as the forward's kernels (``pallas_triton.py``): a
``(N, S, C)`` or ``(N, C, S)`` view of ``x`` and of the cotangent ``dy``, cut
into blocks of ``bs`` rows by ``bc`` channels, one program per block. The
per-(sample, group) ``mean``, ``rstd`` and coefficients are gathered per
channel inside the kernels: no per-channel array is made between them.

With ``xc = x - mean`` and ``dz`` the cotangent through the activation's
derivative at the pre-activation ``z = xc * rstd * gamma + beta``
(recomputed from ``x``: nothing of the forward pass is kept), the backward
pass is three kernels:

* ``partial_sums``: each program reads its block of ``x`` and ``dy`` once and
  writes, per channel, the sums of ``dz`` and of ``dz * xc`` over its rows;
* ``finish``: one small program per (sample, group) adds those up per
  channel (``dbeta`` and ``dgamma`` per sample and channel) and over the
  group: ``dx``'s per-group coefficients ``q = -rstd a1 / n`` and
  ``r = -rstd^3 a2 / n`` with ``a1 = sum(gamma dz)``, ``a2 = sum(gamma dz xc)``;
* ``input_grad``: each program reads its block of ``x`` and ``dy`` again and
  writes ``dx = dz * rstd * gamma + q + xc * r``.

Two reads of ``x`` and ``dy`` and one write of ``dx``: five x-sizes, the
least a backward pass that keeps nothing but ``x`` can move. Tails are masked
as in the forward; everything is computed in ``cdt``; ``interpret=True`` runs
the kernels in Pallas's interpreter (how CI tests them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gnorm._src import array_types
from gnorm._src.backends.pallas_triton import Tiling
from gnorm._src.backends.pallas_triton import block
from gnorm._src.backends.pallas_triton import by_group
from gnorm._src.backends.pallas_triton import columns
from gnorm._src.backends.pallas_triton import compiler_params
from gnorm._src.backends.pallas_triton import over_blocks
from gnorm._src.backends.pallas_triton import parameter
from gnorm._src.backends.pallas_triton import per_channel


def _dz_and_xc(x_ref, ct_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, *, t: Tiling, cdt,
               cg: int, activation):
  """This block's ``dz``, ``xc``, ``rstd * gamma`` and indices (0 outside the array)."""
  n, k, cs, col_ok, valid, index = block(t)
  cols = columns(t)
  x = plgpu.load(x_ref.at[index], mask=valid, other=0).astype(cdt)
  ct = plgpu.load(ct_ref.at[index], mask=valid, other=0).astype(cdt)
  mean = by_group(mean_ref, n, cols, col_ok, cg)
  scale = by_group(rstd_ref, n, cols, col_ok, cg) * parameter(gamma_ref, n, cs, col_ok)
  xc = jnp.where(valid, x - per_channel(t, mean), jnp.zeros((), cdt))
  dz = ct
  if activation is not None:
    z = xc * per_channel(t, scale) + per_channel(t, parameter(beta_ref, n, cs, col_ok))
    # The activation is elementwise: its JVP along dy is dy * act'(z).
    dz = jnp.where(valid, jax.jvp(activation, (z,), (ct,))[1], jnp.zeros((), cdt))
  return n, k, cs, cols, col_ok, valid, index, dz, xc, scale


def _sums_kernel(x_ref, ct_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, s_dz_ref, s_dzxc_ref,
                 *, t: Tiling, cdt, cg: int, activation):
  n, k, cs, _, col_ok, _, _, dz, xc, _ = _dz_and_xc(
      x_ref, ct_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, t=t, cdt=cdt, cg=cg,
      activation=activation)
  axis = 0 if t.channels_last else 1
  plgpu.store(s_dz_ref.at[n, k, cs], jnp.sum(dz, axis=axis), mask=col_ok)
  plgpu.store(s_dzxc_ref.at[n, k, cs], jnp.sum(dz * xc, axis=axis), mask=col_ok)


def _finish_kernel(s_dz_ref, s_dzxc_ref, rstd_ref, gamma_ref, dparams_ref, q_ref, r_ref, *,
                   t: Tiling, cg: int, cdt):
  n, g = pl.program_id(0), pl.program_id(1)

  def add(ds, ks, ok, cs, acc):
    a, b = acc
    a = a + jnp.sum(plgpu.load(s_dz_ref.at[n, ds, cs], mask=ok, other=0), axis=0)
    b = b + jnp.sum(plgpu.load(s_dzxc_ref.at[n, ds, cs], mask=ok, other=0), axis=0)
    return a, b

  cgp = 1 << max(0, (cg - 1).bit_length())
  zero = jnp.zeros((cgp,), cdt)
  s_dz, s_dzxc = over_blocks(t, cg, add, (zero, zero))  # per channel, (CGP,)
  cs = pl.ds(g * cg, cgp)
  col_ok = jnp.arange(cgp, dtype=jnp.int32) < cg
  rstd = rstd_ref[n, g]
  gamma = parameter(gamma_ref, n, cs, col_ok)
  count = t.s * cg
  plgpu.store(dparams_ref.at[n * 0, n, cs], s_dzxc * rstd, mask=col_ok)  # dgamma
  plgpu.store(dparams_ref.at[n * 0 + 1, n, cs], s_dz, mask=col_ok)  # dbeta
  q_ref[n, g] = -rstd * jnp.sum(gamma * s_dz) / count
  r_ref[n, g] = -(rstd * rstd * rstd) * jnp.sum(gamma * s_dzxc) / count


def _input_grad_kernel(x_ref, ct_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, q_ref, r_ref,
                       dx_ref, *, t: Tiling, cdt, cg: int, activation):
  n, _, _, cols, col_ok, valid, index, dz, xc, scale = _dz_and_xc(
      x_ref, ct_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, t=t, cdt=cdt, cg=cg,
      activation=activation)
  q = by_group(q_ref, n, cols, col_ok, cg)
  r = by_group(r_ref, n, cols, col_ok, cg)
  dx = dz * per_channel(t, scale) + per_channel(t, q) + xc * per_channel(t, r)
  plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=valid)


def backward(xv, ctv, mean, rstd, gamma, beta, t: Tiling, cdt,
             activation: Callable[[jax.Array], jax.Array] | None, *, interpret: bool):
  """``(dx, dparams)``: ``dx`` in ``x``'s dtype and view, and the parameters'
  cotangents per sample and channel, ``dgamma`` and ``dbeta`` stacked in one
  ``(2, N, C)`` array in ``cdt`` (one array, so that summing both over the
  batch is one small reduction).

  ``mean`` and ``rstd`` are ``(N, G)``, ``gamma`` and ``beta`` ``(1, C)`` or
  ``(N, C)`` in ``cdt`` (``beta`` is read only under an activation).
  """
  groups = mean.shape[1]
  cg = t.c // groups
  stat = array_types.struct((t.n, groups), cdt, xv)
  per_c = array_types.struct((2, t.n, t.c), cdt, xv)
  partial = array_types.struct((t.n, t.grid[1], t.c), cdt, xv)
  s_dz, s_dzxc = pl.pallas_call(
      functools.partial(_sums_kernel, t=t, cdt=cdt, cg=cg, activation=activation),
      out_shape=(partial, partial),
      grid=t.grid,
      compiler_params=compiler_params(t, inputs=2),
      interpret=interpret,
      name="gnorm_bwd_partial_sums",
  )(xv, ctv, mean, rstd, gamma, beta)
  dparams, q, r = pl.pallas_call(
      functools.partial(_finish_kernel, t=t, cg=cg, cdt=cdt),
      out_shape=(per_c, stat, stat),
      grid=(t.n, groups),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="gnorm_bwd_finish",
  )(s_dz, s_dzxc, rstd, gamma)
  dx = pl.pallas_call(
      functools.partial(_input_grad_kernel, t=t, cdt=cdt, cg=cg, activation=activation),
      out_shape=array_types.struct(xv.shape, xv.dtype, xv),
      grid=t.grid,
      compiler_params=compiler_params(t, inputs=2),
      interpret=interpret,
      name="gnorm_bwd_input_grad",
  )(xv, ctv, mean, rstd, gamma, beta, q, r)
  return dx, dparams
