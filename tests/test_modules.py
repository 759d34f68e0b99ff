"""Tests for ``gnorm.GroupNorm``, the flax.linen module."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm

C = 8
X_SHAPE = (2, 3, 3, C)


def _ref(x, n_groups, gamma, beta, eps=1e-5, channel_axis=-1):
  """Float64 NumPy Group Normalization, written the plain way."""
  x = np.moveaxis(np.asarray(x, np.float64), channel_axis, -1)
  n, c = x.shape[0], x.shape[-1]
  g = x.reshape(n, -1, n_groups, c // n_groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  gamma = np.asarray(gamma, np.float64).reshape(-1)
  y = y * gamma + np.asarray(beta, np.float64).reshape(-1)
  return np.moveaxis(y, -1, channel_axis)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(0), X_SHAPE) * 3.0 + 1.0


def _params(layer, x, key=1):
  return layer.init(jax.random.key(key), x)["params"]


# --- parameters and outputs ---------------------------------------------------


def test_default_params_and_output_match_reference(x):
  layer = gnorm.GroupNorm(4)
  params = _params(layer, x)
  assert set(params) == {"gamma", "beta"}
  assert params["gamma"].shape == params["beta"].shape == (C,)
  assert params["gamma"].dtype == jnp.float32
  np.testing.assert_array_equal(params["gamma"], np.ones(C))
  np.testing.assert_array_equal(params["beta"], np.zeros(C))
  y = layer.apply({"params": params}, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, _ref(x, 4, np.ones(C), np.zeros(C)), atol=1e-5)


@pytest.mark.parametrize("n_groups,eps", [(1, 1e-5), (2, 1e-3), (8, 0.0)])
def test_matches_reference_with_values(x, n_groups, eps):
  gamma = np.linspace(0.5, 2.0, C)
  beta = np.linspace(-1.0, 1.0, C)
  layer = gnorm.GroupNorm(n_groups, gamma=gamma, beta=beta, epsilon=eps)
  y = layer.apply({"params": _params(layer, x)}, x)
  np.testing.assert_allclose(y, _ref(x, n_groups, gamma, beta, eps),
                             rtol=1e-5, atol=1e-5)


def test_channels_first(x):
  xc = jnp.moveaxis(x, -1, 1)  # NCHW
  gamma = np.arange(1.0, C + 1)
  layer = gnorm.GroupNorm(2, gamma=gamma, channel_axis=1)
  params = _params(layer, xc)
  assert params["gamma"].shape == (C,)
  y = layer.apply({"params": params}, xc)
  np.testing.assert_allclose(y, _ref(xc, 2, gamma, np.zeros(C), channel_axis=1),
                             rtol=1e-5, atol=1e-5)


def test_param_dtype_and_input_dtype(x):
  layer = gnorm.GroupNorm(4, param_dtype=jnp.bfloat16)
  params = _params(layer, x)
  assert params["gamma"].dtype == params["beta"].dtype == jnp.bfloat16
  y = layer.apply({"params": params}, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16


def test_positional_fields_follow_the_seed():
  layer = gnorm.GroupNorm(4, 2.0, 0.5, 1e-3, "norm")
  assert (layer.n_groups, layer.gamma, layer.beta, layer.epsilon, layer.name) == (
      4, 2.0, 0.5, 1e-3, "norm")
  assert layer.channel_axis == -1 and layer.param_dtype == jnp.float32
  with pytest.raises(TypeError):
    gnorm.GroupNorm(4, 1.0, 0.0, 1e-5, None, -1)  # options are keyword-only


def test_grads_match_pure_function(x):
  gamma = np.linspace(0.5, 2.0, C).astype(np.float32)
  beta = np.linspace(-1.0, 1.0, C).astype(np.float32)
  layer = gnorm.GroupNorm(4, gamma=gamma, beta=beta)
  params = _params(layer, x)

  def loss_module(p, x):
    return jnp.sum(jnp.sin(layer.apply({"params": p}, x)))

  def loss_function(p, x):
    return jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4)))

  gm = jax.grad(loss_module, argnums=(0, 1))(params, x)
  gf = jax.grad(loss_function, argnums=(0, 1))(
      {"gamma": jnp.asarray(gamma), "beta": jnp.asarray(beta)}, x)
  for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(gf), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --- every accepted form of gamma / beta ------------------------------------


def _gamma_after_init(gamma, x, **kw):
  layer = gnorm.GroupNorm(4, gamma=gamma, **kw)
  params = _params(layer, x, key=7)
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, _ref(x, 4, params["gamma"], params["beta"]),
                             rtol=1e-5, atol=1e-5)
  return np.asarray(params["gamma"])


VALUES = np.arange(1.0, C + 1)


@pytest.mark.parametrize("gamma,expected", [
    (2.0, np.full(C, 2.0)),
    (3, np.full(C, 3.0)),
    (np.float32(0.5), np.full(C, 0.5)),
    (jnp.array(1.5), np.full(C, 1.5)),
    (list(VALUES), VALUES),
    (tuple(VALUES), VALUES),
    (VALUES, VALUES),
    (VALUES.reshape(1, 1, 1, C), VALUES),  # the seed's shape
    (jnp.asarray(VALUES), VALUES),
    (jnp.asarray(VALUES).reshape(1, 1, 1, C), VALUES),
    (gnorm.init.Constant(0.25), np.full(C, 0.25)),
    (gnorm.init.Constant(), np.zeros(C)),  # the seed's default value 0
    (jax.nn.initializers.ones, np.ones(C)),
    (jax.nn.initializers.constant(-2.0), np.full(C, -2.0)),
], ids=lambda v: type(v).__name__)
def test_gamma_forms(x, gamma, expected):
  np.testing.assert_allclose(_gamma_after_init(gamma, x), expected)


def test_beta_forms(x):
  for beta, expected in [(0.5, np.full(C, 0.5)), (VALUES, VALUES),
                         (VALUES.reshape(1, 1, 1, C), VALUES),
                         (gnorm.init.Constant(1.0), np.ones(C))]:
    layer = gnorm.GroupNorm(4, beta=beta)
    params = _params(layer, x)
    np.testing.assert_allclose(params["beta"], expected)


@pytest.mark.parametrize("init", [
    gnorm.init.Normal(), gnorm.init.Normal(1.0, 0.02), gnorm.init.Uniform(),
    gnorm.init.Uniform(-1.0, 1.0),
    pytest.param(jax.nn.initializers.normal(0.1), id="jax.nn.initializers.normal(0.1)"),
], ids=repr)
def test_random_initializers(x, init):
  layer = gnorm.GroupNorm(4, gamma=init, beta=init)
  p1 = _params(layer, x, key=3)
  p2 = _params(layer, x, key=3)
  p3 = _params(layer, x, key=4)
  np.testing.assert_array_equal(p1["gamma"], p2["gamma"])  # deterministic
  assert not np.array_equal(p1["gamma"], p3["gamma"])  # depends on the key
  assert not np.array_equal(p1["gamma"], p1["beta"])  # independent draws
  if isinstance(init, gnorm.init.Uniform):
    assert np.all(p1["gamma"] >= init.minval) and np.all(p1["gamma"] < init.maxval)


def test_none_means_no_parameter(x):
  layer = gnorm.GroupNorm(4, gamma=None, beta=0.5)
  params = _params(layer, x)
  assert set(params) == {"beta"}
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, _ref(x, 4, np.ones(C), np.full(C, 0.5)), atol=1e-5)
  assert gnorm.GroupNorm(4, gamma=None, beta=None).init(jax.random.key(0), x) == {}


@pytest.mark.parametrize("gamma,given", [
    (np.ones(3), 3),
    ([1.0] * 16, 16),
    (np.ones((1, 1, 1, 5)), 5),
    (nn.initializers.ones_init(), None),  # fine: the initializer gets (C,)
])
def test_wrong_size_fails_at_init_naming_both_sizes(x, gamma, given):
  layer = gnorm.GroupNorm(4, gamma=gamma)  # the size is unknown until init
  if given is None:
    assert _params(layer, x)["gamma"].shape == (C,)
    return
  with pytest.raises(ValueError, match=rf"gamma has {given} value.*{C} channels"):
    _params(layer, x)


def test_initializer_returning_wrong_size():
  layer = gnorm.GroupNorm(2, beta=lambda key, shape, dtype: jnp.zeros((3,), dtype))
  with pytest.raises(ValueError,
                     match=r"beta has 3 value.*returned shape \(3,\).*4 channels"):
    layer.init(jax.random.key(0), jnp.ones((1, 4)))


@pytest.mark.parametrize("gamma,error", [
    ("ones", TypeError), (True, TypeError), ({"a": 1}, TypeError),
    (np.array(["a", "b"]), TypeError), (np.ones((2, 4)), ValueError),
])
def test_bad_gamma_fails_at_construction(gamma, error):
  with pytest.raises(error, match="gamma"):
    gnorm.GroupNorm(2, gamma=gamma)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"n_groups": 0}, ValueError, "n_groups.*0"),
    ({"n_groups": -2}, ValueError, "n_groups.*-2"),
    ({"n_groups": 2.0}, TypeError, "n_groups.*2.0"),
    ({"n_groups": True}, TypeError, "n_groups.*True"),
    ({"n_groups": 2, "epsilon": -1.0}, ValueError, "eps.*-1.0"),
    ({"n_groups": 2, "epsilon": "small"}, TypeError, "eps.*small"),
    ({"n_groups": 2, "channel_axis": 1.0}, TypeError, "channel_axis.*1.0"),
    ({"n_groups": 2, "param_dtype": jnp.int32}, TypeError, "param_dtype.*int32"),
    ({"n_groups": 2, "param_dtype": "nope"}, TypeError, "param_dtype.*nope"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    gnorm.GroupNorm(**kwargs)


def test_input_errors_at_call():
  with pytest.raises(ValueError, match=r"Cannot divide 6 input channels into 4 groups"):
    gnorm.GroupNorm(4).init(jax.random.key(0), jnp.ones((2, 6)))
  with pytest.raises(ValueError, match=r"rank >= 2.*\(6,\)"):
    gnorm.GroupNorm(2).init(jax.random.key(0), jnp.ones((6,)))
  with pytest.raises(ValueError, match="channel_axis 4 is out of range"):
    gnorm.GroupNorm(2, channel_axis=4).init(jax.random.key(0), jnp.ones((2, 6)))


def test_apply_checks_stored_param_shape(x):
  params = _params(gnorm.GroupNorm(4), x)
  with pytest.raises(Exception, match="gamma"):
    gnorm.GroupNorm(4).apply({"params": params}, jnp.ones((2, 16)))


# --- the seed's methods -------------------------------------------------------


def test_get_output_shape():
  layer = gnorm.GroupNorm(4)
  assert layer.get_output_shape((None, 28, 28, 16)) == (None, 28, 28, 16)
  assert layer.get_output_shape([2, 16]) == (2, 16)
  assert layer.get_output_shape((None, None, None, None)) == (None,) * 4
  assert layer.get_output_shape(None) is None
  nchw = gnorm.GroupNorm(4, channel_axis=1)
  assert nchw.get_output_shape((1, 8, 5, 5)) == (1, 8, 5, 5)
  # The seed's two errors: wrong rank and channels not divisible by groups.
  with pytest.raises(ValueError, match=r"rank >= 2.*\(16,\)"):
    layer.get_output_shape((16,))
  with pytest.raises(ValueError, match=r"Cannot divide 10 input channels into 4"):
    layer.get_output_shape((None, 28, 28, 10))
  with pytest.raises(ValueError, match=r"Cannot divide 6 input channels into 4 groups"):
    gnorm.GroupNorm(4, channel_axis=1).get_output_shape((None, 6, 28, 28))
  with pytest.raises(TypeError, match="input_shape"):
    layer.get_output_shape((None, "a"))


def test_create_variables_deterministic_without_key():
  layer = gnorm.GroupNorm(4, gamma=VALUES, beta=0.5)
  v = layer.create_variables((None, 5, 5, C))
  assert set(v) == {"gamma", "beta"}
  np.testing.assert_array_equal(v["gamma"], VALUES)
  np.testing.assert_array_equal(v["beta"], np.full(C, 0.5))
  v1 = gnorm.GroupNorm(2, channel_axis=1).create_variables((None, 6, None))
  assert v1["gamma"].shape == (6,)


def test_create_variables_equals_init(x):
  layer = gnorm.GroupNorm(4, gamma=gnorm.init.Normal(1.0, 0.1),
                          beta=gnorm.init.Uniform())
  key = jax.random.key(5)
  v = layer.create_variables(x.shape, key=key)
  p = layer.init(key, x)["params"]
  for name in ("gamma", "beta"):
    np.testing.assert_array_equal(v[name], p[name])
  v_int = layer.create_variables(x.shape, key=5)
  np.testing.assert_array_equal(v_int["gamma"], v["gamma"])


def test_create_variables_errors():
  with pytest.raises(ValueError, match="gamma.*key"):
    gnorm.GroupNorm(2, gamma=gnorm.init.Normal()).create_variables((1, 4))
  with pytest.raises(ValueError, match="gamma and beta.*key"):
    gnorm.GroupNorm(2, gamma=jax.nn.initializers.ones,
                    beta=jax.nn.initializers.zeros).create_variables((1, 4))
  with pytest.raises(ValueError, match="unknown"):
    gnorm.GroupNorm(2).create_variables((1, None))
  with pytest.raises(ValueError, match="Cannot divide 5 input channels into 2 groups"):
    gnorm.GroupNorm(2).create_variables((1, 5))
  with pytest.raises(ValueError, match="gamma has 3 value.*4 channels"):
    gnorm.GroupNorm(2, gamma=[1.0, 2.0, 3.0]).create_variables((1, 4))


# --- the seed's CNN -------------------------------------------------------------


class _SeedCNN(nn.Module):
  """Convolution((3, 3, 16)) >> GroupNorm(4) >> Relu(), twice, then Softmax(10)."""

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.Conv(16, (3, 3), padding="VALID")(x)
      x = nn.relu(gnorm.GroupNorm(4, name="gn{}")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def test_seed_cnn_has_94714_parameters():
  x = jnp.ones((1, 28, 28, 1))
  params = jax.eval_shape(_SeedCNN().init, jax.random.key(0), x)["params"]
  sizes = {k: sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v))
           for k, v in params.items()}
  assert sizes == {"Conv_0": 160, "gn1": 32, "Conv_1": 2320, "gn2": 32,
                   "Dense_0": 92170}
  assert sum(sizes.values()) == 94714
  assert jax.eval_shape(_SeedCNN().apply, {"params": params}, x).shape == (1, 10)
