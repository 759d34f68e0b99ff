"""Tests for ``gnorm.init`` and the rules that turn gamma/beta into parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm
from gnorm._src import initializers


def test_seed_defaults():
  assert gnorm.init.Constant() == gnorm.init.Constant(value=0.0)
  assert (gnorm.init.Normal().mean, gnorm.init.Normal().std) == (0.0, 0.01)
  assert (gnorm.init.Uniform().minval, gnorm.init.Uniform().maxval) == (0.0, 1.0)


def test_constant():
  out = gnorm.init.Constant(2.5)(jax.random.key(0), (2, 3), jnp.bfloat16)
  assert out.shape == (2, 3) and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((2, 3), 2.5))
  # The key is ignored, so None works too.
  np.testing.assert_array_equal(gnorm.init.Constant(1.0)(None, (3,)), np.ones(3))


def test_normal_statistics_and_determinism():
  init = gnorm.init.Normal(mean=2.0, std=0.5)
  a = init(jax.random.key(0), (20000,))
  assert a.dtype == jnp.float32
  assert abs(float(a.mean()) - 2.0) < 0.02 and abs(float(a.std()) - 0.5) < 0.02
  np.testing.assert_array_equal(a, init(jax.random.key(0), (20000,)))
  assert not np.array_equal(a, init(jax.random.key(1), (20000,)))


def test_uniform_bounds():
  a = gnorm.init.Uniform(-2.0, -1.0)(jax.random.key(0), (5000,), jnp.float32)
  assert float(a.min()) >= -2.0 and float(a.max()) < -1.0
  assert abs(float(a.mean()) + 1.5) < 0.02


def test_frozen_hashable_and_usable_as_flax_initializers():
  init = gnorm.init.Normal(0.0, 0.1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    init.std = 1.0
  assert hash(init) == hash(gnorm.init.Normal(0.0, 0.1))
  # The jax.nn.initializers signature, so they work in any Flax layer.
  params = nn.Dense(3, kernel_init=init, bias_init=gnorm.init.Constant(0.5)).init(
      jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert params["kernel"].shape == (4, 3)
  np.testing.assert_array_equal(params["bias"], np.full(3, 0.5))


def test_needs_key():
  assert not initializers.needs_key(1.0)
  assert not initializers.needs_key(np.ones(3))
  assert not initializers.needs_key(None)
  assert not initializers.needs_key(gnorm.init.Constant(1.0))
  assert initializers.needs_key(gnorm.init.Normal())
  assert initializers.needs_key(gnorm.init.Uniform())
  assert initializers.needs_key(jax.nn.initializers.zeros)  # unknown: maybe


def test_resolve_shapes():
  key = jax.random.key(0)
  assert initializers.resolve("gamma", None) is None
  np.testing.assert_array_equal(initializers.resolve("gamma", 2)(key, (3,)), [2, 2, 2])
  out = initializers.resolve("gamma", np.arange(3.0).reshape(1, 1, 1, 3))(key, (3,))
  assert out.shape == (3,) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, [0.0, 1.0, 2.0])
  out = initializers.resolve("beta", [1, 2, 3])(key, (3,), jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  # A user initializer returning the seed's broadcast shape is flattened.
  seed_like = lambda k, s, d: jnp.ones((1, 1, 1) + tuple(s), d)  # noqa: E731
  assert initializers.resolve("gamma", seed_like)(key, (4,)).shape == (4,)


def test_resolve_errors_name_both_sizes():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"beta has 2 value.*\(2,\).*5 channels.*\(5,\)"):
    initializers.resolve("beta", [1.0, 2.0])(key, (5,))
  with pytest.raises(ValueError, match=r"gamma has 6 value.*returned shape \(2, 3\)"):
    initializers.resolve("gamma", lambda k, s, d: jnp.ones((2, 3), d))(key, (6,))


@pytest.mark.parametrize("value,error", [
    ("1.0", TypeError), (b"x", TypeError), (True, TypeError),
    (np.bool_(True), TypeError),
    (object(), TypeError), ([1.0, "a"], TypeError), (np.ones(3, complex), TypeError),
    (np.ones((2, 2)), ValueError), ([[1.0, 2.0], [3.0, 4.0]], ValueError),
])
def test_check_value_rejects(value, error):
  with pytest.raises(error, match="gamma"):
    initializers.check_value("gamma", value)
