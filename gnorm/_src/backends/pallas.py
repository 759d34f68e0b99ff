"""``implementation="pallas"``: the forward and the backward by Pallas kernels.

The kernels are in ``pallas_triton.py`` (forward) and ``pallas_triton_vjp.py``
(backward); this module prepares their inputs and finishes their per-block
results. On CUDA they compile with Triton; elsewhere they run in Pallas's
interpreter (for tests: far too slow for anything else).

The forward, exact either way (two passes, or Chan et al.'s combine): with
enough (sample, group) pairs to fill a GPU (``ONE_PASS_MIN_PROGRAMS``) and a
group that fits in one block, one program per pair holds it in registers and
reads ``x`` once; otherwise a first kernel reduces blocks of rows and
channels to partial moments, a combining kernel finishes them per (sample,
group), and a second pass writes ``y``. The backward: a kernel sums ``dz``
and ``dz * (x - mean)`` per block and channel, a combining kernel turns them
into ``dgamma``, ``dbeta`` and dx's coefficients, and a last kernel writes
``dx``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gnorm._src import maths
from gnorm._src.backends import pallas_triton
from gnorm._src.backends import pallas_triton_vjp

# Below this many (sample, group) pairs the one-pass kernel, one program per
# pair, would leave most of a GPU idle (an H100 has 132 SMs): the two-kernel
# plan, one program per block, takes over.
ONE_PASS_MIN_PROGRAMS = 512


def _erfc(z: jax.Array) -> jax.Array:
  """erfc from operations Triton lowers (it has no erf): the Chebyshev fit of
  Press et al., Numerical Recipes 6.2, fractional error < 1.2e-7 for all z."""
  a = jnp.abs(z)
  t = 1 / (1 + 0.5 * a)
  coefs = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
           -1.13520398, 1.48851587, -0.82215223, 0.17087277)
  poly = jnp.zeros_like(t)
  for c in reversed(coefs[1:]):
    poly = t * (c + poly)
  r = t * jnp.exp(-a * a + coefs[0] + poly)
  return jnp.where(z >= 0, r, 2 - r)


def _gelu(z: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as ``jax.nn.gelu(z, approximate=False)`` computes it."""
  return 0.5 * z * _erfc(-z * np.sqrt(0.5).astype(z.dtype))


def kernel_activation(activation):
  """The activation as the kernel computes it: the same function, written
  with what Triton lowers where ``jax.nn``'s version uses more."""
  return _gelu if activation is maths.ACTIVATIONS["gelu"] else activation


def forward(cfg: maths.Config, x, gamma, beta, mask, *, interpret: bool):
  """Like ``maths.forward``: ``(y, (count, mean, rstd))``, by the kernels."""
  del mask  # None: validation sends masks to XLA
  v = maths.view(x.shape, cfg.channel_axis)
  n, c, s = v.shape[0], v.channels, v.spatial_size
  t = pallas_triton.tiling(n, s, c, channels_last=v.c_pos == 2)
  cdt = maths.compute_dtype(x.dtype)
  xv = x.reshape(v.shape)
  g = cfg.n_groups
  counts = jnp.full((n, g), s * (c // g), cdt)
  act = kernel_activation(cfg.activation)
  gt = pallas_triton.group_tiling(n, s, c, g, channels_last=v.c_pos == 2)
  if gt is not None and n * g >= ONE_PASS_MIN_PROGRAMS:  # a group fits in one block
    gam, bet = _affine(gamma, beta, c, cdt)
    y, mean, rstd = pallas_triton.one_pass(xv, gam, bet, gt, cdt, cfg.eps, act,
                                           interpret=interpret)
    return y.reshape(x.shape), (counts, mean, rstd)

  block_mean, block_m2 = pallas_triton.partial_moments(xv, t, cdt, interpret=interpret)
  mean, rstd = pallas_triton.finish(block_mean, block_m2, t, g, cdt, cfg.eps,
                                    interpret=interpret)
  gam, bet = _affine(gamma, beta, c, cdt)
  y = pallas_triton.normalise(xv, mean, rstd, gam, bet, t, cdt, act, interpret=interpret)
  return y.reshape(x.shape), (counts, mean, rstd)


def _affine(gamma, beta, c: int, cdt):
  """gamma and beta as the kernels read them: ``(1, C)`` or ``(N, C)`` in
  ``cdt``, ones and zeros where absent (constants: no kernel makes them)."""
  gamma = jnp.ones((1, c), cdt) if gamma is None else gamma.astype(cdt)
  beta = jnp.zeros((1, c), cdt) if beta is None else beta.astype(cdt)
  return gamma, beta


def cotangent(cfg: maths.Config, x, gamma, beta, mask, count, mean, rstd, ct, *,
              interpret: bool):
  """``(dx, dgamma, dbeta)`` for cotangent ``ct``, by the kernels (the
  contract of ``tangent.cotangent``)."""
  del mask, count  # None: validation sends masks to XLA
  v = maths.view(x.shape, cfg.channel_axis)
  n, c, s = v.shape[0], v.channels, v.spatial_size
  t = pallas_triton.tiling(n, s, c, channels_last=v.c_pos == 2, backward=True)
  cdt = mean.dtype
  # beta matters only through the activation.
  gam, bet = _affine(gamma, beta if cfg.activation is not None else None, c, cdt)
  if cfg.activation is None:
    bet = gam  # any (1, C) array: no zeros to make for nothing
  dx, dparams = pallas_triton_vjp.backward(
      x.reshape(v.shape), ct.reshape(v.shape), mean, rstd, gam, bet, t, cdt,
      kernel_activation(cfg.activation), interpret=interpret)
  summed = jnp.sum(dparams, axis=1, keepdims=True)  # both over the batch: one reduction

  def of(p, i: int):
    if p is None:
      return None
    return (summed[i] if p.shape[0] == 1 else dparams[i]).astype(p.dtype)

  return dx.reshape(x.shape), of(gamma, 0), of(beta, 1)
