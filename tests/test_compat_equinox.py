"""``gnorm.compat.equinox.GroupNorm`` against ``equinox.nn.GroupNorm`` as the oracle."""

import dataclasses
import inspect
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnorm.compat.equinox import GroupNorm
from tests.reference import group_norm_ref

TOL = dict(rtol=1e-5, atol=1e-5)
C = 8


def _pair(groups=4, channels=C, affine=True, dtype=None, seed=0):
  """The original and the drop-in with the same (random) weight and bias."""
  orig = eqx.nn.GroupNorm(groups, channels, channelwise_affine=affine, dtype=dtype)
  drop = GroupNorm(groups, channels, channelwise_affine=affine, dtype=dtype)
  if affine:
    w = _x((channels,), seed, 1.0, 0.5, orig.weight.dtype)
    b = _x((channels,), seed + 100, 0.0, 0.5, orig.bias.dtype)
    orig = eqx.tree_at(lambda m: (m.weight, m.bias), orig, (w, b))
    drop = eqx.tree_at(lambda m: (m.weight, m.bias), drop, (w, b))
  return orig, drop


def _x(shape, seed=1, loc=0.0, scale=1.0, dtype=jnp.float32):
  """N(loc, scale^2) data, drawn by NumPy (no compilation per shape)."""
  z = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray((loc + scale * z).astype(np.float32).astype(dtype))


@eqx.filter_jit
def _outputs_and_grads(models, x, ct):
  """Each model's output and gradients w.r.t. (its arrays, x), in one program."""
  def run(model):
    def loss(mx):
      y = mx[0](mx[1])
      return jnp.sum(y.astype(jnp.float32) * ct), y
    grads, y = eqx.filter_grad(loss, has_aux=True)((model, x))
    return y, grads
  return [run(m) for m in models]


def _assert_trees_close(a, b, **tol):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > 0
  for u, v in zip(la, lb, strict=True):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), **tol)


# --- constructor, call and fields -------------------------------------------------


@pytest.mark.parametrize("method", ["__init__", "__call__"])
def test_signature_matches_equinox(method):
  ours = inspect.signature(getattr(GroupNorm, method)).parameters
  theirs = inspect.signature(getattr(eqx.nn.GroupNorm, method)).parameters
  assert list(ours) == list(theirs)
  for name, p in theirs.items():
    assert ours[name].kind == p.kind, name
    assert ours[name].default is p.default or ours[name].default == p.default, name


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16, jnp.float16])
def test_fields_and_leaves_match_equinox(affine, dtype):
  orig = eqx.nn.GroupNorm(2, C if affine else None, 1e-3, affine, dtype)
  drop = GroupNorm(2, C if affine else None, 1e-3, affine, dtype)
  fo, fd = dataclasses.fields(orig), dataclasses.fields(drop)
  assert [f.name for f in fo] == [f.name for f in fd]
  assert [f.metadata.get("static", False) for f in fo] == [
      f.metadata.get("static", False) for f in fd]
  for f in fo:
    if f.name not in ("weight", "bias"):
      assert getattr(drop, f.name) == getattr(orig, f.name)
  po = jax.tree_util.tree_flatten_with_path(orig)[0]
  pd = jax.tree_util.tree_flatten_with_path(drop)[0]
  assert [k for k, _ in po] == [k for k, _ in pd]
  assert len(po) == (2 if affine else 0)
  if affine:
    _assert_trees_close(jax.tree.leaves(orig), jax.tree.leaves(drop), rtol=0, atol=0)
    assert drop.weight.dtype == orig.weight.dtype == (dtype or jnp.float32)


def test_constructor_errors_match_equinox():
  for args in [(3, 8), (2, None), (0, 8)]:
    with pytest.raises(Exception) as e_orig:
      eqx.nn.GroupNorm(*args)
    with pytest.raises(type(e_orig.value)):
      GroupNorm(*args)
  assert GroupNorm(2, None, channelwise_affine=False).weight is None


