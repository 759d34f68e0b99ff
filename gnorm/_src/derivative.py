"""The derivative of Group Normalization: a lean, forward-mode-safe ``custom_jvp``.

The rule evaluates the forward and returns the tangent map
(``tangent.tangent``) through ``primitives.tangent_p``, whose transpose is
each platform's backward pass. Reverse mode (linearise, then transpose)
therefore keeps only ``x``, the parameters, the mask and the per-(sample,
group) statistics; forward mode and higher orders keep working, which a
``custom_vjp`` would not allow (``jax.jvp`` and ``jax.jacfwd`` would raise).

With ``axis_name`` the sums need collectives, which stay in plain JAX: the
tangent map is then wrapped in ``jax.checkpoint`` instead, for the same lean
residuals, and JAX transposes it.
"""

from __future__ import annotations

import functools

import jax

from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src import primitives
from gnorm._src import tangent


def _forward(cfg: maths.Config):
  return primitives.forward if cfg.axis_name is None else dispatch.forward_across_devices


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def group_norm_core(x, gamma, beta, mask, cfg: maths.Config):
  """Normalises validated input (``maths.py``'s conventions)."""
  return _forward(cfg)(cfg, x, gamma, beta, mask)[0]


@group_norm_core.defjvp
def _group_norm_core_jvp(cfg: maths.Config, primals, tangents):
  x, gamma, beta, mask = primals
  tx, tgamma, tbeta, _ = tangents
  y, (count, mean, rstd) = _forward(cfg)(cfg, x, gamma, beta, mask)
  count = None if mask is None and cfg.axis_name is None else count
  tgamma = None if gamma is None else tgamma
  tbeta = None if beta is None else tbeta
  if cfg.axis_name is None:
    return y, primitives.tangent(cfg, x, gamma, beta, mask, count, mean, rstd, tx, tgamma, tbeta)
  ty = jax.checkpoint(functools.partial(tangent.tangent, cfg))(
      x, gamma, None if cfg.activation is None else beta, mask, count, mean, rstd, tx,
      tgamma, tbeta)
  return y, ty
