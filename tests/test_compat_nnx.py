"""``gnorm.compat.nnx.GroupNorm`` against ``flax.nnx.GroupNorm``, the oracle.

Same constructor, attributes and state (names, Param types, shapes, dtypes,
random draws), state that loads both ways, and outputs and gradients equal
to flax's on the same parameters, in flax's dtype, under nnx.jit,
nnx.value_and_grad, nnx.vmap, nnx.split/merge and shard_map.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import serialization
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from gnorm.compat import nnx as compat
from tests.reference import group_norm_ref
from tests.reference import group_norm_ref_full

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _scale_init(key, shape, dtype):
  return (1 + 0.3 * jax.random.normal(key, shape)).astype(dtype)


def _bias_init(key, shape, dtype):
  return (0.3 * jax.random.normal(key, shape)).astype(dtype)


RANDOM = dict(scale_init=_scale_init, bias_init=_bias_init)


def _data(shape, seed=0, loc=0.0, std=1.0, dtype=F32):
  return (loc + std * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _pair(num_features, *args, **kw):
  """The drop-in and flax's layer, built alike (so with the same parameters)."""
  return tuple(cls(num_features, *args, **kw, rngs=nnx.Rngs(0))
               for cls in (compat.GroupNorm, nnx.GroupNorm))


def _output_and_grads(model, x, mask=None, fold=None):
  """Output and gradients w.r.t. the state and x under nnx.jit; ``fold``
  reshapes x before the layer and the output back after it."""
  w = _data(x.shape, seed=7)

  def loss(m, x):
    y = m(x, mask=mask) if fold is None else m(fold(x)).reshape(x.shape)
    t = jnp.sin(y.astype(F32)) * w
    return jnp.sum(t if mask is None else jnp.where(mask, t, 0.0)), y

  (_, y), grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(model, x)
  return y, grads