@pytest.mark.parametrize("x_shape,model_args,error", [
    ((), (2, 4), IndexError),                      # a scalar
    ((3, 3), (2, None, 1e-5, False), TypeError),   # 2 groups do not divide 3 channels
    ((6, 3), (2, 4), ValueError),                  # weight (4,) vs 6 channels
])
def test_call_errors_match_equinox(x_shape, model_args, error):
  x = jnp.ones(x_shape)
  with pytest.raises(error):
    eqx.nn.GroupNorm(*model_args)(x)
  with pytest.raises(error):
    GroupNorm(*model_args)(x)


def test_state_and_key_conventions():
  orig, drop = _pair()
  x = _x((C, 5))
  model, state = eqx.nn.make_with_state(GroupNorm)(4, C)
  out = model(x, state, key=jax.random.key(3))
  assert isinstance(out, tuple) and len(out) == 2 and out[1] is state
  y, st = drop(x, state)
  assert st is state
  yo, _ = orig(x, state)
  np.testing.assert_allclose(y, yo, **TOL)
  assert isinstance(drop(x, key=jax.random.key(0)), jax.Array)  # no state: array alone


# --- checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["equinox_to_gnorm", "gnorm_to_equinox"])
def test_serialise_round_trip(tmp_path, direction):
  orig, drop = _pair(seed=7)
  src, like = (orig, GroupNorm(4, C)) if direction == "equinox_to_gnorm" else (
      drop, eqx.nn.GroupNorm(4, C))
  path = tmp_path / "gn.eqx"
  eqx.tree_serialise_leaves(path, src)
  loaded = eqx.tree_deserialise_leaves(path, like)
  assert type(loaded) is type(like)
  _assert_trees_close(jax.tree.leaves(loaded), jax.tree.leaves(src), rtol=0, atol=0)
  x = _x((C, 4, 4))
  np.testing.assert_allclose(loaded(x), src(x), **TOL)


# --- outputs and gradients ---------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,groups", [
    ((C,), 4), ((C, 7), 2), ((C, 5, 6), 4), ((C, 3, 4, 5), 8), ((C, 6), 1)])
def test_matches_equinox_outputs_and_gradients(shape, groups, affine):
  orig, drop = _pair(groups, affine=affine, seed=len(shape))
  x, ct = _x(shape, seed=groups), _x(shape, seed=99)
  (yo, go), (yd, gd) = _outputs_and_grads((orig, drop), x, ct)
  assert yd.shape == yo.shape and yd.dtype == yo.dtype
  np.testing.assert_allclose(yd, yo, **TOL)
  _assert_trees_close(go, gd, **TOL)  # x, and weight and bias with the affine
  assert len(jax.tree.leaves(gd)) == (3 if affine else 1)


@pytest.mark.parametrize("x_dtype,p_dtype", [
    (jnp.bfloat16, None), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, None),
    (jnp.float32, jnp.bfloat16)])
def test_low_precision_dtypes_match_equinox(x_dtype, p_dtype):
  orig, drop = _pair(2, dtype=p_dtype, seed=3)
  x = _x((C, 6, 5), dtype=x_dtype)
  yo, yd = orig(x), drop(x)
  assert yd.dtype == yo.dtype == x_dtype
  ref = group_norm_ref(np.asarray(x, np.float64)[None], 2, np.asarray(drop.weight, np.float64),
                       np.asarray(drop.bias, np.float64), channel_axis=1)[0]
  # Both compute in float32 and round once to the input's dtype.
  one_rounding = max(float(jnp.finfo(x_dtype).eps) * np.abs(ref).max(), 1e-5)
  assert np.abs(np.asarray(yd, np.float64) - ref).max() <= one_rounding
  assert np.abs(np.asarray(yd, np.float64) - np.asarray(yo, np.float64)).max() <= one_rounding


def test_integer_input_keeps_equinox_output_dtype():
  orig, drop = _pair(2, affine=False)
  x = jnp.arange(C * 3, dtype=jnp.int32).reshape(C, 3) % 5
  assert drop(x).dtype == orig(x).dtype == jnp.int32


