"""group_size, mask, fused activation and per-sample gamma/beta, alone and together."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gnorm
from tests.reference import group_norm_ref
from tests.reference import group_norm_ref_full

_jgn = jax.jit(gnorm.group_norm, static_argnames=(
    "n_groups", "eps", "channel_axis", "group_size", "activation"))


def _err(y, ref, where=None):
  d = np.abs(np.asarray(y, np.float64) - ref)
  if where is not None:
    d = d[where]
  return float(d.max())


def _rand(shape, seed, loc=0.0, dtype=np.float32):
  return (np.random.default_rng(seed).normal(size=shape) + loc).astype(dtype)


# --- group_size ---------------------------------------------------------------


@pytest.mark.parametrize("group_size,n_groups", [(1, 12), (3, 4), (12, 1)])
def test_group_size_equals_the_matching_group_count(group_size, n_groups):
  x = _rand((2, 5, 12), 0)
  np.testing.assert_array_equal(gnorm.group_norm(None, x, group_size=group_size),
                                gnorm.group_norm(None, x, n_groups))
  assert _err(gnorm.group_norm(None, x, group_size=group_size),
              group_norm_ref(x, n_groups)) <= 1e-5


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(n_groups=4, group_size=3), ValueError, r"exactly one of n_groups and group_size"),
    (dict(group_size=5), ValueError, r"group_size \(5\) must divide the number of channels \(12\)"),
    (dict(group_size=0), ValueError, r"group_size must be a positive int, got 0"),
    (dict(group_size=1.5), TypeError, r"group_size must be a positive int, got 1\.5"),
])
def test_group_size_errors(kwargs, exc, pattern):
  with pytest.raises(exc, match=pattern):
    gnorm.group_norm(None, np.zeros((2, 5, 12), np.float32), **kwargs)


# --- mask -----------------------------------------------------------------------


def _padded(seed=1):
  x = _rand((3, 9, 8), seed, loc=5.0)
  lengths = np.array([9, 4, 1])
  mask = (np.arange(9)[None, :, None] < lengths[:, None, None])  # (N, L, 1)
  return x, mask


def test_mask_matches_reference_and_ignores_padding_garbage():
  x, mask = _padded()
  rng = np.random.default_rng(2)
  gamma, beta = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  params = {"gamma": gamma, "beta": beta}
  y = gnorm.group_norm(params, x, 4, mask=mask)
  ref = group_norm_ref_full(x, 4, gamma, beta, mask=mask)
  assert _err(y, ref) <= 1e-5
  # Garbage, even NaN and Inf, in the padding changes nothing where it counts.
  garbage = x.copy()
  pad = np.broadcast_to(~mask, x.shape)
  garbage[pad] = rng.choice([np.nan, np.inf, -1e30, 1e9], size=int(pad.sum()))
  y2 = gnorm.group_norm(params, garbage, 4, mask=mask)
  valid = np.broadcast_to(mask, x.shape)
  np.testing.assert_array_equal(np.asarray(y2)[valid], np.asarray(y)[valid])


def test_mask_full_equals_no_mask_and_mask_layouts():
  x = _rand((2, 4, 8), 3)
  np.testing.assert_allclose(gnorm.group_norm(None, x, 2, mask=np.ones((2, 4, 8), bool)),
                             gnorm.group_norm(None, x, 2), atol=1e-6)
  # A channel-wise mask on NCHW input.
  xc = _rand((2, 8, 3, 3), 4)
  mask = np.random.default_rng(4).random((2, 8, 3, 3)) > 0.3
  y = gnorm.group_norm(None, xc, 4, channel_axis=1, mask=mask)
  assert _err(y, group_norm_ref_full(xc, 4, channel_axis=1, mask=mask)) <= 1e-5


def test_empty_group_outputs_zero_with_zero_gradient():
  x = _rand((2, 3, 4), 5)
  mask = np.ones((2, 3, 4), bool)
  mask[1, :, 2:] = False  # sample 1, group 1: nothing counted
  beta = np.arange(4, dtype=np.float32)
  params = {"gamma": np.full(4, 2.0, np.float32), "beta": beta}
  y = np.asarray(gnorm.group_norm(params, x, 2, mask=mask))
  # Every position of the group is masked out, so every output there is 0.
  np.testing.assert_array_equal(y[1, :, 2:], 0.0)
  assert _err(y, group_norm_ref_full(x, 2, params["gamma"], beta, mask=mask)) <= 1e-5
  gx = jax.grad(lambda x: jnp.sum(gnorm.group_norm(params, x, 2, mask=mask) ** 2))(x)
  assert np.all(np.isfinite(np.asarray(gx)))
  np.testing.assert_array_equal(np.asarray(gx)[1, :, 2:], 0.0)


def test_mask_errors():
  x = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(TypeError, match=r"mask must be a boolean array .* got dtype float32"):
    gnorm.group_norm(None, x, 2, mask=np.ones((2, 3, 1), np.float32))
  with pytest.raises(ValueError, match=r"mask of shape \(2, 2, 1\) does not broadcast to "
                                       r"the input shape \(2, 3, 4\)"):
    gnorm.group_norm(None, x, 2, mask=np.ones((2, 2, 1), bool))
  with pytest.raises(ValueError, match=r"mask of shape \(5, 2, 3, 4\) does not broadcast"):
    gnorm.group_norm(None, x, 2, mask=np.ones((5, 2, 3, 4), bool))


# --- activation -------------------------------------------------------------------


@pytest.mark.parametrize("name,fn", [("relu", jax.nn.relu), ("silu", jax.nn.silu),
                                     ("swish", jax.nn.silu),
                                     ("gelu", lambda z: jax.nn.gelu(z, approximate=False))])
def test_fused_activation_equals_applying_it_after(name, fn):
  x = _rand((2, 6, 6, 8), 6)
  rng = np.random.default_rng(6)
  params = {"gamma": rng.normal(size=8).astype(np.float32),
            "beta": rng.normal(size=8).astype(np.float32)}
  fused = gnorm.group_norm(params, x, 4, activation=name)
  after = fn(gnorm.group_norm(params, x, 4))
  np.testing.assert_allclose(fused, after, atol=1e-6)
  assert _err(fused, group_norm_ref_full(x, 4, params["gamma"], params["beta"],
                                         activation=name)) <= 1e-5
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  g_fused = jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(p, x, 4, activation=name) * ct),
                     argnums=(0, 1))(params, x)
  g_after = jax.grad(lambda p, x: jnp.sum(fn(gnorm.group_norm(p, x, 4)) * ct),
                     argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_fused), jax.tree_util.tree_leaves(g_after),
                  strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_callable_activation_and_errors():
  x = _rand((2, 3, 4), 7)
  np.testing.assert_allclose(gnorm.group_norm(None, x, 2, activation=jnp.tanh),
                             jnp.tanh(gnorm.group_norm(None, x, 2)), atol=1e-6)
  with pytest.raises(ValueError, match=r"unknown activation 'mish'; use one of"):
    gnorm.group_norm(None, x, 2, activation="mish")
  with pytest.raises(TypeError, match=r"activation must be None, a name"):
    gnorm.group_norm(None, x, 2, activation=3)


def test_fused_activation_keeps_no_full_size_residual_but_x():
  x = jnp.asarray(_rand((2, 8, 8, 16), 8), jnp.bfloat16)
  params = {"gamma": jnp.ones(16), "beta": jnp.zeros(16)}
  _, vjp_fn = jax.vjp(lambda p, x: gnorm.group_norm(p, x, 4, activation="silu"), params, x)
  big = [leaf for leaf in jax.tree_util.tree_leaves(vjp_fn) if leaf.size >= x.size]
  assert len(big) == 1 and big[0].dtype == jnp.bfloat16


# --- per-sample gamma / beta ------------------------------------------------------


@pytest.mark.parametrize("form", ["nc", "n11c"])
def test_per_sample_scale_and_shift(form):
  x = _rand((3, 4, 5, 8), 9)
  rng = np.random.default_rng(9)
  gamma = rng.normal(size=(3, 8)).astype(np.float32)
  beta = rng.normal(size=(3, 8)).astype(np.float32)
  shape = (3, 8) if form == "nc" else (3, 1, 1, 8)
  y = gnorm.group_norm({"gamma": gamma.reshape(shape), "beta": beta.reshape(shape)}, x, 2)
  assert _err(y, group_norm_ref_full(x, 2, gamma, beta)) <= 1e-5
  for i in range(3):  # equals normalising each sample with its own params
    yi = gnorm.group_norm({"gamma": gamma[i], "beta": beta[i]}, x[i:i + 1], 2)
    np.testing.assert_allclose(y[i:i + 1], yi, atol=1e-6)


def test_per_sample_params_channels_first_and_gradients():
  x = _rand((2, 8, 3, 3), 10)
  rng = np.random.default_rng(10)
  gamma = rng.normal(size=(2, 8)).astype(np.float32)
  beta = rng.normal(size=(2, 8)).astype(np.float32)
  params = {"gamma": gamma, "beta": beta}
  y = gnorm.group_norm(params, x, 4, channel_axis=1)
  assert _err(y, group_norm_ref_full(x, 4, gamma, beta, channel_axis=1)) <= 1e-5
  ct = rng.normal(size=x.shape).astype(np.float32)
  g = jax.grad(lambda p: jnp.sum(gnorm.group_norm(p, x, 4, channel_axis=1) * ct))(params)
  xhat = group_norm_ref_full(x, 4, channel_axis=1)
  np.testing.assert_allclose(g["beta"], ct.sum(axis=(2, 3)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g["gamma"], (ct * xhat).sum(axis=(2, 3)), rtol=1e-4, atol=1e-4)


# --- everything together, under every transformation --------------------------------


def _all_options(p, x, mask):
  return gnorm.group_norm(p, x, group_size=2, mask=mask, activation="silu")


def test_all_options_compose_and_match_reference():
  x, mask = _padded(11)
  rng = np.random.default_rng(11)
  gamma = rng.normal(size=(3, 8)).astype(np.float32)
  beta = rng.normal(size=8).astype(np.float32)
  params = {"gamma": gamma, "beta": beta}
  y = jax.jit(_all_options)(params, x, mask)
  ref = group_norm_ref_full(x, 4, gamma, beta, mask=mask, activation="silu")
  assert _err(y, ref) <= 1e-5
  # vmap over an extra leading axis equals a loop.
  xs = np.stack([x, x[::-1] * 2])
  ms = np.stack([mask, mask[::-1]])
  batched = jax.vmap(lambda x, m: _all_options(params, x, m))(xs, ms)
  for i in range(2):
    np.testing.assert_allclose(batched[i], _all_options(params, xs[i], ms[i]), atol=1e-6)


def test_all_options_second_order_gradients(x64):
  x, mask = _padded(12)
  x = x.astype(np.float64)
  rng = np.random.default_rng(12)
  params = {"gamma": rng.normal(size=(3, 8)), "beta": rng.normal(size=8)}
  check_grads(lambda p, x: _all_options(p, x, mask), (params, x), order=2,
              modes=("fwd", "rev"))
