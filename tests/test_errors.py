"""Bad input to ``gnorm.group_norm``: clear errors at trace time, naming values."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm

X = np.zeros((2, 4, 4, 8), np.float32)
SHAPE = re.escape("(2, 4, 4, 8)")


@pytest.mark.parametrize("n_groups,exc,pattern", [
    (0, ValueError, r"n_groups must be a positive int, got 0; input shape " + SHAPE),
    (-1, ValueError, r"got -1; input shape " + SHAPE),
    (2.5, TypeError, r"got 2\.5 \(type float\); input shape " + SHAPE),
    (True, TypeError, r"got True \(type bool\)"),
    ("4", TypeError, r"got '4' \(type str\)"),
    (None, ValueError, r"give exactly one of n_groups and group_size, got "
                       r"n_groups=None and group_size=None"),
    (3, ValueError, r"n_groups \(3\) must divide the number of channels \(8\); "
                    r"input shape " + SHAPE),
    (16, ValueError, r"n_groups \(16\) must divide the number of channels \(8\)"),
])
def test_bad_n_groups(n_groups, exc, pattern):
  with pytest.raises(exc, match=pattern):
    gnorm.group_norm(None, X, n_groups)


def test_numpy_integer_n_groups_is_accepted():
  y = gnorm.group_norm(None, X + np.arange(8, dtype=np.float32), np.int64(4))
  assert y.shape == X.shape


@pytest.mark.parametrize("shape", [(8,), ()])
def test_rank_below_two(shape):
  with pytest.raises(ValueError, match=r"rank >= 2.*got shape " + re.escape(str(shape))):
    gnorm.group_norm(None, np.zeros(shape, np.float32), 1)


@pytest.mark.parametrize("axis,exc,pattern", [
    (4, ValueError, r"channel_axis 4 is out of range for an input of rank 4 \(shape "
                    + SHAPE + r"\); it must be in \[-4, 3\]"),
    (-5, ValueError, r"channel_axis -5 is out of range"),
    (0, ValueError, r"channel_axis 0 is the batch axis 0 of the input of shape " + SHAPE),
    (-4, ValueError, r"channel_axis -4 is the batch axis 0"),
    (1.0, TypeError, r"channel_axis must be an int, got 1\.0 \(type float\)"),
    (None, TypeError, r"channel_axis must be an int, got None"),
])
def test_bad_channel_axis(axis, exc, pattern):
  with pytest.raises(exc, match=pattern):
    gnorm.group_norm(None, X, 2, channel_axis=axis)


@pytest.mark.parametrize("eps,exc,pattern", [
    (-1e-5, ValueError, r"eps must be a finite number >= 0, got -1e-05; input shape "
                        + SHAPE),
    (float("nan"), ValueError, r"got nan"),
    (float("inf"), ValueError, r"got inf"),
    ("1e-5", TypeError, r"eps must be a real number, got '1e-5' \(type str\)"),
    (None, TypeError, r"eps must be a real number, got None"),
    (1j, TypeError, r"eps must be a real number, got 1j"),
])
def test_bad_eps(eps, exc, pattern):
  with pytest.raises(exc, match=pattern):
    gnorm.group_norm(None, X, 2, eps)


def test_zero_eps_is_allowed():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  assert np.all(np.isfinite(np.asarray(gnorm.group_norm(None, x, 2, 0.0))))


def test_traced_eps_is_a_clear_type_error():
  with pytest.raises(TypeError, match=r"eps must be a concrete real number"):
    jax.jit(lambda e: gnorm.group_norm(None, X, 2, e))(1e-5)


@pytest.mark.parametrize("params,exc,pattern", [
    ({"gamma": np.ones(7)}, ValueError,
     r"gamma has shape \(7,\), but the input of shape " + SHAPE + r" has 8 channels"),
    ({"beta": np.ones((1, 1, 1, 4))}, ValueError, r"beta has shape \(1, 1, 1, 4\)"),
    ({"gamma": np.ones((3, 8))}, ValueError, r"gamma has shape \(3, 8\).*batch size 2"),
    ({"gamma": np.ones((1, 1, 1, 1, 8))}, ValueError, r"gamma has shape \(1, 1, 1, 1, 8\)"),
    ({"scale": np.ones(8)}, ValueError,
     r"params has unknown key\(s\) \['scale'\]; the accepted keys are \['gamma', 'beta'\]"),
    ({"gamma": np.ones(8), "bias": 0, "offset": 1}, ValueError,
     r"unknown key\(s\) \['bias', 'offset'\]"),
    ([np.ones(8)], TypeError, r"params must be a mapping"),
    ({"gamma": np.ones(8, np.complex64)}, TypeError, r"gamma must be real; got complex"),
    ({"beta": "zero"}, TypeError, r"beta must be"),
])
def test_bad_params(params, exc, pattern):
  with pytest.raises(exc, match=pattern):
    gnorm.group_norm(params, X, 2)


def test_complex_input():
  with pytest.raises(TypeError, match=r"complex dtype complex64 is not supported "
                                      r"\(input shape " + SHAPE):
    gnorm.group_norm(None, X.astype(np.complex64), 2)


def test_non_numeric_input():
  with pytest.raises(TypeError, match=r"x must be a numeric array"):
    gnorm.group_norm(None, np.array([["a", "b"]]), 1)


def test_errors_are_raised_at_trace_time_under_jit():
  # No concrete values are needed: the shape checks happen while tracing.
  f = jax.jit(lambda x: gnorm.group_norm(None, x, 3))
  with pytest.raises(ValueError, match=r"n_groups \(3\) must divide"):
    f.lower(jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.float32))
  g = jax.jit(lambda p, x: gnorm.group_norm(p, x, 2))
  with pytest.raises(ValueError, match=r"gamma has shape \(5,\)"):
    g.lower({"gamma": jax.ShapeDtypeStruct((5,), jnp.float32)},
            jax.ShapeDtypeStruct((2, 4, 4, 8), jnp.float32))


@pytest.mark.parametrize("kwargs,value", [
    (dict(params=[np.ones(8)]), "[array("),
    (dict(params=np.ones(8)), "array([1., 1."),
    (dict(params={"scale": np.ones(8)}), "'scale'"),
    (dict(params={"gamma": np.ones(8, np.complex64)}), "complex64"),
    (dict(params={"gamma": np.ones((3, 8))}), "(3, 8)"),
    (dict(params={"beta": "zero"}), "'zero'"),
    (dict(params={"beta": np.array(["a"] * 8)}), "<U1"),
    (dict(mask=np.ones((2, 4, 4, 1), np.float32)), "float32"),
    (dict(mask=np.ones((2, 3, 4, 1), bool)), "(2, 3, 4, 1)"),
    (dict(mask="all"), "str"),
    (dict(activation="swishy"), "'swishy'"),
    (dict(activation=3), "3"),
    (dict(axis_name=["a", {}]), "'a', {}"),
    (dict(axis_index_groups=[[0]]), "[[0]]"),
    (dict(axis_name="a", axis_index_groups=[[0, 1], [2]]), "[[0, 1], [2]]"),
    (dict(axis_name="a", axis_index_groups=[[0.5]]), "[[0.5]]"),
    (dict(n_groups=3), "(3)"),
    (dict(eps=-1.0), "-1.0"),
    (dict(channel_axis=9), "9"),
])
def test_every_error_names_the_value_and_the_input_shape(kwargs, value):
  # docs/function.md: "every error names the offending value and the input shape".
  kwargs = {"params": None, "n_groups": 2, **kwargs}
  with pytest.raises((TypeError, ValueError)) as info:
    gnorm.group_norm(x=X, **kwargs)
  message = str(info.value)
  assert value in message, message
  assert "(2, 4, 4, 8)" in message, message
