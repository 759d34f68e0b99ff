"""An independent float64 NumPy reference for Group Normalization.

Deliberately written the plain way (move channels last, reshape to
``(N, -1, G, C // G)``, reduce in float64) so that it shares no code and no
numerical tricks with gnorm.
"""

from __future__ import annotations

import numpy as np


def group_norm_ref(x, n_groups, gamma=None, beta=None, eps=1e-5, channel_axis=-1):
  """Returns GroupNorm of ``x`` in float64 (gamma/beta of shape (C,) or None)."""
  x = np.asarray(x, dtype=np.float64)
  xl = np.moveaxis(x, channel_axis, -1)
  n, c = xl.shape[0], xl.shape[-1]
  xg = xl.reshape(n, -1, n_groups, c // n_groups)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  y = ((xg - mean) / np.sqrt(var + eps)).reshape(xl.shape)
  if gamma is not None:
    y = y * np.asarray(gamma, np.float64).reshape(-1)
  if beta is not None:
    y = y + np.asarray(beta, np.float64).reshape(-1)
  return np.moveaxis(y, -1, channel_axis)


def _act64(name, z):
  if name is None:
    return z
  if name == "relu":
    return np.maximum(z, 0)
  if name in ("silu", "swish"):
    return z / (1 + np.exp(-z))
  if name == "gelu":
    from math import erf
    return 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
  if name == "gelu_tanh":
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  raise ValueError(name)


def group_norm_ref_full(x, n_groups, gamma=None, beta=None, eps=1e-5,
                        channel_axis=-1, mask=None, activation=None):
  """Float64 reference with a mask, per-sample (N, C) gamma/beta, activation.

  ``mask`` broadcasts to ``x`` (True = counted); masked-out positions output
  0. A group whose variance plus ``eps`` is 0 normalises to 0.
  """
  x = np.asarray(x, dtype=np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  xl = np.moveaxis(x, channel_axis, -1)
  ml = np.moveaxis(m, channel_axis, -1)
  n, c = xl.shape[0], xl.shape[-1]
  xg = xl.reshape(n, -1, n_groups, c // n_groups)
  mg = ml.reshape(xg.shape)
  cnt = mg.sum(axis=(1, 3), keepdims=True)
  xz = np.where(mg, xg, 0.0)
  mean = xz.sum(axis=(1, 3), keepdims=True) / np.maximum(cnt, 1)
  var = (np.where(mg, xg - mean, 0.0) ** 2).sum(axis=(1, 3), keepdims=True) / np.maximum(cnt, 1)
  ok = (cnt > 0) & (var + eps > 0)
  xhat = np.where(ok, (xg - mean) / np.sqrt(np.where(ok, var + eps, 1.0)), 0.0)
  xhat = xhat.reshape(xl.shape)
  def per(p):
    p = np.asarray(p, np.float64)
    return p.reshape(1, 1, c) if p.ndim == 1 else p.reshape(n, 1, c)
  y = xhat.reshape(n, -1, c)
  if gamma is not None:
    y = y * per(gamma)
  if beta is not None:
    y = y + per(beta)
  y = np.where(ml, _act64(activation, y.reshape(xl.shape)), 0.0)
  return np.moveaxis(y, -1, channel_axis)


def naive_jnp(params, x, n_groups, channel_axis=-1, activation=None, eps=1e-5, mask=None):
  """The plain formula in ``jax.numpy`` (shares no code with gnorm): an oracle
  for derivatives, by JAX's autodiff of it (in float64 under ``x64``).

  ``params`` holds ``gamma`` and ``beta`` of shape ``(C,)`` or ``(N, C)``;
  ``activation`` is a name of ``gnorm``'s (``"silu"``, ``"gelu"``, ...).
  ``mask`` (broadcastable to ``x``, True where a position counts): the
  statistics of the counted positions; the others output 0 (gnorm's choice),
  as does a group with nothing counted, and no gradient passes them
  (``jnp.where`` around ``x - mean``: a NaN there would, through the
  discarded branch's derivative).
  """
  import jax
  import jax.numpy as jnp

  acts = {"relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu,
          "gelu": lambda z: jax.nn.gelu(z, approximate=False),
          "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True)}
  xl = jnp.moveaxis(x, channel_axis, -1)
  n, c = xl.shape[0], xl.shape[-1]
  xg = xl.reshape(n, -1, n_groups, c // n_groups)
  if mask is None:
    m = None
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  else:
    ml = jnp.moveaxis(jnp.broadcast_to(mask, x.shape), channel_axis, -1)
    m = ml.reshape(xg.shape)
    cnt = jnp.maximum(m.sum(axis=(1, 3), keepdims=True), 1)
    mean = jnp.where(m, xg, 0).sum(axis=(1, 3), keepdims=True) / cnt
    var = (jnp.where(m, xg - mean, 0) ** 2).sum(axis=(1, 3), keepdims=True) / cnt
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(n, -1, c)
  y = y * jnp.reshape(params["gamma"], (-1, 1, c)) + jnp.reshape(params["beta"], (-1, 1, c))
  if activation is not None:
    y = acts[activation](y)
  if m is not None:
    y = jnp.where(m.reshape(y.shape), y, 0)
  return jnp.moveaxis(y.reshape(xl.shape), -1, channel_axis)
