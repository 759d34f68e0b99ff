"""Tests for ``gnorm.nnx.GroupNorm`` against the linen module and the function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gnorm

C = 8
GAMMA = np.linspace(0.5, 2.0, C).astype(np.float32)
BETA = np.linspace(-1.0, 1.0, C).astype(np.float32)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), (2, 3, 3, C)) * 2.0 + 0.5


def test_params_are_eager_and_named_gamma_beta():
  layer = gnorm.nnx.GroupNorm(4, C)
  assert isinstance(layer.gamma, nnx.Param) and isinstance(layer.beta, nnx.Param)
  np.testing.assert_array_equal(layer.gamma[...], np.ones(C))
  np.testing.assert_array_equal(layer.beta[...], np.zeros(C))
  state = nnx.state(layer, nnx.Param)
  assert sorted(nnx.to_pure_dict(state)) == ["beta", "gamma"]


def test_linen_nnx_and_function_agree_outputs_and_grads(x):
  linen = gnorm.GroupNorm(4, gamma=GAMMA, beta=BETA, epsilon=1e-3)
  variables = linen.init(jax.random.key(0), x)
  layer = gnorm.nnx.GroupNorm(4, C, gamma=GAMMA, beta=BETA, epsilon=1e-3)
  params = {"gamma": jnp.asarray(GAMMA), "beta": jnp.asarray(BETA)}

  def loss_function(p, x):
    return jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4, 1e-3)) * x)

  def loss_linen(p, x):
    return jnp.sum(jnp.sin(linen.apply({"params": p}, x)) * x)

  def loss_nnx(m, x):
    return jnp.sum(jnp.sin(m(x)) * x)

  y_f = gnorm.group_norm(params, x, 4, 1e-3)
  np.testing.assert_allclose(linen.apply(variables, x), y_f, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layer(x), y_f, rtol=1e-6, atol=1e-6)

  gf_p, gf_x = jax.grad(loss_function, argnums=(0, 1))(params, x)
  gl_p, gl_x = jax.grad(loss_linen, argnums=(0, 1))(variables["params"], x)
  gn_m, gn_x = nnx.grad(loss_nnx, argnums=(0, 1))(layer, x)
  for name in ("gamma", "beta"):
    np.testing.assert_allclose(gl_p[name], gf_p[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gn_m[name][...], gf_p[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gl_x, gf_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gn_x, gf_x, rtol=1e-5, atol=1e-5)


def test_same_initializers_as_linen(x):
  for gamma in (2.0, list(GAMMA), GAMMA.reshape(1, 1, 1, C), jnp.asarray(GAMMA),
                gnorm.init.Constant(3.0), jax.nn.initializers.ones):
    linen_gamma = gnorm.GroupNorm(4, gamma=gamma).init(jax.random.key(0), x)[
        "params"]["gamma"]
    # Any callable but a gnorm Constant may be random, so it needs rngs.
    layer = gnorm.nnx.GroupNorm(4, C, gamma=gamma, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.gamma[...], linen_gamma)
  with pytest.raises(ValueError, match="gamma.*may be random.*rngs"):
    gnorm.nnx.GroupNorm(4, C, gamma=jax.nn.initializers.ones)


def test_random_initializers_use_rngs():
  a = gnorm.nnx.GroupNorm(2, C, gamma=gnorm.init.Normal(1.0, 0.1),
                          beta=gnorm.init.Uniform(), rngs=nnx.Rngs(0))
  b = gnorm.nnx.GroupNorm(2, C, gamma=gnorm.init.Normal(1.0, 0.1),
                          beta=gnorm.init.Uniform(), rngs=nnx.Rngs(0))
  c = gnorm.nnx.GroupNorm(2, C, gamma=gnorm.init.Normal(1.0, 0.1), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(a.gamma[...], b.gamma[...])
  assert not np.array_equal(a.gamma[...], c.gamma[...])
  assert np.all(a.beta[...] >= 0.0) and np.all(a.beta[...] < 1.0)
  with pytest.raises(ValueError, match="gamma.*rngs"):
    gnorm.nnx.GroupNorm(2, C, gamma=gnorm.init.Normal())


def test_none_means_no_parameter(x):
  layer = gnorm.nnx.GroupNorm(4, C, gamma=None)
  assert layer.gamma is None
  assert sorted(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == ["beta"]
  np.testing.assert_allclose(layer(x), gnorm.group_norm(None, x, 4), atol=1e-6)


def test_channels_first(x):
  xc = jnp.moveaxis(x, -1, 1)
  layer = gnorm.nnx.GroupNorm(2, C, gamma=GAMMA, channel_axis=1)
  np.testing.assert_allclose(
      layer(xc), gnorm.group_norm({"gamma": GAMMA}, xc, 2, channel_axis=1), atol=1e-6)


def test_jit_vmap_split_merge(x):
  layer = gnorm.nnx.GroupNorm(4, C, gamma=GAMMA, beta=BETA)
  expected = layer(x)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), expected,
                             rtol=1e-6, atol=1e-6)

  # vmap over a stack of inputs with the module broadcast, against a loop.
  xs = jnp.stack([x, 2.0 * x + 1.0, -x])
  ys = nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(layer, xs)
  for i in range(3):
    np.testing.assert_allclose(ys[i], layer(xs[i]), rtol=1e-6, atol=1e-6)

  # vmap over a stack of modules made by a vmapped constructor.
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(g):
    return gnorm.nnx.GroupNorm(4, C, gamma=g)

  gammas = jnp.stack([jnp.asarray(GAMMA), 2.0 * jnp.asarray(GAMMA)])
  stacked = make(gammas)
  assert stacked.gamma.shape == (2, C)
  ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(stacked, x)
  for i in range(2):
    np.testing.assert_allclose(ys[i], gnorm.group_norm({"gamma": gammas[i]}, x, 4),
                               rtol=1e-6, atol=1e-6)

  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda p: p * 2.0, state)
  doubled = nnx.merge(graphdef, state)
  np.testing.assert_allclose(
      doubled(x), gnorm.group_norm({"gamma": 2 * GAMMA, "beta": 2 * BETA}, x, 4),
      rtol=1e-6, atol=1e-6)


def test_training_step_updates_params(x):
  layer = gnorm.nnx.GroupNorm(4, C)

  @nnx.jit
  def step(m, x):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
    params = nnx.state(m, nnx.Param)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))

  before = layer(x)
  step(layer, x)
  assert not np.allclose(layer.beta[...], 0.0)
  assert float(jnp.mean((layer(x) - 1.0) ** 2)) < float(jnp.mean((before - 1.0) ** 2))


def test_get_output_shape_and_errors():
  layer = gnorm.nnx.GroupNorm(4, 16)
  assert layer.get_output_shape((None, 28, 28, 16)) == (None, 28, 28, 16)
  assert layer.get_output_shape((None, 28, 28, None)) == (None, 28, 28, None)
  with pytest.raises(ValueError, match="rank >= 2"):
    layer.get_output_shape((16,))
  with pytest.raises(ValueError, match="built for 16 channels.*has 8"):
    layer.get_output_shape((None, 28, 28, 8))
  with pytest.raises(ValueError, match="built for 16 channels.*has 8"):
    layer(jnp.ones((1, 8)))


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((3, 8), {}, ValueError, r"n_groups \(3\) must divide.*\(8\)"),
    ((0, 8), {}, ValueError, "n_groups.*0"),
    ((2, 0), {}, ValueError, "num_channels.*0"),
    ((2, 8.0), {}, TypeError, "num_channels.*8.0"),
    ((2, 8), {"gamma": np.ones(3)}, ValueError, "gamma has 3 value.*8 channels"),
    ((2, 8), {"beta": "zero"}, TypeError, "beta"),
    ((2, 8), {"epsilon": -1.0}, ValueError, "eps"),
    ((2, 8), {"channel_axis": None}, TypeError, "channel_axis"),
])
def test_bad_arguments(args, kwargs, error, match):
  with pytest.raises(error, match=match):
    gnorm.nnx.GroupNorm(*args, **kwargs)
