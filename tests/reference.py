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
