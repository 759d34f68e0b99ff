"""Porting GroupNorm weights from other frameworks to gnorm's params.

Every framework stores the same two per-channel vectors under its own names;
these functions rename them to ``{"gamma": ..., "beta": ...}`` (shape
``(C,)``) and check them. None of them imports the source framework: a
PyTorch tensor is read through ``.detach().cpu().numpy()``, anything else
through ``numpy.asarray``.

The epsilons differ too, and a ported model is only exact with the source's
epsilon: see ``DEFAULT_EPSILON``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: The epsilon each framework's GroupNorm uses by default. Pass the source's
#: value as ``epsilon=`` when porting: gnorm's own default is ``1e-5``.
DEFAULT_EPSILON: Mapping[str, float] = types.MappingProxyType({
    "gnorm": 1e-5,
    "neupy": 1e-5,
    "pytorch": 1e-5,  # torch.nn.GroupNorm(eps=1e-05)
    "flax": 1e-6,  # flax.linen.GroupNorm and flax.nnx.GroupNorm
    "haiku": 1e-5,  # haiku.GroupNorm(eps=1e-5)
    "equinox": 1e-5,  # equinox.nn.GroupNorm(eps=1e-5)
    "keras": 1e-3,  # keras.layers.GroupNormalization(epsilon=1e-3)
})


def _to_array(value: Any, where: str) -> jax.Array:
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    # A torch.Tensor (possibly on a GPU or requiring grad), without torch.
    value = value.detach().cpu().numpy()
  try:
    arr = np.asarray(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{where} is not an array: {type(value).__name__} ({e}).") from None
  if not (np.issubdtype(arr.dtype, np.floating)
          or np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"{where} must hold real numbers, got dtype {arr.dtype}.")
  if sum(d != 1 for d in arr.shape) > 1:
    raise ValueError(
        f"{where} has shape {arr.shape}; a GroupNorm parameter holds one value "
        "per channel, with shape (C,) (or 1 on every axis but the channels).")
  return jnp.asarray(arr).reshape(-1)


def _convert(params: Any, scale_key: str, shift_key: str, source: str,
             prefix: str) -> dict[str, jax.Array]:
  if not isinstance(params, Mapping):
    if hasattr(params, scale_key) or hasattr(params, shift_key):
      # An eqx.nn.GroupNorm-like object with attributes.
      params = {k: getattr(params, k) for k in (scale_key, shift_key)
                if getattr(params, k, None) is not None}
    else:
      raise TypeError(
          f"{source} parameters must be a mapping with keys {scale_key!r} and "
          f"{shift_key!r}, got {type(params).__name__}.")
  keys = {"gamma": prefix + scale_key, "beta": prefix + shift_key}
  out = {}
  for ours, theirs in keys.items():
    value = params.get(theirs)
    if value is not None:
      out[ours] = _to_array(value, f"{source} {theirs!r}")
  if not out:
    found = sorted(str(k) for k in params)
    raise ValueError(
        f"no GroupNorm parameters found in the {source} parameters: expected "
        f"{keys['gamma']!r} and/or {keys['beta']!r}, found keys {found}.")
  if len(out) == 2 and out["gamma"].shape != out["beta"].shape:
    raise ValueError(
        f"{source} {keys['gamma']!r} has {out['gamma'].size} values but "
        f"{keys['beta']!r} has {out['beta'].size}; both must have one per "
        "channel.")
  return out


def from_pytorch(state_dict: Mapping[str, Any],
                 prefix: str = "") -> dict[str, jax.Array]:
  """Converts a ``torch.nn.GroupNorm`` state dict to gnorm's params.

  ``weight`` becomes ``gamma`` and ``bias`` becomes ``beta``. PyTorch's
  default epsilon is ``1e-5``, as gnorm's. A layer built with
  ``affine=False`` has no parameters to port: use ``params=None`` (or
  ``gamma=None, beta=None`` on the modules).

  Args:
    state_dict: ``module.state_dict()`` of the GroupNorm, or of a whole model
      with ``prefix`` naming the layer (such as ``"down.0.norm1."``). Values
      may be torch tensors (on any device) or arrays.
    prefix: prepended to ``"weight"`` and ``"bias"``.

  Returns:
    ``{"gamma": ..., "beta": ...}`` as ``jax.Array`` of shape ``(C,)``.

  Raises:
    ValueError: neither key is found (the message lists the keys present),
      or the two vectors differ in size.
    TypeError: a value that is not a real array.

  Examples:
    >>> import numpy as np, gnorm
    >>> sd = {"norm.weight": np.ones(4), "norm.bias": np.zeros(4)}
    >>> p = gnorm.from_pytorch(sd, prefix="norm.")
    >>> sorted(p), p["gamma"].shape
    (['beta', 'gamma'], (4,))
  """
  return _convert(state_dict, "weight", "bias", "PyTorch", prefix)


def from_flax(params: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Converts ``flax.linen.GroupNorm`` / ``flax.nnx.GroupNorm`` parameters.

  ``scale`` becomes ``gamma`` and ``bias`` becomes ``beta``. Flax's default
  epsilon is ``1e-6``: pass ``epsilon=1e-6`` to gnorm for the same outputs.

  Args:
    params: the layer's params, e.g. ``variables["params"]["GroupNorm_0"]``
      (for nnx, ``{"scale": m.scale[...], "bias": m.bias[...]}``).

  Returns:
    ``{"gamma": ..., "beta": ...}`` (a key is absent where flax had
    ``use_scale=False`` or ``use_bias=False``).

  Examples:
    >>> import jax.numpy as jnp, gnorm
    >>> p = gnorm.from_flax({"scale": jnp.ones(8), "bias": jnp.zeros(8)})
    >>> jnp.shape(p["gamma"]), jnp.shape(p["beta"])
    ((8,), (8,))
  """
  return _convert(params, "scale", "bias", "flax", "")


def from_haiku(params: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Converts ``haiku.GroupNorm`` parameters.

  ``scale`` becomes ``gamma`` and ``offset`` becomes ``beta``; a broadcast
  shape such as ``(1, 1, 1, C)`` is flattened to ``(C,)``. Haiku's default
  epsilon is ``1e-5``.

  Args:
    params: the layer's entry of the haiku params, e.g.
      ``params["net/group_norm"]``.

  Returns:
    ``{"gamma": ..., "beta": ...}``.

  Examples:
    >>> import numpy as np, gnorm
    >>> p = gnorm.from_haiku({"scale": np.ones((1, 1, 1, 8)), "offset": np.zeros(8)})
    >>> p["gamma"].shape
    (8,)
  """
  return _convert(params, "scale", "offset", "haiku", "")


def from_equinox(params: Any) -> dict[str, jax.Array]:
  """Converts ``equinox.nn.GroupNorm`` parameters.

  ``weight`` becomes ``gamma`` and ``bias`` becomes ``beta``. Equinox's
  default epsilon is ``1e-5``. Note that equinox normalises a single sample
  with channels first (``(C, ...)``): use ``channel_axis=1`` on a batch of
  such samples.

  Args:
    params: the ``eqx.nn.GroupNorm`` module itself (its ``weight`` and
      ``bias`` attributes are read, either may be ``None``) or a mapping
      with those keys.

  Returns:
    ``{"gamma": ..., "beta": ...}``.

  Examples:
    >>> import numpy as np, gnorm
    >>> p = gnorm.from_equinox({"weight": np.ones(8), "bias": np.zeros(8)})
    >>> p["beta"].shape
    (8,)
  """
  return _convert(params, "weight", "bias", "equinox", "")
