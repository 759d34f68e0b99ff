"""Tests for porting GroupNorm weights from other frameworks (without them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm

C = 6
W = np.linspace(0.5, 1.5, C).astype(np.float32)
B = np.linspace(-0.3, 0.3, C).astype(np.float32)


class FakeTorchTensor:
  """What the porting code may touch of a torch.Tensor (on a GPU, with grad)."""

  def __init__(self, array):
    self._array = np.asarray(array)
    self.calls = []

  def detach(self):
    self.calls.append("detach")
    return self

  def cpu(self):
    self.calls.append("cpu")
    return self

  def numpy(self):
    self.calls.append("numpy")
    return self._array

  def __array__(self, dtype=None, copy=None):
    raise AssertionError("a tensor that requires grad cannot be read by np.asarray")


class FakeEquinoxGroupNorm:
  def __init__(self, weight, bias):
    self.weight, self.bias = weight, bias
    self.groups, self.eps = 2, 1e-5


def _torch_reference(x_nchw, groups, weight, bias, eps):
  """torch.nn.functional.group_norm written out in float64 (NCHW)."""
  x = np.asarray(x_nchw, np.float64)
  n, c = x.shape[:2]
  g = x.reshape(n, groups, -1)
  y = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  y = y.reshape(x.shape)
  shape = (1, c) + (1,) * (x.ndim - 2)
  return y * weight.reshape(shape) + bias.reshape(shape)


def _check(params, w=W, b=B):
  assert set(params) == {"gamma", "beta"}
  for got, want in ((params["gamma"], w), (params["beta"], b)):
    assert isinstance(got, jax.Array) and got.shape == (C,)
    np.testing.assert_array_equal(got, want)


def _installed_default_epsilons():
  """Each framework's GroupNorm default, read from the installed package.

  flax is always installed (gnorm depends on it); torch, haiku, equinox and
  keras are read where installed (``pip install -e ".[bench]"`` adds the
  first three). neupy is the seed's documentation: 1e-5.
  """
  import importlib.util
  import inspect

  import flax.linen
  from flax import nnx

  def default(fn, name):
    return inspect.signature(fn).parameters[name].default

  found = {
    "gnorm": default(gnorm.group_norm, "eps"),
    "flax": flax.linen.GroupNorm.epsilon,
    "flax.nnx": default(nnx.GroupNorm.__init__, "epsilon"),
  }
  if importlib.util.find_spec("torch"):
    import torch

    found["pytorch"] = default(torch.nn.GroupNorm.__init__, "eps")
  if importlib.util.find_spec("haiku"):
    import haiku

    found["haiku"] = default(haiku.GroupNorm.__init__, "eps")
  if importlib.util.find_spec("equinox"):
    import equinox

    found["equinox"] = default(equinox.nn.GroupNorm.__init__, "eps")
  if importlib.util.find_spec("keras"):
    import keras

    found["keras"] = default(keras.layers.GroupNormalization.__init__, "epsilon")
  return found


def test_default_epsilons_match_the_installed_frameworks():
  found = _installed_default_epsilons()
  assert found.pop("flax.nnx") == found["flax"]  # one entry for both flax APIs
  assert {"gnorm", "flax"} <= set(found)
  for name, eps in found.items():
    assert gnorm.DEFAULT_EPSILON[name] == eps, (name, eps)
  assert gnorm.DEFAULT_EPSILON["neupy"] == 1e-5  # the seed's documentation
  assert set(gnorm.DEFAULT_EPSILON) == {
      "gnorm", "neupy", "pytorch", "flax", "haiku", "equinox", "keras"}
  with pytest.raises(TypeError):
    gnorm.DEFAULT_EPSILON["flax"] = 1e-5  # read-only
  # The modules' default is the seed's (and PyTorch's).
  assert gnorm.GroupNorm(2).epsilon == gnorm.DEFAULT_EPSILON["pytorch"]


def test_from_pytorch_arrays_and_tensors():
  _check(gnorm.from_pytorch({"weight": W, "bias": B}))
  tensors = {"weight": FakeTorchTensor(W), "bias": FakeTorchTensor(B)}
  _check(gnorm.from_pytorch(tensors))
  assert tensors["weight"].calls == ["detach", "cpu", "numpy"]
  _check(gnorm.from_pytorch({"weight": list(W), "bias": jnp.asarray(B)}))


def test_from_pytorch_with_prefix_in_a_model_state_dict():
  sd = {"conv.weight": np.ones((C, 3, 3, 3)), "down.0.norm1.weight": W,
        "down.0.norm1.bias": B, "down.0.norm2.weight": W + 1, "down.0.norm2.bias": B}
  _check(gnorm.from_pytorch(sd, prefix="down.0.norm1."))
  _check(gnorm.from_pytorch(sd, "down.0.norm2."), w=W + 1)


def test_ported_pytorch_layer_reproduces_torch_numbers():
  x_nchw = np.asarray(jax.random.normal(jax.random.key(0), (2, C, 4, 4))) * 5 + 2
  state_dict = {"weight": FakeTorchTensor(W), "bias": FakeTorchTensor(B)}
  params = gnorm.from_pytorch(state_dict)
  eps = gnorm.DEFAULT_EPSILON["pytorch"]
  expected = _torch_reference(x_nchw, 3, W, B, eps)
  np.testing.assert_allclose(
      gnorm.group_norm(params, x_nchw, 3, eps, channel_axis=1), expected,
      rtol=1e-5, atol=1e-5)
  # Through the linen module, with the ported arrays as gamma and beta.
  layer = gnorm.GroupNorm(3, params["gamma"], params["beta"], eps, channel_axis=1)
  y = layer.apply(layer.init(jax.random.key(0), x_nchw), x_nchw)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_flax_epsilon_matters():
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, C))) * 1e-3
  params = gnorm.from_flax({"scale": W, "bias": B})
  _check(params)
  eps = gnorm.DEFAULT_EPSILON["flax"]
  flax_like = _torch_reference(np.moveaxis(x, -1, 1), 2, W, B, eps)
  np.testing.assert_allclose(gnorm.group_norm(params, x, 2, eps),
                             np.moveaxis(flax_like, 1, -1), rtol=1e-4, atol=1e-4)
  # With gnorm's default epsilon instead, small-variance inputs differ visibly.
  assert not np.allclose(gnorm.group_norm(params, x, 2), np.moveaxis(flax_like, 1, -1),
                         rtol=1e-2, atol=1e-2)


def test_from_flax_without_scale_or_bias():
  assert set(gnorm.from_flax({"bias": B})) == {"beta"}
  assert set(gnorm.from_flax({"scale": W})) == {"gamma"}


def test_from_haiku_flattens_broadcast_shapes():
  _check(gnorm.from_haiku({"scale": W.reshape(1, 1, 1, C), "offset": B}))
  _check(gnorm.from_haiku({"scale": W, "offset": B.reshape(1, C)}))


def test_from_equinox_module_or_mapping():
  _check(gnorm.from_equinox(FakeEquinoxGroupNorm(W, B)))
  _check(gnorm.from_equinox({"weight": W, "bias": B}))
  assert set(gnorm.from_equinox(FakeEquinoxGroupNorm(W, None))) == {"gamma"}


def test_errors_name_the_keys():
  with pytest.raises(ValueError,
                     match=r"expected 'norm.weight'.*found keys \['weight'\]"):
    gnorm.from_pytorch({"weight": W}, prefix="norm.")
  with pytest.raises(ValueError,
                     match=r"'scale'.*'offset'.*found keys \['bias', 'w'\]"):
    gnorm.from_haiku({"bias": B, "w": W})
  with pytest.raises(ValueError, match=r"'weight' has 6 values but 'bias' has 4"):
    gnorm.from_pytorch({"weight": W, "bias": np.zeros(4)})
  with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
    gnorm.from_flax({"scale": np.ones((2, 3)), "bias": B})
  with pytest.raises(TypeError, match="real numbers"):
    gnorm.from_equinox({"weight": np.array(["a"] * C), "bias": B})
  with pytest.raises(TypeError, match="mapping"):
    gnorm.from_flax([W, B])
