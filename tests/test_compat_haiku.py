"""``gnorm.compat.haiku.GroupNorm`` against ``haiku.GroupNorm`` as the oracle."""

import inspect
import os
import pathlib
import subprocess
import sys

import flax.serialization
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnorm.compat.haiku import GroupNorm
from tests.reference import group_norm_ref

TOL = dict(rtol=1e-5, atol=1e-5)
C = 8


def _transform(cls, **kw):
  """``f(x, scale, offset)`` with one ``cls(**kw)`` layer, without rng."""
  return hk.without_apply_rng(hk.transform(lambda x, s=None, o=None: cls(**kw)(x, s, o)))


def _x(shape, seed=1, loc=0.0, scale=1.0, dtype=jnp.float32):
  """N(loc, scale^2) data, drawn by NumPy (no compilation per shape)."""
  z = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray((loc + scale * z).astype(np.float32).astype(dtype))


def _randomise(params, seed=0):
  """Replaces every parameter by N(1, 0.5^2) (scale) or N(0, 0.5^2) values."""
  def draw(path, a):
    loc = 1.0 if path[-1].key == "scale" else 0.0
    return _x(a.shape, seed + len(jax.tree_util.keystr(path)), loc, 0.5, a.dtype)
  return jax.tree_util.tree_map_with_path(draw, params)


def _init(f, *args):
  """``f.init(None, *args)`` for haiku's default initializers, without running it.

  Only traced (``jax.eval_shape``): no op-by-op compilation of the layer.
  """
  def fill(path, a):
    return (jnp.ones if path[-1].key == "scale" else jnp.zeros)(a.shape, a.dtype)
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(f.init, None, *args))


def _outputs_and_grads(fs, params, x, s, o, ct):
  """Each transform's output and gradients w.r.t. (params, x, scale, offset).

  One jitted program for all of ``fs``: one compilation per configuration.
  """
  argnums = tuple(i for i, a in enumerate((params, x, s, o)) if a is not None)

  def run(f, *args):
    def loss(*args):
      y = f.apply(*args)
      return jnp.sum(y.astype(jnp.float32) * ct), y
    grads, y = jax.grad(loss, argnums=argnums, has_aux=True)(*args)
    return y, grads

  return jax.jit(lambda *args: [run(f, *args) for f in fs])(params, x, s, o)


def _compare(kw, shape, s=None, o=None, seed=0):
  """Initialises haiku's layer, runs both on its (randomised) params, compares."""
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  x, ct = _x(shape, seed=seed), _x(shape, seed=seed + 50)
  params = _randomise(_init(orig, x, s, o), seed)
  assert jax.tree.structure(_init(drop, x, s, o)) == jax.tree.structure(params)
  (yo, go), (yd, gd) = _outputs_and_grads((orig, drop), params, x, s, o, ct)
  assert yd.shape == yo.shape and yd.dtype == yo.dtype
  np.testing.assert_allclose(yd, yo, **TOL)
  assert jax.tree.structure(gd) == jax.tree.structure(go)
  assert len(jax.tree.leaves(gd)) >= 1 + (s is not None) + (o is not None)
  for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(go), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, **TOL)
  return yd


def _shape(rank, data_format):
  """A rank-``rank`` input with C channels where ``data_format`` puts them."""
  spatial = (5, 4, 3)[:rank - 2]
  return (3, *spatial, C) if data_format == "channels_last" else (3, C, *spatial)


def _per_channel(rank, data_format, seed):
  """A call-time per-channel parameter shaped as haiku broadcasts it."""
  shape = (C,) if data_format == "channels_last" else (C,) + (1,) * (rank - 2)
  return _x(shape, seed=seed, loc=1.0, scale=0.5)


# --- constructor, call, names and parameters ------------------------------------------


