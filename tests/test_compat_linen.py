"""``gnorm.compat.linen.GroupNorm`` against ``flax.linen.GroupNorm``, the oracle.

Same constructor, same parameters (names, shapes, dtypes, tree, random
draws), checkpoints that load both ways, and outputs and gradients equal to
flax's on the same parameters, in flax's dtype, for every option and under
jit, vmap, grad, flax's lifted transforms and shard_map.
"""

import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax import export
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gnorm.compat import linen as compat
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


def _loss(layer, variables, x, w, mask=None):
  """A loss with gradients that are not constant (sum(y) has none w.r.t. x)."""
  t = jnp.sin(layer.apply(variables, x, mask=mask).astype(F32)) * w
  return jnp.sum(t if mask is None else jnp.where(mask, t, 0.0))


def _output_and_grads(layer, variables, x, mask=None):
  """``layer``'s output and the gradients of ``_loss`` w.r.t. params and x, jitted."""
  w = _data(x.shape, seed=7)

  def loss(v, x):
    y = layer.apply(v, x, mask=mask)
    t = jnp.sin(y.astype(F32)) * w
    return jnp.sum(t if mask is None else jnp.where(mask, t, 0.0)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
  return y, grads


def _close(a, b, tol):
  """``|a - b| <= tol * max(1, max|b|)``, leaf by leaf, on equal tree structures."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert u.shape == v.shape and u.dtype == v.dtype
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(u, v, rtol=0, atol=tol * max(1.0, np.abs(v).max()))


def _compare(kw, x, mask=None, tol=1e-5, grad_tol=None):
  """Outputs and gradients (w.r.t. x and params) of both on flax's parameters."""
  ours, theirs = compat.GroupNorm(**kw), nn.GroupNorm(**kw)
  variables = jax.jit(theirs.init)(jax.random.key(1), x)
  y, grads = _output_and_grads(ours, variables, x, mask)
  y_ref, grads_ref = _output_and_grads(theirs, variables, x, mask)
  keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  _close(jnp.where(keep, y, 0), jnp.where(keep, y_ref, 0), tol)
  _close(grads, grads_ref, tol if grad_tol is None else grad_tol)
  return y, variables


# name: (constructor arguments, input shape, output tolerance, gradient tolerance).
CASES = {
    "defaults": ({}, (2, 3, 4, 32), 1e-5, None),
    "random_params": (dict(num_groups=4, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "group_size": (dict(num_groups=None, group_size=4, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "instance_norm": (dict(num_groups=None, group_size=1), (2, 5, 6, 8), 1e-5, None),
    "layer_norm": (dict(num_groups=1, **RANDOM), (2, 5, 6, 8), 1e-5, None),
    "sequence": (dict(num_groups=2, **RANDOM), (3, 7, 8), 1e-5, None),
    "rank2": (dict(num_groups=2, **RANDOM), (4, 8), 1e-5, None),
    "batch_axes_negative": (dict(num_groups=4, reduction_axes=(-3, -2, -1), **RANDOM),
                            (2, 3, 4, 5, 8), 1e-5, None),
    "batch_axes_positive": (dict(num_groups=4, reduction_axes=(2, 3, 4), **RANDOM),
                            (2, 3, 4, 5, 8), 1e-5, None),
    "channels_only": (dict(num_groups=2, reduction_axes=-1, **RANDOM), (2, 3, 8), 1e-5, None),
    "unbatched": (dict(num_groups=4, reduction_axes=(0, 1, 2), **RANDOM), (4, 5, 8), 1e-5, None),
    "unbatched_rank1": (dict(num_groups=2, **RANDOM), (8,), 1e-5, None),
    "no_bias": (dict(num_groups=4, use_bias=False, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "no_scale": (dict(num_groups=4, use_scale=False, **RANDOM), (2, 5, 6, 16), 1e-5, None),
    "no_affine": (dict(num_groups=4, use_scale=False, use_bias=False), (2, 5, 6, 16), 1e-5, None),
    # Accepted, no effect on gnorm: still equal to flax's results.
    "fast_variance_off": (dict(num_groups=4, epsilon=1e-2, use_fast_variance=False,
                               force_float32_reductions=False, **RANDOM), (2, 5, 6, 16), 1e-5,
                          None),
    # Half-precision results or parameters: one rounding of the 16-bit dtype.
    "dtype_bfloat16": (dict(num_groups=4, dtype=BF16, **RANDOM), (2, 5, 6, 16), 2e-2, 2e-2),
    "float16": (dict(num_groups=4, dtype=F16, param_dtype=F16, **RANDOM), (2, 5, 6, 16),
                2e-3, 2e-3),
    "param_dtype_bfloat16": (dict(num_groups=4, param_dtype=BF16, **RANDOM), (2, 5, 6, 16),
                             1e-5, 2e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_equal_flax(name):
  kw, shape, tol, grad_tol = CASES[name]
  y, _ = _compare(kw, _data(shape), tol=tol, grad_tol=grad_tol)
  assert y.shape == shape


@pytest.mark.parametrize("affine", [True, False])
def test_bfloat16_input(affine):
  # float32 parameters make the result float32 (as in flax) and x is upcast
  # first, so both compute on the same values; with no parameters the
  # result is bfloat16, one rounding apart. Gradients w.r.t. x are bfloat16.
  kw = dict(num_groups=4, **RANDOM) if affine else dict(
      num_groups=4, use_scale=False, use_bias=False)
  x = _data((2, 5, 6, 16), dtype=BF16)
  y, _ = _compare(kw, x, tol=1e-5 if affine else 2e-2, grad_tol=2e-2)
  assert y.dtype == (F32 if affine else BF16)


def test_float16_input_bfloat16_result():
  # Computed from the float16 values in float32 and rounded once to bfloat16.
  y, _ = _compare(dict(num_groups=4, dtype=BF16, **RANDOM), _data((2, 5, 6, 16), dtype=F16),
                  tol=2e-2, grad_tol=2e-2)
  assert y.dtype == BF16


def test_signature_is_flax():
  def described(f):
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

  assert described(compat.GroupNorm) == described(nn.GroupNorm)
  assert described(compat.GroupNorm.__call__) == described(nn.GroupNorm.__call__)
  assert compat.GroupNorm().bias_init is nn.GroupNorm().bias_init


class _Net(nn.Module):
  """Dense, two unnamed GroupNorms, Dense: auto names as in a real model."""

  norm: type

  @nn.compact
  def __call__(self, x):
    x = self.norm(num_groups=2, **RANDOM)(nn.Dense(8)(x))
    x = self.norm(num_groups=None, group_size=2, **RANDOM)(nn.relu(x))
    return nn.Dense(3)(x)


@pytest.mark.parametrize("kw", [dict(), dict(param_dtype=BF16), dict(use_scale=False),
                                dict(use_bias=False), dict(use_scale=False, use_bias=False)])
def test_same_parameters(kw):
  x = _data((2, 5, 32))
  ours = jax.jit(compat.GroupNorm(**kw, **RANDOM).init)(jax.random.key(3), x)
  theirs = jax.jit(nn.GroupNorm(**kw, **RANDOM).init)(jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
    assert a.shape == b.shape == (32,) and a.dtype == b.dtype == kw.get("param_dtype", F32)
    np.testing.assert_array_equal(a, b)  # drawn from the same keys in the same order
  names = set(ours.get("params", {}))
  assert names == {n for n in ("scale", "bias") if kw.get(f"use_{n}", True)}


def test_checkpoints_load_both_ways():
  x = _data((4, 6, 5))
  ours, theirs = _Net(compat.GroupNorm), _Net(nn.GroupNorm)
  v_ours, v_theirs = ours.init(jax.random.key(0), x), theirs.init(jax.random.key(0), x)
  assert set(v_ours["params"]) == {"Dense_0", "GroupNorm_0", "GroupNorm_1", "Dense_1"}
  _close(v_ours, v_theirs, 0.0)  # same tree, shapes, dtypes and random draws
  for src, dst, src_vars, template in ((theirs, ours, v_theirs, v_ours),
                                       (ours, theirs, v_ours, v_theirs)):
    trained = jax.tree.map(lambda a: a + 0.25 * jnp.cos(jnp.arange(a.size)).reshape(a.shape),
                           src_vars)
    restored = serialization.from_bytes(template, serialization.to_bytes(trained))
    _close(restored, trained, 0.0)
    # The restored parameters run in the other module as in their own.
    _close(dst.apply(restored, x), src.apply(trained, x), 1e-5)


def test_mask():
  x = _data((3, 10, 8))
  lengths = jnp.array([10, 6, 1])
  mask = jnp.broadcast_to(jnp.arange(10)[None, :, None] < lengths[:, None, None], x.shape)
  kw = dict(num_groups=2, **RANDOM)
  y, variables = _compare(kw, x, mask=mask)
  assert float(jnp.abs(jnp.where(mask, 0.0, y)).max()) == 0.0  # padding outputs 0
  layer = compat.GroupNorm(**kw)
  # A (N, L, 1) mask means the same; NaN and Inf in the padding reach nothing.
  poisoned = jnp.where(mask, x, jnp.array([jnp.nan, jnp.inf, -jnp.inf])[jnp.arange(8) % 3])
  y_small, g = _output_and_grads(layer, variables, poisoned, mask[..., :1])
  _close(y_small, y, 1e-6)
  _close(g, _output_and_grads(layer, variables, x, mask)[1], 1e-6)
  assert float(jnp.abs(jnp.where(mask, 0.0, g[1])).max()) == 0.0
  # Against the float64 reference, which also outputs 0 in the padding.
  p = variables["params"]
  ref = group_norm_ref_full(x, 2, p["scale"], p["bias"], eps=1e-6, mask=mask)
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_more_accurate_than_flax_on_large_mean():
  x = _data((4, 8, 8, 32), loc=100.0, std=3.0)
  theirs = nn.GroupNorm(num_groups=8, **RANDOM)
  variables = jax.jit(theirs.init)(jax.random.key(2), x)
  p = variables["params"]
  ref = group_norm_ref(x, 8, p["scale"], p["bias"], eps=1e-6)
  err_ours = np.abs(compat.GroupNorm(num_groups=8).apply(variables, x) - ref).max()
  err_flax = np.abs(theirs.apply(variables, x) - ref).max()
  assert err_ours <= 1e-4 and err_ours < err_flax / 10, (err_ours, err_flax)


def test_jit_vmap_grad():
  x = _data((3, 2, 5, 4, 16))
  kw = dict(num_groups=4, **RANDOM)
  ours, theirs = compat.GroupNorm(**kw), nn.GroupNorm(**kw)
  variables = jax.jit(theirs.init)(jax.random.key(1), x[0])
  _close(jax.jit(ours.apply)(variables, x[0]), theirs.apply(variables, x[0]), 1e-5)
  vmapped = [jax.jit(jax.vmap(m.apply, in_axes=(None, 0))) for m in (ours, theirs)]
  _close(vmapped[0](variables, x), vmapped[1](variables, x), 1e-5)
  w = _data(x.shape[1:], seed=3)
  per_example = [jax.jit(jax.vmap(jax.grad(functools.partial(_loss, m)), in_axes=(None, 0, None)))
                 for m in (ours, theirs)]
  _close(per_example[0](variables, x, w), per_example[1](variables, x, w), 1e-5)


class _Cell(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(self.norm(num_groups=4, **RANDOM)(carry)), None


@pytest.mark.parametrize("transform", ["scan", "remat", "vmap"])
def test_lifted_transforms(transform):
  x = _data((2, 5, 16))
  if transform == "scan":
    def make(norm):
      return nn.scan(_Cell, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(norm)

    def run(m, v, x):
      return m.apply(v, x, None)[0]
  elif transform == "remat":
    def make(norm):
      return nn.remat(norm)(num_groups=4, **RANDOM)

    def run(m, v, x):
      return m.apply(v, x)
  else:
    x = _data((3, 2, 5, 16))

    def make(norm):
      return nn.vmap(norm, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=0)(num_groups=4, **RANDOM)

    def run(m, v, x):
      return m.apply(v, x)
  ours, theirs = make(compat.GroupNorm), make(nn.GroupNorm)
  init = (x, None) if transform == "scan" else (x,)
  v_ours, v_theirs = (jax.jit(m.init)(jax.random.key(0), *init) for m in (ours, theirs))
  _close(v_ours, v_theirs, 0.0)  # stacked per step or per slice, drawn alike
  grads = [jax.jit(jax.value_and_grad(lambda v, x, m=m: jnp.sum(jnp.sin(run(m, v, x))),
                                      argnums=(0, 1)))(v_theirs, x) for m in (ours, theirs)]
  _close(grads[0], grads[1], 1e-5)


def test_axis_name_in_shard_map():
  # One CPU device: a 1-device mesh runs the collective for real (over one
  # shard) and compares with flax's pmean over the same axis.
  mesh = jax.make_mesh((1,), ("s",), axis_types=(AxisType.Auto,))
  x = _data((2, 6, 4, 8))
  kw = dict(num_groups=2, axis_name="s", **RANDOM)
  variables = jax.jit(nn.GroupNorm(num_groups=2, **RANDOM).init)(jax.random.key(0), x)
  outs = []
  for m in (compat.GroupNorm(**kw), nn.GroupNorm(**kw)):
    f = jax.shard_map(m.apply, mesh=mesh, in_specs=(P(), P(None, "s")), out_specs=P(None, "s"))
    outs.append(jax.jit(f)(variables, x))
  _close(outs[0], outs[1], 1e-5)
  _close(outs[0], nn.GroupNorm(num_groups=2).apply(variables, x), 1e-5)


def test_axis_name_lowers_for_two_shards():
  # Two abstract devices, the spatial axis split in two: the statistics must
  # be combined across "s", with a collective in the forward and backward.
  mesh = AbstractMesh((2,), ("s",), axis_types=(AxisType.Auto,))
  layer = compat.GroupNorm(num_groups=2, axis_name="s")
  x = jax.ShapeDtypeStruct((2, 8, 4, 8), F32, sharding=NamedSharding(mesh, P(None, "s")))
  v = {"params": {"scale": jax.ShapeDtypeStruct((8,), F32),
                  "bias": jax.ShapeDtypeStruct((8,), F32)}}
  f = jax.shard_map(layer.apply, mesh=mesh, in_specs=(P(), P(None, "s")), out_specs=P(None, "s"))
  fwd = export.export(jax.jit(f), platforms=("cpu",))(v, x)
  assert fwd.nr_devices == 2 and fwd.out_avals[0].shape == x.shape
  assert fwd.mlir_module().count("stablehlo.all_") >= 1
  bwd = export.export(jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(f(v, x))), argnums=(0, 1))),
                      platforms=("cpu",))(v, x)
  assert [a.shape for a in bwd.out_avals] == [(8,), (8,), x.shape]
  assert bwd.mlir_module().count("stablehlo.all_") >= 2


# flax raises these for the same arguments; the drop-in must raise the same kind.
FLAX_ERRORS = {
    "neither": dict(num_groups=None, group_size=None),
    "both": dict(num_groups=4, group_size=2),
    "groups_not_dividing": dict(num_groups=3),
    "groups_zero": dict(num_groups=0),
    "groups_negative": dict(num_groups=-2),
    "group_size_not_dividing": dict(num_groups=None, group_size=3),
    "no_feature_axis": dict(num_groups=2, reduction_axes=(1, 2)),
}


@pytest.mark.parametrize("name", sorted(FLAX_ERRORS))
def test_errors_as_flax(name):
  x = jnp.ones((2, 3, 4, 8))
  errors = []
  for cls in (compat.GroupNorm, nn.GroupNorm):
    with pytest.raises((ValueError, TypeError)) as info:
      cls(**FLAX_ERRORS[name]).init(jax.random.key(0), x)
    errors.append(info.type)
  assert errors[0] is errors[1]


@pytest.mark.parametrize("kw, error, match", [
    # Every set of reduction axes flax accepts works (test_compat_flax_tests.py);
    # these are not sets of axes of a rank-4 input.
    (dict(reduction_axes=(1, 7)), ValueError, r"reduction_axes \(1, 7\) must include the last"),
    (dict(reduction_axes=(1, 2.0, 3)), TypeError, r"int or ints, got \(1, 2.0, 3\)"),
    # flax fails inside lax.pmean; gnorm names the value (which flax's module
    # holds as tuples).
    (dict(axis_name="s", axis_index_groups=[[0], [1, 2]]), ValueError,
     r"axis_index_groups=\(\(0,\), \(1, 2\)\) must be non-empty groups of one size"),
    (dict(axis_name="s", axis_index_groups=[["a"]]), TypeError, r"\(\('a',\),\)"),
])
def test_bad_options_raise_naming_them(kw, error, match):
  with pytest.raises(error, match=match):
    compat.GroupNorm(num_groups=2, **kw).init(jax.random.key(0), jnp.ones((2, 3, 4, 8)))