def test_float64_matches_reference(x64):
  orig, drop = _pair(2, dtype=jnp.float64)
  x = _x((C, 9), dtype=jnp.float64)
  yd = drop(x)
  assert yd.dtype == orig(x).dtype == jnp.float64
  ref = group_norm_ref(np.asarray(x)[None], 2, np.asarray(drop.weight), np.asarray(drop.bias),
                       channel_axis=1)[0]
  np.testing.assert_allclose(yd, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(64, 256), (32, 16, 16)])
def test_large_mean_accuracy(shape, seed):
  """N(100, 3^2): both exact two-pass; the drop-in is not measurably worse.

  Equinox's jnp.mean over each contiguous group is often slightly closer
  (see the class docstring), so the property held is: within gnorm's own
  documented bound, and within two float32 ulps of the mean (divided by the
  spread) of equinox's error. A one-pass variance is off by ~1e-2 here.
  """
  orig, drop = _pair(4, shape[0], seed=seed)
  x = _x(shape, seed=seed, loc=100.0, scale=3.0)
  ref = group_norm_ref(np.asarray(x)[None], 4, np.asarray(drop.weight), np.asarray(drop.bias),
                       channel_axis=1)[0]
  err_d = np.abs(np.asarray(drop(x), np.float64) - ref).max()
  err_o = np.abs(np.asarray(orig(x), np.float64) - ref).max()
  w = float(np.abs(np.asarray(drop.weight)).max())
  assert err_d <= 1e-5 * max(1.0, float(np.abs(x).max()) / (4 * 3.0)) * w
  assert err_d <= err_o + 2 * w * float(np.spacing(np.float32(100.0))) / 3.0


# --- transformations -----------------------------------------------------------------


def test_under_jit_vmap_grad():
  orig, drop = _pair(seed=5)
  xs = _x((3, C, 4, 5))
  ct = _x((3, C, 4, 5), seed=8)
  want = jax.vmap(orig)(xs)
  np.testing.assert_allclose(jax.jit(lambda m, x: jax.vmap(m)(x))(drop, xs), want, **TOL)
  np.testing.assert_allclose(jax.vmap(drop)(xs), want, **TOL)
  # jax.grad with respect to x and to the module itself (a pytree).
  grad = jax.jit(jax.grad(lambda m, x: jnp.sum(jax.vmap(m)(x) * ct), argnums=(0, 1)))
  gd, go = grad(drop, xs), grad(orig, xs)
  assert isinstance(gd[0], GroupNorm)
  _assert_trees_close(gd, go, **TOL)
  assert len(jax.tree.leaves(gd)) == 3


def test_under_filter_jit_filter_vmap_filter_grad():
  orig, drop = _pair(seed=6)
  xs = _x((3, C, 5))
  ct = _x((3, C, 5), seed=4)
  want = eqx.filter_vmap(orig)(xs)
  np.testing.assert_allclose(eqx.filter_vmap(drop)(xs), want, **TOL)
  np.testing.assert_allclose(
      eqx.filter_jit(lambda m, x: eqx.filter_vmap(m)(x))(drop, xs), want, **TOL)

  @eqx.filter_grad
  def grad_fn(model, x):
    return jnp.sum(eqx.filter_vmap(model)(x) * ct)

  _assert_trees_close(eqx.filter_jit(grad_fn)(drop, xs), grad_fn(orig, xs), **TOL)


def test_ensemble_under_filter_vmap():
  """A stack of layers with per-member weights, vmapped with their inputs."""
  members = [_pair(seed=s) for s in range(3)]
  stack = lambda ms: jax.tree.map(lambda *a: jnp.stack(a), *ms)  # noqa: E731
  origs, drops = stack([m[0] for m in members]), stack([m[1] for m in members])
  xs = _x((3, C, 6))
  call = eqx.filter_vmap(lambda m, x: m(x))
  np.testing.assert_allclose(call(drops, xs), call(origs, xs), **TOL)


def test_import_gnorm_does_not_import_equinox():
  code = (
      "import sys, gnorm, gnorm.compat\n"
      "assert 'equinox' not in sys.modules and 'haiku' not in sys.modules, 'gnorm'\n"
      "import gnorm.compat.equinox\n"
      "assert 'equinox' in sys.modules and 'haiku' not in sys.modules, 'compat'\n")
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