def _close(a, b, tol):
  """``|a - b| <= tol * max(1, max|b|)``, leaf by leaf, on equal tree structures."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape and u.dtype == v.dtype
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(u, v, rtol=0, atol=tol * max(1.0, np.abs(v).max()))


def _compare(args, kw, x, mask=None, tol=1e-5, grad_tol=None):
  ours, theirs = _pair(x.shape[-1], *args, **kw)
  y, grads = _output_and_grads(ours, x, mask)
  y_ref, grads_ref = _output_and_grads(theirs, x, mask)
  keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  _close(jnp.where(keep, y, 0), jnp.where(keep, y_ref, 0), tol)
  _close(grads, grads_ref, tol if grad_tol is None else grad_tol)
  return y, ours


# name: (positional arguments after num_features, keyword arguments, input
# shape, output tolerance, gradient tolerance).
CASES = {
    "defaults": ((), {}, (2, 3, 4, 32), 1e-5, None),
    "random_params": ((4,), RANDOM, (2, 5, 6, 16), 1e-5, None),
    "group_size": ((None, 4), RANDOM, (2, 5, 6, 16), 1e-5, None),
    "sequence": ((2,), RANDOM, (3, 7, 8), 1e-5, None),
    "no_bias": ((4,), dict(use_bias=False, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "no_scale": ((4,), dict(use_scale=False, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "no_affine": ((4,), dict(use_scale=False, use_bias=False), (2, 5, 6, 16), 1e-5, None),
    # Accepted, no effect on gnorm: still equal to flax's results.
    "fast_variance_off": ((4,), dict(epsilon=1e-2, use_fast_variance=False, **RANDOM),
                          (2, 5, 6, 16), 1e-5, None),
    # flax.nnx casts x to dtype first (promote_dtype): so does the drop-in.
    "dtype_bfloat16": ((4,), dict(dtype=BF16, **RANDOM), (2, 5, 6, 16), 2e-2, 2e-2),
    "float16": ((4,), dict(dtype=F16, param_dtype=F16, **RANDOM), (2, 5, 6, 16), 2e-3, 2e-3),
    "param_dtype_bfloat16": ((4,), dict(param_dtype=BF16, **RANDOM), (2, 5, 6, 16), 1e-5, 2e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_equal_flax(name):
  args, kw, shape, tol, grad_tol = CASES[name]
  y, _ = _compare(args, kw, _data(shape), tol=tol, grad_tol=grad_tol)
  assert y.shape == shape


@pytest.mark.parametrize("affine", [True, False])
def test_bfloat16_input(affine):
  kw = RANDOM if affine else dict(use_scale=False, use_bias=False)
  y, _ = _compare((4,), kw, _data((2, 5, 6, 16), dtype=BF16), tol=1e-5 if affine else 2e-2,
                  grad_tol=2e-2)
  assert y.dtype == (F32 if affine else BF16)


@pytest.mark.parametrize("axes, shape", [
    ((-3, -2, -1), (2, 3, 4, 5, 8)),  # extra leading batch axes
    ((2, 3, 4), (2, 3, 4, 5, 8)),
    (-1, (2, 3, 8)),  # statistics over the channels of each position
    ((0, 1, 2), (4, 5, 8)),  # unbatched
])
def test_reduction_axes(axes, shape):
  # flax.nnx 0.12 mixes samples' statistics with extra batch axes and fails
  # on unbatched input, so the oracle is flax.nnx's layer on the input with
  # its batch axes folded into one (or one added), flax's default layout.
  ours, theirs = _pair(8, 2, reduction_axes=axes, **RANDOM)
  theirs.reduction_axes = None
  n_batch = len(shape) - len({a % len(shape) for a in np.atleast_1d(axes)})
  x = _data(shape)

  def fold(v):
    return v.reshape((-1, *v.shape[n_batch:])) if n_batch else v[None]

  y, grads = _output_and_grads(ours, x)
  y_ref, grads_ref = _output_and_grads(theirs, x, fold=fold)
  _close(y, y_ref, 1e-5)
  _close(grads, grads_ref, 1e-5)
  ref = group_norm_ref(fold(x), 2, ours.scale[...], ours.bias[...], eps=1e-6)
  np.testing.assert_allclose(y, ref.reshape(shape), rtol=0, atol=1e-5)
  # ... which is what flax.linen gives with these reduction axes.
  variables = {"params": nnx.to_pure_dict(nnx.state(ours))}
  _close(y, nn.GroupNorm(2, reduction_axes=axes).apply(variables, x), 1e-5)


def test_signature_is_flax():
  def described(f):
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

  assert described(compat.GroupNorm.__init__) == described(nnx.GroupNorm.__init__)
  assert described(compat.GroupNorm.__call__) == described(nnx.GroupNorm.__call__)


STATIC = ("feature_axis", "num_groups", "group_size", "epsilon", "dtype", "param_dtype",
          "use_bias", "use_scale", "reduction_axes", "axis_name", "axis_index_groups",
          "use_fast_variance", "promote_dtype")


@pytest.mark.parametrize("args, kw", [
    ((), {}), ((None, 2), dict(param_dtype=BF16, epsilon=1e-3)), ((4,), dict(use_scale=False)),
    ((4,), dict(use_bias=False, reduction_axes=(-2, -1))),
    ((4,), dict(use_scale=False, use_bias=False)),
    ((4,), dict(scale_metadata={"tag": "s"}, bias_metadata={"tag": "b"})),
])
def test_same_attributes_and_state(args, kw):
  ours, theirs = _pair(32, *args, **kw, **RANDOM)
  assert sorted(vars(ours)) == sorted(vars(theirs))
  assert [getattr(ours, a) for a in STATIC] == [getattr(theirs, a) for a in STATIC]
  for name in ("scale", "bias"):
    a, b = getattr(ours, name), getattr(theirs, name)
    assert type(a) is type(b) and (a is None) == (not kw.get(f"use_{name}", True))
    if a is not None:
      assert a.get_metadata() == b.get_metadata()
  s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  _close(s_ours, s_theirs, 0.0)  # drawn from the same rngs in the same order
  for leaf in jax.tree.leaves(s_ours):
    assert leaf.shape == (32,) and leaf.dtype == kw.get("param_dtype", F32)


class _Net(nnx.Module):
  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(5, 8, rngs=rngs)
    self.norms = nnx.List([norm(8, 2, **RANDOM, rngs=rngs), norm(8, None, 2, rngs=rngs)])

  def __call__(self, x):
    for norm in self.norms:
      x = nnx.relu(norm(self.linear(x) if norm is self.norms[0] else x))
    return x


def test_state_loads_both_ways():
  x = _data((4, 6, 5))
  ours, theirs = _Net(compat.GroupNorm, nnx.Rngs(0)), _Net(nnx.GroupNorm, nnx.Rngs(0))
  _close(nnx.state(ours), nnx.state(theirs), 0.0)
  for src, dst in ((theirs, ours), (ours, theirs)):
    trained = jax.tree.map(lambda a: a + 0.25 * jnp.cos(jnp.arange(a.size)).reshape(a.shape),
                           nnx.state(src))
    nnx.update(src, trained)
    y_src = src(x)
    # nnx.update, and nnx.merge with the other's graphdef.
    nnx.update(dst, nnx.state(src))
    _close(dst(x), y_src, 1e-5)
    graphdef, _ = nnx.split(dst)
    _close(jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))(nnx.state(src), x), y_src, 1e-5)
    # Bytes (flax.serialization of the pure dict) written by one, read by the other.
    saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state(src)))
    fresh = _Net(type(dst.norms[0]), nnx.Rngs(1))
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), saved))
    nnx.update(fresh, state)
    _close(nnx.state(fresh), nnx.state(src), 0.0)
    _close(fresh(x), y_src, 1e-5)


def test_mask():
  x = _data((3, 10, 8))
  lengths = jnp.array([10, 6, 1])
  mask = jnp.broadcast_to(jnp.arange(10)[None, :, None] < lengths[:, None, None], x.shape)
  y, ours = _compare((2,), RANDOM, x, mask=mask)
  assert float(jnp.abs(jnp.where(mask, 0.0, y)).max()) == 0.0  # padding outputs 0
  # A (N, L, 1) mask means the same; NaN and Inf in the padding reach nothing.
  poisoned = jnp.where(mask, x, jnp.array([jnp.nan, jnp.inf, -jnp.inf])[jnp.arange(8) % 3])
  y_small, g = _output_and_grads(ours, poisoned, mask[..., :1])
  _close(y_small, y, 1e-6)
  _close(g, _output_and_grads(ours, x, mask)[1], 1e-6)
  assert float(jnp.abs(jnp.where(mask, 0.0, g[1])).max()) == 0.0
  ref = group_norm_ref_full(x, 2, ours.scale[...], ours.bias[...], eps=1e-6, mask=mask)
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_more_accurate_than_flax_on_large_mean():
  x = _data((4, 8, 8, 32), loc=100.0, std=3.0)
  ours, theirs = _pair(32, 8, **RANDOM)
  ref = group_norm_ref(x, 8, ours.scale[...], ours.bias[...], eps=1e-6)
  err_ours = np.abs(nnx.jit(lambda m, x: m(x))(ours, x) - ref).max()
  err_flax = np.abs(nnx.jit(lambda m, x: m(x))(theirs, x) - ref).max()
  assert err_ours <= 1e-4 and err_ours < err_flax / 10, (err_ours, err_flax)


def test_custom_promote_dtype():
  calls = []

  def to_float32(args, *, dtype=None):
    calls.append(dtype)
    return tuple(None if a is None else jnp.asarray(a, F32) for a in args)

  x = _data((2, 5, 16), dtype=BF16)
  ours, theirs = _pair(16, 4, dtype=BF16, promote_dtype=to_float32, **RANDOM)
  y, y_ref = ours(x), theirs(x)
  assert calls == [BF16, BF16] and y.dtype == y_ref.dtype == BF16
  _close(y, y_ref, 2e-2)


def test_vmap_and_eager():
  x = _data((3, 2, 5, 16))
  ours, theirs = _pair(16, 4, **RANDOM)
  _close(ours(x[0]), theirs(x[0]), 1e-5)  # eager
  ys = [nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(m, x) for m in (ours, theirs)]
  _close(ys[0], ys[1], 1e-5)


def test_axis_name_in_shard_map():
  # One CPU device: a 1-device mesh runs the collective for real (over one
  # shard) and compares with flax's pmean over the same axis.
  mesh = jax.make_mesh((1,), ("s",), axis_types=(AxisType.Auto,))
  x = _data((2, 6, 4, 8))
  outs = []
  for m in _pair(8, 2, axis_name="s", **RANDOM):
    graphdef, state = nnx.split(m)

    def body(state, x, graphdef=graphdef):
      return nnx.merge(graphdef, state)(x)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "s")), out_specs=P(None, "s"))
    outs.append(jax.jit(f)(state, x))
  _close(outs[0], outs[1], 1e-5)
  _close(outs[0], _pair(8, 2, **RANDOM)[1](x), 1e-5)


# flax.nnx raises these for the same arguments; the drop-in raises the same kind.
FLAX_ERRORS = {
    "neither": ((None, None), {}),
    "both": ((4, 2), {}),
    "groups_not_dividing": ((3,), {}),
    "groups_zero": ((0,), {}),
    "groups_not_int": ((2.0,), {}),
    "group_size_not_dividing": ((None, 3), {}),
}


@pytest.mark.parametrize("name", sorted(FLAX_ERRORS))
def test_construction_errors_as_flax(name):
  args, kw = FLAX_ERRORS[name]
  errors = []
  for cls in (compat.GroupNorm, nnx.GroupNorm):
    with pytest.raises((ValueError, TypeError)) as info:
      cls(8, *args, **kw, rngs=nnx.Rngs(0))
    errors.append(info.type)
  assert errors[0] is errors[1]


def test_wrong_channel_count_as_flax():
  for layer in _pair(8, 4):
    with pytest.raises(TypeError):
      layer(jnp.ones((2, 3, 12)))


@pytest.mark.parametrize("kw, error, match", [
    # Every set of reduction axes flax accepts works (test_compat_flax_tests.py);
    # these do not include the feature axis or are not axes of a rank-4 input.
    (dict(reduction_axes=(1, 2)), ValueError, "last axis"),
    (dict(reduction_axes=(1, 7)), ValueError, r"reduction_axes \(1, 7\) must include the last"),
])
def test_bad_reduction_axes_raise_naming_them(kw, error, match):
  with pytest.raises(error, match=match):
    compat.GroupNorm(8, 2, **kw, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 4, 8)))
