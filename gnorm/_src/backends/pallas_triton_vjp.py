"""GroupNorm's two backward kernels, in Pallas with Triton's lowering.

The same views and blocks as the forward's kernels (``pallas_triton.py``): a
``(N, S, C)`` or ``(N, C, S)`` view of ``x`` and of the cotangent ``dy``, cut
into blocks of ``bs`` rows by ``bc`` channels, one program per block.

With ``xc = x - mean`` and ``dz`` the cotangent through the activation's
derivative at the pre-activation ``z = xc * scale + shift`` (``scale =
rstd * gamma``, ``shift = beta``; recomputed from ``x``, nothing of the
forward pass is kept), the backward pass is

* ``partial_sums``: each program reads its block of ``x`` and ``dy`` once and
  writes, per channel, the sums of ``dz`` and of ``dz * xc`` over its rows;
  ``pallas.py`` adds those up per (sample, channel): ``dbeta``, ``dgamma``
  and the per-group terms of ``dx`` follow from them;
* ``input_grad``: each program reads its block of ``x`` and ``dy`` again and
  writes ``dx = dz * p + q + xc * r`` with per-(sample, channel) ``p``, ``q``
  and ``r``.

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

from gnorm._src.backends.pallas_triton import Tiling
from gnorm._src.backends.pallas_triton import block
from gnorm._src.backends.pallas_triton import compiler_params
from gnorm._src.backends.pallas_triton import per_channel


def _dz_and_xc(x_ref, ct_ref, mean_ref, scale_ref, shift_ref, *, t: Tiling, cdt, activation):
  """This block's ``dz`` and ``xc`` (0 outside the array), and where it writes."""
  n, k, cs, col_ok, valid, index = block(t)
  x = plgpu.load(x_ref.at[index], mask=valid, other=0).astype(cdt)
  ct = plgpu.load(ct_ref.at[index], mask=valid, other=0).astype(cdt)
  mean = plgpu.load(mean_ref.at[n, cs], mask=col_ok, other=0)
  xc = jnp.where(valid, x - per_channel(t, mean), jnp.zeros((), cdt))
  dz = ct
  if activation is not None:
    scale = plgpu.load(scale_ref.at[n, cs], mask=col_ok, other=0)
    shift = plgpu.load(shift_ref.at[n, cs], mask=col_ok, other=0)
    z = xc * per_channel(t, scale) + per_channel(t, shift)
    # The activation is elementwise: its JVP along dy is dy * act'(z).
    dz = jnp.where(valid, jax.jvp(activation, (z,), (ct,))[1], jnp.zeros((), cdt))
  return n, k, cs, col_ok, valid, index, dz, xc


def _sums_kernel(x_ref, ct_ref, mean_ref, scale_ref, shift_ref, s_dz_ref, s_dzxc_ref, *,
                 t: Tiling, cdt, activation):
  n, k, cs, col_ok, _, _, dz, xc = _dz_and_xc(x_ref, ct_ref, mean_ref, scale_ref, shift_ref,
                                              t=t, cdt=cdt, activation=activation)
  axis = 0 if t.channels_last else 1
  plgpu.store(s_dz_ref.at[n, k, cs], jnp.sum(dz, axis=axis), mask=col_ok)
  plgpu.store(s_dzxc_ref.at[n, k, cs], jnp.sum(dz * xc, axis=axis), mask=col_ok)


def _input_grad_kernel(x_ref, ct_ref, mean_ref, scale_ref, shift_ref, p_ref, q_ref, r_ref,
                       dx_ref, *, t: Tiling, cdt, activation):
  n, _, cs, col_ok, valid, index, dz, xc = _dz_and_xc(
      x_ref, ct_ref, mean_ref, scale_ref, shift_ref, t=t, cdt=cdt, activation=activation)
  p = plgpu.load(p_ref.at[n, cs], mask=col_ok, other=0)
  q = plgpu.load(q_ref.at[n, cs], mask=col_ok, other=0)
  r = plgpu.load(r_ref.at[n, cs], mask=col_ok, other=0)
  dx = dz * per_channel(t, p) + per_channel(t, q) + xc * per_channel(t, r)
  plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=valid)


def partial_sums(xv, ctv, mean_c, scale_c, shift_c, t: Tiling, cdt,
                 activation: Callable[[jax.Array], jax.Array] | None, *, interpret: bool):
  """Per ``(sample, row block, channel)``: the sums of ``dz`` and ``dz * xc``.

  ``mean_c``, ``scale_c`` and ``shift_c`` are ``(N, C)`` in ``cdt`` (the last
  two only read under an activation). Returns two ``(N, cdiv(S, bs), C)``
  arrays in ``cdt``.
  """
  out = jax.ShapeDtypeStruct((t.n, t.grid[1], t.c), cdt)
  return pl.pallas_call(
      functools.partial(_sums_kernel, t=t, cdt=cdt, activation=activation),
      out_shape=(out, out),
      grid=t.grid,
      compiler_params=compiler_params(t, inputs=2),
      interpret=interpret,
      name="gnorm_bwd_partial_sums",
  )(xv, ctv, mean_c, scale_c, shift_c)


def input_grad(xv, ctv, mean_c, scale_c, shift_c, p_c, q_c, r_c, t: Tiling, cdt,
               activation: Callable[[jax.Array], jax.Array] | None, *, interpret: bool):
  """``dx = dz * p + q + xc * r`` in ``x``'s dtype and view (``p``, ``q``,
  ``r``: ``(N, C)`` in ``cdt``)."""
  return pl.pallas_call(
      functools.partial(_input_grad_kernel, t=t, cdt=cdt, activation=activation),
      out_shape=jax.ShapeDtypeStruct(xv.shape, xv.dtype),
      grid=t.grid,
      compiler_params=compiler_params(t, inputs=2),
      interpret=interpret,
      name="gnorm_bwd_input_grad",
  )(xv, ctv, mean_c, scale_c, shift_c, p_c, q_c, r_c)