@pytest.mark.parametrize("method", ["__init__", "__call__"])
def test_signature_matches_haiku(method):
  ours = inspect.signature(getattr(GroupNorm, method)).parameters
  theirs = inspect.signature(getattr(hk.GroupNorm, method)).parameters
  assert list(ours) == list(theirs)
  for name, p in theirs.items():
    assert ours[name].kind == p.kind, name
    assert ours[name].default == p.default, name


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_params_match_haiku(data_format, x_dtype):
  """Names, shapes, dtypes and values, random initializers included."""
  def net(cls):
    def f(x):
      kw = dict(data_format=data_format, scale_init=hk.initializers.RandomNormal(),
                offset_init=hk.initializers.RandomUniform())
      y = cls(4, **kw)(x)
      y = cls(2, name="second", create_offset=False)(y) if data_format == "channels_last" else y
      return cls(4, data_format=data_format)(y)
    return hk.transform(f)
  x = _x(_shape(4, data_format), dtype=x_dtype)
  po = net(hk.GroupNorm).init(jax.random.key(0), x)
  pd = net(GroupNorm).init(jax.random.key(0), x)
  assert jax.tree.structure(pd) == jax.tree.structure(po)
  assert set(po) >= {"group_norm", "group_norm_1"}
  for a, b in zip(jax.tree.leaves(pd), jax.tree.leaves(po), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype == x_dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("direction", ["haiku_to_gnorm", "gnorm_to_haiku"])
def test_checkpoint_round_trip(tmp_path, direction):
  kw = dict(groups=4, data_format="channels_first")
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  src, dst = (orig, drop) if direction == "haiku_to_gnorm" else (drop, orig)
  x = _x(_shape(4, "channels_first"))
  params = _randomise(src.init(None, x), seed=3)
  path = tmp_path / "params.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(params)))
  loaded = flax.serialization.msgpack_restore(path.read_bytes())
  assert jax.tree.structure(loaded) == jax.tree.structure(_init(dst, x))
  np.testing.assert_allclose(dst.apply(loaded, x), src.apply(params, x), **TOL)


def test_constructor_errors_match_haiku():
  bad = [dict(axis="a"), dict(axis=(1.0,)), dict(axis=None),
         dict(create_scale=False, scale_init=jnp.ones),
         dict(create_offset=False, offset_init=jnp.zeros), dict(data_format="XYZ")]
  for kw in bad:
    for cls in (hk.GroupNorm, GroupNorm):
      with pytest.raises(ValueError):
        hk.transform(lambda kw=kw, cls=cls: cls(2, **kw)).init(None)


@pytest.mark.parametrize("kw,shape,call", [
    (dict(groups=3), (2, 4, 8), {}),                                    # 3 does not divide 8
    (dict(groups=2), (2, 4, 8), dict(s=jnp.ones(8))),                   # scale while created
    (dict(groups=2, create_scale=False), (2, 4, 8), dict(o=jnp.ones(8))),  # offset, too
    (dict(groups=2, data_format="channels_first"), (8,), {}),           # no channel axis
    (dict(groups=2), (), {}),                                           # a scalar
    (dict(groups=2, axis=(1, 1)), (2, 4, 8), {}),                       # repeated axis
    (dict(groups=2, axis=7), (2, 4, 8), {}),                            # out of range
])
def test_call_errors_match_haiku(kw, shape, call):
  x = jnp.ones(shape)
  errors = []
  for cls in (hk.GroupNorm, GroupNorm):
    with pytest.raises(Exception) as e:
      _transform(cls, **kw).init(None, x, call.get("s"), call.get("o"))
    errors.append(e.value)
  assert isinstance(errors[1], type(errors[0])), errors


def test_rank_cannot_change_between_calls():
  for cls in (hk.GroupNorm, GroupNorm):
    def f(x, cls=cls):
      layer = cls(2)
      return layer(x), layer(x[0])
    with pytest.raises(ValueError, match="rank"):
      hk.transform(f).init(None, jnp.ones((2, 3, 4)))


@pytest.mark.parametrize("rank,axis,create", [
    (3, -2, True),                # channels last: haiku's -2 is its groups axis
    (4, (1, 2, -2), True),        # every position, the groups axis, not within groups
    (3, (0, -2), False),          # the batch axis too; call-time scale and offset
])
def test_axis_over_the_groups_axis_only(rank, axis, create):
  """Statistics of the channels ``groups`` apart: gnorm reorders the channels."""
  s = o = None
  if not create:
    s, o = _per_channel(rank, "channels_last", 3), _per_channel(rank, "channels_last", 4) - 1
  _compare(dict(groups=4, axis=axis, create_scale=create, create_offset=create),
           _shape(rank, "channels_last"), s, o, seed=rank)


def test_rank_one_input_raises():
  with pytest.raises(ValueError, match="batch axis"):
    _transform(GroupNorm, groups=2).init(None, jnp.ones(C))


# --- outputs and gradients -----------------------------------------------------------


_RANK_CREATE = [
    *((r, c) for r in (2, 3, 4, 5) for c in ((True, True), (False, False))),
    (3, (True, False)), (4, (False, True))]


@pytest.mark.parametrize("rank,create", _RANK_CREATE, ids=[
    f"rank{r}-{'params' if c == (True, True) else 'call' if c == (False, False) else c}"
    for r, c in _RANK_CREATE])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_matches_haiku_outputs_and_gradients(rank, data_format, create):
  """Created params, or per-channel call-time scale/offset where not created."""
  kw = dict(groups=4, data_format=data_format, create_scale=create[0], create_offset=create[1])
  s = None if create[0] else _per_channel(rank, data_format, seed=rank)
  o = None if create[1] else _per_channel(rank, data_format, seed=rank + 9) - 1
  _compare(kw, _shape(rank, data_format), s, o, seed=rank)


def test_no_affine_at_all():
  y = _compare(dict(groups=2, create_scale=False, create_offset=False), (2, 3, C))
  g = np.asarray(y).reshape(2, 3, 2, 4)
  np.testing.assert_allclose(g.mean(axis=(1, 3)), 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["scalar", "per_sample", "full", "mixed"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_call_time_scale_offset_shapes(kind, data_format):
  """Conditional normalisation: every broadcastable shape haiku accepts."""
  shape = _shape(4, data_format)
  ch = 3 if data_format == "channels_last" else 1
  per_sample = [1] * 4
  per_sample[0], per_sample[ch] = shape[0], C
  s, o = {
      "scalar": (1.5, -0.25),  # Python floats: weakly typed, as haiku allows
      "per_sample": (_x(tuple(per_sample), 3, 1.0, 0.5), _x(tuple(per_sample), 4)),
      "full": (_x(shape, 3, 1.0, 0.5), _x(shape[1:], 4)),
      "mixed": (_per_channel(4, data_format, 3), _x(shape, 4)),
  }[kind]
  _compare(dict(groups=4, data_format=data_format, create_scale=False, create_offset=False),
           shape, s, o)


@pytest.mark.parametrize("data_format,rank,axis", [
    ("channels_last", 3, slice(2, None)),   # time series (N, T, C): per time step
    ("channels_last", 4, (1, 2, 3)),        # the default, spelled out
    ("channels_last", 4, (2, 3)),           # per row
    ("channels_last", 3, slice(0, None)),   # batch axis included
    ("channels_last", 3, -1),               # channels only
    ("channels_last", 3, (1,)),             # channel axis left out: per channel
    ("channels_first", 3, slice(2, None)),  # channels_first renumbering
    ("channels_first", 4, -1),              # haiku reads -1 as the batch axis here
    ("channels_first", 4, (1, 3)),
    ("NCHW", 4, slice(1, None)),
    ("NHWC", 4, slice(1, None)),
    ("N...C", 3, slice(1, None)),
    ("NC...", 5, slice(1, None)),
    ("BTHWD", 5, slice(1, None)),
])
def test_axis_and_data_format(data_format, rank, axis):
  df = "channels_first" if hk.get_channel_index(data_format) == 1 else "channels_last"
  # groups=2: 4 channels a group, so that a group of channels alone (the
  # channel axis its only reduced axis) is not too ill-conditioned to compare.
  _compare(dict(groups=2, axis=axis, data_format=data_format), _shape(rank, df), seed=rank)


def test_bfloat16_input_with_created_params():
  """Haiku normalises in bfloat16; gnorm in float32: same dtype, closer result."""
  kw = dict(groups=4)
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  x = _x((4, 6, 6, C), dtype=jnp.bfloat16)
  params = _randomise(_init(orig, x), seed=2)
  yo, yd = orig.apply(params, x), drop.apply(params, x)
  assert yd.dtype == yo.dtype == jnp.bfloat16
  p64 = {k: np.asarray(v, np.float64) for k, v in params["group_norm"].items()}
  ref = group_norm_ref(np.asarray(x, np.float64), 4, p64["scale"], p64["offset"])
  err_d = np.abs(np.asarray(yd, np.float64) - ref).max()
  err_o = np.abs(np.asarray(yo, np.float64) - ref).max()
  assert err_d <= float(jnp.finfo(jnp.bfloat16).eps) * np.abs(ref).max()  # one rounding
  assert err_d <= err_o
  np.testing.assert_allclose(np.asarray(yd, np.float32), np.asarray(yo, np.float32),
                             atol=4 * err_o + 1e-2)


def test_bfloat16_input_with_float32_call_time_scale():
  """Haiku's promotion: bfloat16 x with float32 scale/offset gives float32."""
  kw = dict(groups=4, create_scale=False, create_offset=False)
  x = _x((2, 5, C), dtype=jnp.bfloat16)
  s, o = _x((C,), 3, 1.0, 0.5), _x((C,), 4)
  yo = _transform(hk.GroupNorm, **kw).apply({}, x, s, o)
  yd = _transform(GroupNorm, **kw).apply({}, x, s, o)
  assert yd.dtype == yo.dtype == jnp.float32
  ref = group_norm_ref(np.asarray(x, np.float64), 4, np.asarray(s), np.asarray(o))
  np.testing.assert_allclose(yd, ref, atol=1e-5)   # float32 all the way
  np.testing.assert_allclose(yd, yo, atol=5e-2)    # haiku's bfloat16 statistics
  # A Python float is weakly typed: the output stays bfloat16.
  for cls in (hk.GroupNorm, GroupNorm):
    assert _transform(cls, **kw).apply({}, x, 2.0, 0.5).dtype == jnp.bfloat16


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_large_mean_accuracy(data_format):
  """N(100, 3^2) float32 against a float64 reference.

  Channels last, haiku reduces over strided axes of ``(N, H, W, G, C/G)``
  and the drop-in is closer to the exact result. Channels first, haiku's
  groups are contiguous and its ``jnp.mean`` is as good as gnorm's or
  slightly better: the drop-in stays within two float32 ulps of the mean
  (divided by the spread) of haiku's error. Both within gnorm's bound.
  """
  shape = (4, 16, 16, 32) if data_format == "channels_last" else (4, 32, 16, 16)
  ch = -1 if data_format == "channels_last" else 1
  kw = dict(groups=8, data_format=data_format)
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  apply = jax.jit(lambda p, x: (orig.apply(p, x), drop.apply(p, x)))
  for seed in range(3):
    x = _x(shape, seed=seed, loc=100.0, scale=3.0)
    yo, yd = apply(_init(orig, x), x)
    ref = group_norm_ref(np.asarray(x), 8, channel_axis=ch)
    err_o = np.abs(np.asarray(yo, np.float64) - ref).max()
    err_d = np.abs(np.asarray(yd, np.float64) - ref).max()
    if data_format == "channels_last":
      assert err_d <= err_o, (seed, err_d, err_o)
    else:
      assert err_d <= err_o + 2 * float(np.spacing(np.float32(100.0))) / 3.0, (seed, err_d, err_o)
    assert err_d <= 1e-5 * max(1.0, float(np.abs(x).max()) / (4 * 3.0))  # gnorm's bound


# --- transformations -----------------------------------------------------------------


def test_under_jit_and_vmap():
  kw = dict(groups=4, data_format="channels_first")
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  xs = _x((3, 2, C, 5))  # a vmapped axis in front of haiku's batch axis
  params = _randomise(_init(orig, xs[0]), 1)
  batched = lambda f: jax.vmap(f.apply, in_axes=(None, 0))  # noqa: E731
  want = jax.jit(batched(orig))(params, xs)
  np.testing.assert_allclose(jax.jit(batched(drop))(params, xs), want, **TOL)
  # Per-example call-time scales under vmap too.
  kw = dict(groups=4, create_scale=False)
  orig, drop = _transform(hk.GroupNorm, **kw), _transform(GroupNorm, **kw)
  xs, ss = _x((3, 2, 5, C)), _x((3, C), 5, 1.0, 0.5)
  params = _init(orig, xs[0], ss[0])
  f = lambda t: jax.jit(jax.vmap(t.apply, in_axes=(None, 0, 0)))  # noqa: E731
  np.testing.assert_allclose(f(drop)(params, xs, ss), f(orig)(params, xs, ss), **TOL)


def test_transform_with_state_and_hk_vmap():
  def net(cls):
    def f(x):
      y = hk.vmap(lambda e: cls(2)(e), split_rng=False)(x)
      hk.set_state("calls", hk.get_state("calls", (), jnp.int32, jnp.zeros) + 1)
      return y
    return hk.transform_with_state(f)
  x = _x((3, 2, 4, C))
  po, so = net(hk.GroupNorm).init(None, x)
  pd, sd = net(GroupNorm).init(None, x)
  assert jax.tree.structure(pd) == jax.tree.structure(po)
  po = _randomise(po, 4)
  (yo, so2), (yd, sd2) = (net(hk.GroupNorm).apply(po, so, None, x),
                          net(GroupNorm).apply(po, sd, None, x))
  np.testing.assert_allclose(yd, yo, **TOL)
  assert int(sd2["~"]["calls"]) == int(so2["~"]["calls"]) == 1


def test_import_gnorm_does_not_import_haiku():
  code = (
      "import sys, gnorm, gnorm.compat\n"
      "assert 'haiku' not in sys.modules and 'equinox' not in sys.modules, 'gnorm'\n"
      "import gnorm.compat.haiku\n"
      "assert 'haiku' in sys.modules and 'equinox' not in sys.modules, 'compat'\n")
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
