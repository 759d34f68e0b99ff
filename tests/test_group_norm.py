"""Tests of ``gnorm.group_norm`` against an independent float64 NumPy reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import gnorm
from tests.reference import group_norm_ref
from tests.reference import naive_jnp

F32_EPS = float(np.finfo(np.float32).eps)

# One compilation per shape instead of one per primitive: keeps the suite fast.
_jgn = jax.jit(gnorm.group_norm, static_argnames=("n_groups", "eps", "channel_axis"))

# (shape, channel_axis, n_groups): ranks 2 to 5, channels-last, channels-first
# and a channel axis in the middle; one group, C groups and in between.
LAYOUTS = [
    ((4, 12), -1, 3),
    ((4, 12), 1, 12),
    ((3, 7, 16), -1, 4),
    ((3, 16, 7), 1, 8),
    ((2, 5, 6, 8), -1, 1),
    ((2, 5, 6, 8), -1, 4),
    ((2, 5, 6, 8), -1, 8),
    ((2, 8, 5, 6), 1, 2),
    ((2, 5, 8, 6), 2, 4),
    ((2, 3, 4, 5, 16), -1, 4),
    ((2, 16, 3, 4, 5), 1, 16),
]


def _data(shape, channel_axis, loc=0.0, scale=1.0, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  c = shape[channel_axis]
  x = (rng.normal(size=shape) * scale + loc).astype(dtype)
  gamma = rng.uniform(0.5, 1.5, size=c).astype(np.float32)
  beta = rng.uniform(-1.0, 1.0, size=c).astype(np.float32)
  return x, gamma, beta


def _err(y, ref):
  return float(np.max(np.abs(np.asarray(y, np.float64) - ref)))


@pytest.mark.parametrize("shape,channel_axis,n_groups", LAYOUTS)
def test_float32_matches_reference_on_standard_normal(shape, channel_axis, n_groups):
  x, gamma, beta = _data(shape, channel_axis)
  y = gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups,
                       channel_axis=channel_axis)
  assert y.shape == x.shape and y.dtype == jnp.float32
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  assert _err(y, ref) <= 1e-5


@pytest.mark.parametrize("shape,channel_axis,n_groups", LAYOUTS)
def test_float32_large_mean_keeps_its_digits(shape, channel_axis, n_groups):
  # N(100, 3^2): E[x^2] - E[x]^2 loses about 3e-2 here (flax's default).
  x, gamma, beta = _data(shape, channel_axis, loc=100.0, scale=3.0, seed=1)
  y = gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups,
                       channel_axis=channel_axis)
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  assert _err(y, ref) <= 1e-4


def _one_pass_float32(x, n_groups, eps):
  """What a one-pass E[x^2] - E[x]^2 implementation computes in float32."""
  n, c = x.shape[0], x.shape[-1]
  xg = x.astype(np.float32).reshape(n, -1, n_groups, c // n_groups)
  mean = xg.mean(axis=(1, 3), keepdims=True, dtype=np.float32)
  meansq = (xg * xg).mean(axis=(1, 3), keepdims=True, dtype=np.float32)
  var = np.maximum(meansq - mean * mean, 0)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_catches_a_regression_to_one_pass_variance():
  # pytorch#40302: randn * 0.01 + 100 has zero one-pass variance in float32.
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(4, 16, 16, 32)) * 0.01 + 100).astype(np.float32)
  ref = group_norm_ref(x, 8, eps=1e-5)
  # The data does tell the two formulas apart: one pass is far off ...
  assert _err(_one_pass_float32(x, 8, 1e-5), ref) > 0.1
  # ... while gnorm is limited only by float32 rounding of the mean,
  # about ulp(100) / std = 7.6e-6 / 0.01.
  assert _err(gnorm.group_norm(None, x, 8), ref) <= 2e-3


def test_float16_near_300_does_not_overflow():
  # x^2 ~ 9e4 overflows float16 (max 65504): statistics must be float32.
  x, gamma, beta = _data((2, 6, 6, 16), -1, loc=300.0, scale=2.0, seed=3,
                         dtype=np.float16)
  y = gnorm.group_norm({"gamma": gamma, "beta": beta}, x, 4)
  assert y.dtype == jnp.float16
  ref = group_norm_ref(x, 4, gamma, beta)
  assert np.all(np.isfinite(np.asarray(y)))
  # One float16 rounding of the output (half an ulp, 2^-11 relative) plus
  # float32 arithmetic.
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= 2.0**-11 * np.abs(ref) + 1e-4), err.max()


@pytest.mark.parametrize("dtype,rel", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)])
@pytest.mark.parametrize("shape,channel_axis,n_groups", LAYOUTS[::2])
def test_half_precision_is_one_rounding_from_reference(
    dtype, rel, shape, channel_axis, n_groups):
  x, gamma, beta = _data(shape, channel_axis, seed=4)
  x = jnp.asarray(x, dtype)
  y = gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups,
                       channel_axis=channel_axis)
  assert y.dtype == dtype
  ref = group_norm_ref(np.asarray(x, np.float64), n_groups, gamma, beta, 1e-5,
                       channel_axis)
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= rel * np.abs(ref) + 1e-5), err.max()


@pytest.mark.parametrize("shape,channel_axis,n_groups", LAYOUTS)
def test_float64_stays_float64(x64, shape, channel_axis, n_groups):
  x, gamma, beta = _data(shape, channel_axis, loc=50.0, seed=5, dtype=np.float64)
  y = gnorm.group_norm({"gamma": gamma.astype(np.float64),
                        "beta": beta.astype(np.float64)}, x, n_groups,
                       channel_axis=channel_axis)
  assert y.dtype == jnp.float64
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  assert _err(y, ref) <= 1e-12


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_])
def test_integer_and_bool_input_is_promoted_to_float32(dtype):
  rng = np.random.default_rng(6)
  x = rng.integers(0, 2 if dtype == np.bool_ else 100, size=(2, 5, 8)).astype(dtype)
  y = gnorm.group_norm(None, x, 2)
  assert y.dtype == jnp.float32
  assert _err(y, group_norm_ref(x.astype(np.float64), 2)) <= 1e-5


def test_param_forms_are_equivalent():
  x, gamma, beta = _data((2, 4, 4, 8), -1, seed=7)
  ref = group_norm_ref(x, 2, gamma, beta)
  seed_form = {"gamma": gamma.reshape(1, 1, 1, 8), "beta": beta.reshape(1, 1, 1, 8)}
  for params in ({"gamma": gamma, "beta": beta}, seed_form,
                 {"gamma": jnp.asarray(gamma), "beta": list(beta)}):
    assert _err(gnorm.group_norm(params, x, 2), ref) <= 1e-5
  # Missing keys and None mean "no scale" / "no shift".
  assert _err(gnorm.group_norm({"gamma": gamma}, x, 2),
              group_norm_ref(x, 2, gamma)) <= 1e-5
  assert _err(gnorm.group_norm({"beta": beta}, x, 2),
              group_norm_ref(x, 2, beta=beta)) <= 1e-5
  assert _err(gnorm.group_norm({}, x, 2), group_norm_ref(x, 2)) <= 1e-5
  assert _err(gnorm.group_norm(None, x, 2), group_norm_ref(x, 2)) <= 1e-5
  # A scalar applies to every channel.
  assert _err(gnorm.group_norm({"gamma": 2.0, "beta": -1.0}, x, 2),
              group_norm_ref(x, 2, np.full(8, 2.0), np.full(8, -1.0))) <= 2e-5


def test_channels_first_seed_form_params():
  x, gamma, beta = _data((2, 8, 3, 5), 1, seed=8)
  y = gnorm.group_norm({"gamma": gamma.reshape(1, 8, 1, 1),
                        "beta": beta.reshape(8, 1, 1)}, x, 4, channel_axis=1)
  assert _err(y, group_norm_ref(x, 4, gamma, beta, 1e-5, 1)) <= 1e-5


def test_single_element_groups_give_beta_and_finite_gradients():
  x, gamma, beta = _data((3, 6), -1, seed=9)
  params = {"gamma": gamma, "beta": beta}
  y = gnorm.group_norm(params, x, 6)  # every group is one number
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(beta, (3, 6)))
  grads = jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(p, x, 6) ** 3),
                   argnums=(0, 1))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("value", [0.0, 7.25, -1e4])
def test_constant_input_gives_exactly_beta_and_finite_gradients(value):
  _, gamma, beta = _data((2, 3, 3, 8), -1, seed=10)
  x = jnp.full((2, 3, 3, 8), value, jnp.float32)
  params = {"gamma": gamma, "beta": beta}
  y = gnorm.group_norm(params, x, 4)
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(beta, x.shape))
  ct = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
  grads = jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(p, x, 4) * ct),
                   argnums=(0, 1))(params, x)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


def test_nan_and_inf_propagate_to_their_group_only():
  x, _, _ = _data((2, 3, 8), -1, seed=11)
  x[0, 1, 2] = np.nan  # sample 0, group 1 (channels 2-3)
  x[1, 0, 7] = np.inf  # sample 1, group 3 (channels 6-7)
  y = np.asarray(gnorm.group_norm(None, x, 4))
  bad = np.zeros_like(y, bool)
  bad[0, :, 2:4] = True
  bad[1, :, 6:8] = True
  assert np.all(np.isnan(y[bad]))
  assert np.all(np.isfinite(y[~bad]))


# --- equivalences -----------------------------------------------------------


def test_one_group_is_layer_norm_over_all_but_batch():
  x, _, _ = _data((3, 5, 6, 8), -1, loc=2.0, seed=12)
  ln = nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1,
                    use_fast_variance=False, use_scale=False, use_bias=False,
                    epsilon=1e-5)
  expected = ln.apply({}, x)
  np.testing.assert_allclose(gnorm.group_norm(None, x, 1), expected, atol=2e-6)


def test_c_groups_is_instance_norm():
  x, _, _ = _data((3, 5, 6, 8), -1, loc=-3.0, seed=13)
  inorm = nn.InstanceNorm(use_fast_variance=False, use_scale=False,
                          use_bias=False, epsilon=1e-5)
  np.testing.assert_allclose(gnorm.group_norm(None, x, 8), inorm.apply({}, x),
                             atol=2e-6)


@pytest.mark.parametrize("shape,n_groups", [((2, 5, 6, 16), 4), ((3, 7, 32), 8)])
def test_matches_flax_two_pass_group_norm_channels_last(shape, n_groups):
  x, gamma, beta = _data(shape, -1, seed=14)
  flax_gn = nn.GroupNorm(num_groups=n_groups, epsilon=1e-5, use_fast_variance=False)
  expected = flax_gn.apply({"params": {"scale": gamma, "bias": beta}}, x)
  y = gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups)
  np.testing.assert_allclose(y, expected, atol=2e-6)


# --- transformations ----------------------------------------------------------


def test_jit_matches_eager_and_does_not_retrace():
  traces = []

  def f(params, x):
    traces.append(1)  # runs only while tracing
    return gnorm.group_norm(params, x, 4)

  jf = jax.jit(f)
  x, gamma, beta = _data((2, 4, 4, 16), -1, seed=15)
  params = {"gamma": gamma, "beta": beta}
  np.testing.assert_allclose(jf(params, x), gnorm.group_norm(params, x, 4),
                             atol=1e-6)
  x2, gamma2, beta2 = _data((2, 4, 4, 16), -1, seed=16)
  jf({"gamma": gamma2, "beta": beta2}, x2)
  assert len(traces) == 1


def test_jit_with_static_group_count():
  f = jax.jit(gnorm.group_norm, static_argnames=("n_groups", "eps", "channel_axis"))
  x, gamma, beta = _data((2, 8, 3, 3), 1, seed=17)
  y = f({"gamma": gamma, "beta": beta}, x, n_groups=2, channel_axis=1)
  assert _err(y, group_norm_ref(x, 2, gamma, beta, 1e-5, 1)) <= 1e-5


def test_vmap_over_an_extra_axis_equals_a_loop():
  x, gamma, beta = _data((5, 2, 4, 4, 8), -1, seed=18)  # 5 independent batches
  params = {"gamma": gamma, "beta": beta}
  batched = jax.vmap(lambda x: gnorm.group_norm(params, x, 4))(x)
  looped = np.stack([np.asarray(gnorm.group_norm(params, xi, 4)) for xi in x])
  np.testing.assert_allclose(batched, looped, atol=1e-6)


def test_vmap_over_params_and_input():
  x, _, _ = _data((3, 2, 6, 8), -1, seed=19)
  rng = np.random.default_rng(19)
  gammas = rng.normal(size=(3, 8)).astype(np.float32)
  betas = rng.normal(size=(3, 8)).astype(np.float32)
  out = jax.vmap(lambda g, b, x: gnorm.group_norm({"gamma": g, "beta": b}, x, 2))(
      gammas, betas, x)
  for i in range(3):
    assert _err(out[i], group_norm_ref(x[i], 2, gammas[i], betas[i])) <= 1e-5


@pytest.mark.parametrize("shape,channel_axis,n_groups",
                         [((2, 3, 8), -1, 4), ((2, 4, 3, 2), 1, 2), ((3, 8), -1, 2)])
def test_check_grads_second_order_fwd_and_rev(x64, shape, channel_axis, n_groups):
  x, gamma, beta = _data(shape, channel_axis, loc=1.0, seed=20, dtype=np.float64)
  params = {"gamma": gamma.astype(np.float64), "beta": beta.astype(np.float64)}
  def f(p, x):
    return gnorm.group_norm(p, x, n_groups, channel_axis=channel_axis)

  check_grads(f, (params, x), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("shape,channel_axis,n_groups",
                         [((2, 3, 8), -1, 4), ((2, 4, 3, 2), 1, 2)])
def test_derivatives_match_plain_autodiff(x64, shape, channel_axis, n_groups):
  x, gamma, beta = _data(shape, channel_axis, loc=-2.0, seed=21, dtype=np.float64)
  params = {"gamma": jnp.asarray(gamma, jnp.float64),
            "beta": jnp.asarray(beta, jnp.float64)}
  ct = jnp.asarray(np.random.default_rng(21).normal(size=shape))

  def loss(f):
    return lambda p, x: jnp.sum(jnp.tanh(f(p, x, n_groups, channel_axis=channel_axis)) * ct)

  ours, naive = loss(gnorm.group_norm), loss(naive_jnp)

  def all_derivatives(f):
    return (jax.grad(f, argnums=(0, 1))(params, x),
            jax.jacfwd(f, argnums=1)(params, x),
            jax.hessian(f, argnums=1)(params, x),
            jax.hessian(f, argnums=0)(params, x))

  for a, b in zip(jax.jit(lambda: all_derivatives(ours))(),
                  jax.jit(lambda: all_derivatives(naive))(), strict=True):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                    strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-9)
  # Forward mode on its own.
  tx = jnp.asarray(np.random.default_rng(22).normal(size=shape))
  tp = jax.tree_util.tree_map(jnp.ones_like, params)
  _, t_ours = jax.jvp(lambda p, x: gnorm.group_norm(p, x, n_groups, channel_axis=channel_axis),
                      (params, x), (tp, tx))
  _, t_naive = jax.jvp(lambda p, x: naive_jnp(p, x, n_groups, channel_axis=channel_axis),
                       (params, x), (tp, tx))
  np.testing.assert_allclose(t_ours, t_naive, rtol=1e-9, atol=1e-9)


def test_float32_gradients_match_float64_plain_autodiff(x64):
  x, gamma, beta = _data((2, 6, 6, 16), -1, loc=100.0, scale=3.0, seed=23)
  ct = np.random.default_rng(23).normal(size=x.shape).astype(np.float32)
  params = {"gamma": gamma, "beta": beta}
  g32 = jax.jit(jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(p, x, 4) * ct),
                         argnums=(0, 1)))(params, x)
  assert g32[1].dtype == jnp.float32
  p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
  g64 = jax.jit(jax.grad(
      lambda p, x: jnp.sum(naive_jnp(p, x, 4) * ct.astype(np.float64)),
      argnums=(0, 1)))(p64, jnp.asarray(x, jnp.float64))
  # Gradient w.r.t. x, scaled by rstd ~ 1/3; w.r.t. gamma and beta summed
  # over 2 * 36 positions.
  np.testing.assert_allclose(g32[1], g64[1], atol=2e-5)
  np.testing.assert_allclose(g32[0]["gamma"], g64[0]["gamma"], atol=2e-4)
  np.testing.assert_allclose(g32[0]["beta"], g64[0]["beta"], atol=2e-4)


def test_backward_keeps_only_x_and_group_statistics():
  x = jnp.asarray(_data((2, 8, 8, 32), -1, seed=24)[0], jnp.bfloat16)
  params = {"gamma": jnp.ones(32), "beta": jnp.zeros(32)}
  _, vjp_fn = jax.vjp(lambda p, x: gnorm.group_norm(p, x, 8), params, x)
  leaves = jax.tree_util.tree_leaves(vjp_fn)
  big = [leaf for leaf in leaves if leaf.size >= x.size]
  assert len(big) == 1 and big[0].dtype == jnp.bfloat16, [
      (leaf.shape, leaf.dtype) for leaf in leaves]
  small = [leaf for leaf in leaves if leaf.size < x.size]
  # gamma, then the per-(N, G) mean and rstd.
  assert all(leaf.size <= 2 * 8 or leaf.size == 32 for leaf in small), [
      (leaf.shape, leaf.dtype) for leaf in small]


# --- property test --------------------------------------------------------------


@st.composite
def _cases(draw):
  rank = draw(st.integers(2, 5))
  n = draw(st.integers(1, 3))
  n_groups = draw(st.integers(1, 4))
  c = n_groups * draw(st.integers(1, 4))
  spatial = [draw(st.integers(1, 5)) for _ in range(rank - 2)]
  channel_axis = draw(st.integers(1, rank - 1))
  shape = [n, *spatial]
  shape.insert(channel_axis, c)
  offset = draw(st.floats(-1e3, 1e3))
  scale = draw(st.floats(1e-2, 1e2))
  seed = draw(st.integers(0, 2**31 - 1))
  return tuple(shape), channel_axis, n_groups, offset, scale, seed


@settings(max_examples=40, deadline=None)
@given(_cases())
def test_property_matches_reference(case):
  shape, channel_axis, n_groups, offset, scale, seed = case
  x, gamma, beta = _data(shape, channel_axis, loc=offset, scale=scale, seed=seed)
  y = np.asarray(_jgn({"gamma": gamma, "beta": beta}, x, n_groups=n_groups,
                      channel_axis=channel_axis), np.float64)
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  # docs/accuracy.md's bounds, scaled to the data's spread: float32 holds 1e-5 where
  # max|x| / std is about 4 (N(0, 1)), and 1e-4 at N(100, 3^2), where it is
  # about 37: the group mean's rounding, eps32 * max|x|, times rstd. So the
  # bound is 1e-5 * max(1, max|x| * rstd / 4) per (sample, group).
  xl = np.moveaxis(x.astype(np.float64), channel_axis, -1)
  xg = xl.reshape(shape[0], -1, n_groups, xl.shape[-1] // n_groups)
  rstd = 1 / np.sqrt(xg.var(axis=(1, 3)) + 1e-5)  # (N, G)
  amax = np.abs(xg).max(axis=(1, 3))
  tol_ng = 1e-5 * np.maximum(1.0, amax * rstd / 4)
  tol = np.moveaxis(np.broadcast_to(
      np.repeat(tol_ng, xl.shape[-1] // n_groups, axis=1)[:, None, :],
      (shape[0], xg.shape[1], xl.shape[-1])).reshape(xl.shape), -1, channel_axis)
  assert np.all(np.abs(y - ref) <= tol), np.max(np.abs(y - ref) - tol)
