"""``implementation="pallas"``: the forward by the kernels of ``pallas_triton.py``.

What runs where, picked at lowering time (``jax.lax.platform_dependent``),
like the XLA hints: on CUDA the kernels compile with Triton; on every other
platform they run in Pallas's interpreter, which is what CI tests (and is
far too slow for anything else: ``"auto"`` never picks it there).

Two plans, both exact (two-pass or Chan et al.'s combine, never
E[x^2] - E[x]^2):

* a (sample, group) that fits in one block (``ONE_PASS_MAX_ELEMENTS``): one
  program per (sample, group) holds it in registers, computes its mean and
  variance in two passes over the registers and writes the output: ``x`` is
  read once. Groups that small make small tensors, for which the few
  programs (``N * G``) are not the bottleneck;
* otherwise: the first kernel reduces each block of rows and channels to a
  mean and a sum of squared deviations per channel, this module combines
  those per (sample, group) with Chan's pairwise formula, and the second
  kernel reads ``x`` once more and writes ``y``: two reads and one write,
  over as many programs as there are blocks, where XLA's fusion of the same
  maths takes three reads.

The derivative is not the kernels': ``forward`` is a ``custom_jvp`` whose
rule is the XLA maths' own JVP. The first-order rule of ``derivative.py``
only evaluates ``forward`` (the kernels run) and pairs it with the XLA
tangent map; only higher orders differentiate ``forward`` itself, through
the XLA maths, so ``jvp``, ``jacfwd``, ``hessian`` and ``check_grads`` keep
working.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gnorm._src import backends
from gnorm._src import maths
from gnorm._src.backends import pallas_triton


def unsupported(cfg: maths.Config, shape: tuple[int, ...], has_mask: bool) -> str | None:
  """The option the kernels do not cover, in words, or None."""
  if has_mask:
    return "mask"
  if cfg.axis_name is not None:
    return f"axis_name={cfg.axis_name!r}"
  if len(maths.view(shape, cfg.channel_axis).shape) != 3:
    return (f"channel_axis={cfg.channel_axis} with spatial axes on both sides of it "
            "(the kernels take channels last or channels right after the batch)")
  return None


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


def _kernels(cfg: maths.Config, x, gamma, beta, *, interpret: bool):
  v = maths.view(x.shape, cfg.channel_axis)
  n, c, s = v.shape[0], v.channels, v.spatial_size
  t = pallas_triton.tiling(n, s, c, channels_last=v.c_pos == 2)
  cdt = maths.compute_dtype(x.dtype)
  xv = x.reshape(v.shape)
  g = cfg.n_groups
  counts = jnp.full((n, g), s * (c // g), cdt)
  act = kernel_activation(cfg.activation)
  gt = pallas_triton.group_tiling(n, s, c, g, channels_last=v.c_pos == 2)
  if gt is not None:  # a group fits in one block: one read of x
    gam = jnp.ones((n, c), cdt) if gamma is None else jnp.broadcast_to(gamma.astype(cdt), (n, c))
    bet = jnp.zeros((n, c), cdt) if beta is None else jnp.broadcast_to(beta.astype(cdt), (n, c))
    y, mean, rstd = pallas_triton.one_pass(xv, gam, bet, gt, cdt, cfg.eps, act,
                                           interpret=interpret)
    return y.reshape(x.shape), (counts, mean, rstd)

  block_mean, block_m2 = pallas_triton.partial_moments(xv, t, cdt, interpret=interpret)

  # Chan's combine of the blocks' (rows, mean, M2) within each group.
  cg, k = c // g, t.grid[1]
  rows = np.minimum(t.bs, s - t.bs * np.arange(k)).reshape(1, k, 1, 1)
  count = s * cg
  block_mean = block_mean.reshape(n, k, g, cg)
  w = jnp.asarray(rows, cdt)
  mean = jnp.sum(w * block_mean, axis=(1, 3)) / count
  dev = block_mean - mean[:, None, :, None]
  m2 = jnp.sum(block_m2.reshape(n, k, g, cg), axis=(1, 3)) + jnp.sum(w * dev * dev, axis=(1, 3))
  rstd = maths.rstd_of(m2 / count, None, cfg)

  rstd_c = maths.per_channel(rstd, c)
  scale = rstd_c if gamma is None else rstd_c * gamma.astype(cdt)
  shift = jnp.zeros((n, c), cdt) if beta is None else jnp.broadcast_to(beta.astype(cdt), (n, c))
  y = pallas_triton.normalise(xv, maths.per_channel(mean, c), scale, shift, t, cdt, act,
                              interpret=interpret)
  return y.reshape(x.shape), (counts, mean, rstd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def forward(cfg: maths.Config, x, gamma, beta, mask):
  """Like ``maths.forward``: ``(y, (count, mean, rstd))``, by the kernels."""
  del mask  # None: ``unsupported`` sends masks to the XLA path
  return lax.platform_dependent(
      x, gamma, beta,
      cuda=functools.partial(_kernels, cfg, interpret=False),
      default=functools.partial(_kernels, cfg, interpret=True))


@forward.defjvp
def _forward_jvp(cfg: maths.Config, primals, tangents):
  # Differentiating the kernels' output: the XLA maths' JVP (same values).
  return jax.jvp(backends.per_platform(maths.forward, cfg), primals, tangents)
