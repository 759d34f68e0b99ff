"""The drop-ins fail as the originals do: each original's own error cases,
replayed against the installed original and the drop-in.

Where the original raises, the drop-in raises the same exception type (or a
subclass) with a message that starts as the original's; gnorm's detail comes
after it. Code that catches the original's error by its message then keeps
working after the swap. Where the original accepts a case and gnorm cannot,
the drop-in's docstring says so (not listed here).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gnorm.compat import equinox as gnorm_eqx
from gnorm.compat import haiku as gnorm_hk
from gnorm.compat import linen as gnorm_linen
from gnorm.compat import nnx as gnorm_nnx

X = jnp.ones((2, 4, 4, 6))


def _linen(module, kw, x=X, **call):
  return lambda: module(**kw).init(jax.random.key(0), x, **call)


def _nnx(module, kw, x=X, **call):
  return lambda: module(**kw, rngs=nnx.Rngs(0))(x, **call)


def _eqx(module, args, x, kw=None):
  return lambda: module(*args, **(kw or {}))(x)


def _haiku(module, kw, *inputs, call=None):
  def run():
    def fn(xs):
      layer = module(**kw)
      return [layer(a, **(call or {})) for a in xs]
    f = hk.transform(fn)
    f.apply(f.init(jax.random.key(0), list(inputs)), None, list(inputs))
  return run


# name -> (the original's case, the drop-in's), each a thunk that must raise.
CASES = {
  "linen: neither num_groups nor group_size": (
      _linen(nn.GroupNorm, dict(num_groups=None)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=None))),
  "linen: both num_groups and group_size": (
      _linen(nn.GroupNorm, dict(num_groups=2, group_size=3)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, group_size=3))),
  "linen: num_groups does not divide": (
      _linen(nn.GroupNorm, dict(num_groups=4)), _linen(gnorm_linen.GroupNorm, dict(num_groups=4))),
  "linen: num_groups 0": (
      _linen(nn.GroupNorm, dict(num_groups=0)), _linen(gnorm_linen.GroupNorm, dict(num_groups=0))),
  "linen: num_groups negative": (
      _linen(nn.GroupNorm, dict(num_groups=-2)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=-2))),
  "linen: num_groups not an int": (
      _linen(nn.GroupNorm, dict(num_groups=2.0)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2.0))),
  "linen: group_size does not divide": (
      _linen(nn.GroupNorm, dict(num_groups=None, group_size=4)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=None, group_size=4))),
  "linen: group_size 0": (
      _linen(nn.GroupNorm, dict(num_groups=None, group_size=0)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=None, group_size=0))),
  "linen: group_size not an int": (
      _linen(nn.GroupNorm, dict(num_groups=None, group_size=2.0)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=None, group_size=2.0))),
  "linen: reduction_axes without the feature axis": (
      _linen(nn.GroupNorm, dict(num_groups=2, reduction_axes=(1, 2))),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, reduction_axes=(1, 2)))),
  "linen: reduction_axes out of range": (
      _linen(nn.GroupNorm, dict(num_groups=2, reduction_axes=(1, 7))),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, reduction_axes=(1, 7)))),
  "linen: a scalar input": (
      _linen(nn.GroupNorm, dict(num_groups=2), x=jnp.ones(())),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2), x=jnp.ones(()))),
  "linen: reduction_axes not ints": (
      _linen(nn.GroupNorm, dict(num_groups=2, reduction_axes="a")),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, reduction_axes="a"))),
  "linen: a float reduction axis": (
      _linen(nn.GroupNorm, dict(num_groups=2, reduction_axes=(1, 2.0, 3))),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, reduction_axes=(1, 2.0, 3)))),
  "nnx: reduction_axes not ints": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=2, reduction_axes=(1, None, 3))),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=2, reduction_axes=(1, None, 3)))),
  "linen: integer dtype": (
      _linen(nn.GroupNorm, dict(num_groups=2, dtype=jnp.int32)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2, dtype=jnp.int32))),
  "linen: a mask of the wrong shape": (
      _linen(nn.GroupNorm, dict(num_groups=2), mask=jnp.ones((3,), bool)),
      _linen(gnorm_linen.GroupNorm, dict(num_groups=2), mask=jnp.ones((3,), bool))),
  "nnx: neither num_groups nor group_size": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=None)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=None))),
  "nnx: num_groups does not divide": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=4)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=4))),
  "nnx: num_groups not an int": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=2.0)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=2.0))),
  "nnx: group_size does not divide": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=4)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=4))),
  "nnx: group_size 0": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=0)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=0))),
  "nnx: group_size not an int": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=2.0)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=None, group_size=2.0))),
  "nnx: input without num_features channels": (
      _nnx(nnx.GroupNorm, dict(num_features=8, num_groups=2)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=8, num_groups=2))),
  "nnx: a scalar input": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=2), x=jnp.ones(())),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=2), x=jnp.ones(()))),
  "nnx: a mask of the wrong shape": (
      _nnx(nnx.GroupNorm, dict(num_features=6, num_groups=2), mask=jnp.ones((3,), bool)),
      _nnx(gnorm_nnx.GroupNorm, dict(num_features=6, num_groups=2), mask=jnp.ones((3,), bool))),
  "equinox: groups do not divide": (
      _eqx(eqx.nn.GroupNorm, (4, 6), jnp.ones((6, 4))),
      _eqx(gnorm_eqx.GroupNorm, (4, 6), jnp.ones((6, 4)))),
  "equinox: groups 0": (
      _eqx(eqx.nn.GroupNorm, (0, 6), jnp.ones((6, 4))),
      _eqx(gnorm_eqx.GroupNorm, (0, 6), jnp.ones((6, 4)))),
  "equinox: groups not an int": (
      _eqx(eqx.nn.GroupNorm, (2.0, 6), jnp.ones((6, 4))),
      _eqx(gnorm_eqx.GroupNorm, (2.0, 6), jnp.ones((6, 4)))),
  "equinox: affine without channels": (
      _eqx(eqx.nn.GroupNorm, (2, None), jnp.ones((6, 4))),
      _eqx(gnorm_eqx.GroupNorm, (2, None), jnp.ones((6, 4)))),
  "equinox: input of other channels": (
      _eqx(eqx.nn.GroupNorm, (2, 6), jnp.ones((8, 4))),
      _eqx(gnorm_eqx.GroupNorm, (2, 6), jnp.ones((8, 4)))),
  "equinox: groups do not divide the input's channels": (
      _eqx(eqx.nn.GroupNorm, (4, None), jnp.ones((6, 4)), dict(channelwise_affine=False)),
      _eqx(gnorm_eqx.GroupNorm, (4, None), jnp.ones((6, 4)), dict(channelwise_affine=False))),
  "equinox: a scalar input": (
      _eqx(eqx.nn.GroupNorm, (2, 6), jnp.ones(())),
      _eqx(gnorm_eqx.GroupNorm, (2, 6), jnp.ones(()))),
  "haiku: channels not divisible": (
      _haiku(hk.GroupNorm, dict(groups=4), X), _haiku(gnorm_hk.GroupNorm, dict(groups=4), X)),
  "haiku: groups 0": (
      _haiku(hk.GroupNorm, dict(groups=0), X), _haiku(gnorm_hk.GroupNorm, dict(groups=0), X)),
  "haiku: groups not an int": (
      _haiku(hk.GroupNorm, dict(groups=2.0), X), _haiku(gnorm_hk.GroupNorm, dict(groups=2.0), X)),
  "haiku: the rank changes between calls": (
      _haiku(hk.GroupNorm, dict(groups=2), X, jnp.ones((2, 4, 6))),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2), X, jnp.ones((2, 4, 6)))),
  "haiku: axis not an int, slice or ints": (
      _haiku(hk.GroupNorm, dict(groups=2, axis="a"), X),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2, axis="a"), X)),
  "haiku: axis out of range": (
      _haiku(hk.GroupNorm, dict(groups=2, axis=7), X),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2, axis=7), X)),
  "haiku: scale_init without create_scale": (
      _haiku(hk.GroupNorm, dict(groups=2, create_scale=False, scale_init=jnp.ones), X),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2, create_scale=False, scale_init=jnp.ones), X)),
  "haiku: offset_init without create_offset": (
      _haiku(hk.GroupNorm, dict(groups=2, create_offset=False, offset_init=jnp.zeros), X),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2, create_offset=False, offset_init=jnp.zeros),
             X)),
  "haiku: a scale at call time with create_scale": (
      _haiku(hk.GroupNorm, dict(groups=2), X, call=dict(scale=jnp.ones(6))),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2), X, call=dict(scale=jnp.ones(6)))),
  "haiku: a bad data_format": (
      _haiku(hk.GroupNorm, dict(groups=2, data_format="bad"), X),
      _haiku(gnorm_hk.GroupNorm, dict(groups=2, data_format="bad"), X)),
}


def _raised(thunk) -> BaseException:
  try:
    thunk()
  except Exception as e:  # noqa: BLE001 - what is raised is the point
    return e
  raise AssertionError("it did not raise")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_drop_in_raises_as_the_original(name):
  original, drop_in = (_raised(thunk) for thunk in CASES[name])
  assert isinstance(drop_in, type(original)), (type(original), type(drop_in), str(drop_in))
  assert str(drop_in).startswith(str(original)), (str(original), str(drop_in))
