"""A diffusion-style model for the drop-in benchmark (issue #14): a stack of the ResNet
blocks of a Stable Diffusion VAE decoder, at small width, parametrised by its GroupNorm.

Block (the decoder's ``ResnetBlock``, no time embedding, no dropout, in = out channels)::

  h = conv3x3(silu(norm1(x)))
  h = conv3x3(silu(norm2(h)))
  out = x + h

Variants of ``norm -> silu``:

* ``flax``: ``flax.linen.GroupNorm(32)``, then ``nn.silu`` (params ``scale``, ``bias``);
* ``drop_in``: ``gnorm.compat.linen.GroupNorm(32)``, then ``nn.silu`` (the same
  constructor and params as flax's: changing one import);
* ``gnorm_fused``: ``gnorm.GroupNorm(32, epsilon=1e-6, activation="silu")``, the SiLU
  fused into gnorm's pass (params ``gamma``, ``beta``); flax's epsilon, so that all
  three compute the same function.

``train_step`` is one jitted step of optax's adam on the mean squared error to a
fixed random target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gnorm.compat import linen as drop_in

from .prepared import residual_summary

VARIANTS = ("flax", "drop_in", "gnorm_fused")
GROUPS = 32
EPSILON = 1e-6  # flax.linen.GroupNorm's default, given to gnorm's layer too


class NormAct(nn.Module):
  """``silu(GroupNorm(32)(x))``, by ``variant``."""

  variant: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    if self.variant == "flax":
      return nn.silu(nn.GroupNorm(GROUPS, epsilon=EPSILON, dtype=self.dtype, name="norm")(x))
    if self.variant == "drop_in":
      return nn.silu(drop_in.GroupNorm(GROUPS, epsilon=EPSILON, dtype=self.dtype, name="norm")(x))
    if self.variant == "gnorm_fused":
      import gnorm

      # Output in x's dtype (the convolutions' compute dtype), SiLU fused.
      return gnorm.GroupNorm(GROUPS, epsilon=EPSILON, activation="silu", name="norm")(x)
    raise ValueError(f"unknown variant {self.variant!r}; choose from {VARIANTS}")


class ResnetBlock(nn.Module):
  """SD VAE decoder ``ResnetBlock``: (norm -> silu -> conv3x3) twice, plus the residual."""

  variant: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = x
    for i in (1, 2):
      h = NormAct(self.variant, self.dtype, name=f"act{i}")(h)
      h = nn.Conv(c, (3, 3), padding="SAME", dtype=self.dtype, name=f"conv{i}")(h)
    return x + h


class ResnetStack(nn.Module):
  """``blocks`` ResNet blocks at the input's width; activations in ``dtype``."""

  variant: str
  blocks: int = 3
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i in range(self.blocks):
      x = ResnetBlock(self.variant, self.dtype, name=f"block{i}")(x)
    return x


def _norm_params(variant: str, scale, bias) -> dict:
  if variant == "gnorm_fused":
    return {"gamma": scale, "beta": bias}
  return {"scale": scale, "bias": bias}


def params_for(variant: str, flax_params: dict, model: ResnetStack, x) -> dict:
  """``flax_params`` (the ``flax`` variant's, freshly initialised) for ``variant``:
  the same convolution weights; every norm's scale ones and bias zeros, named as
  ``variant`` names them. The tree is checked against ``variant``'s own init."""

  def convert(tree):
    if set(tree) == {"norm"}:
      s, b = tree["norm"]["scale"], tree["norm"]["bias"]
      return {"norm": _norm_params(variant, jnp.ones_like(s), jnp.zeros_like(b))}
    return {k: convert(v) if isinstance(v, dict) else v for k, v in tree.items()}

  params = convert(flax_params)
  want = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  got_def = jax.tree_util.tree_structure(params)
  want_def = jax.tree_util.tree_structure(dict(want))
  if got_def != want_def:
    raise ValueError(f"{variant}: parameter trees differ:\n{got_def}\nvs\n{want_def}")
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want), strict=True):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"{variant}: parameter {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
  return params


def loss_fn(model: ResnetStack) -> Callable:
  def loss(params, x, y):
    out = model.apply({"params": params}, x)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y))

  return loss


def train_step(model: ResnetStack, tx: optax.GradientTransformation) -> Callable:
  """``step(params, opt_state, x, y) -> (params, opt_state, loss)``, not jitted."""
  loss = loss_fn(model)

  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def residuals(model: ResnetStack, params, x, y) -> dict:
  """The arrays the backward of the loss keeps: the leaves of ``jax.vjp``'s function
  (listed by tracing), less the inputs themselves (parameters, ``x``, ``y``)."""
  loss = loss_fn(model)

  def leaves(params, x, y):
    return jax.tree_util.tree_leaves(jax.vjp(lambda p, x: loss(p, x, y), params, x)[1])

  jaxpr = jax.make_jaxpr(leaves)(params, x, y).jaxpr
  inputs = set(map(id, jaxpr.invars))
  summary = residual_summary(
    [
      (str(v.aval.dtype), list(v.aval.shape), v.aval.dtype.itemsize, False)
      for v in jaxpr.outvars
      if hasattr(v.aval, "shape") and id(v) not in inputs
    ],
    x.size,
    jnp.dtype(model.dtype or x.dtype).itemsize,
  )
  summary["activation_bytes"] = summary.pop("x_bytes")  # one activation's bytes
  return summary
