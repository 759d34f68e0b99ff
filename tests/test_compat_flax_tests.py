"""flax's own GroupNorm tests, replayed against gnorm's flax drop-ins.

Each test below names the flax test it replays (flax 0.12:
``tests/linen/linen_test.py``, class ``NormalizationTest``, and
``tests/nnx/nn/normalization_test.py``, class ``TestLinenConsistency``) and
runs it on ``gnorm.compat.linen.GroupNorm`` and ``gnorm.compat.nnx.GroupNorm``
with flax's inputs and arguments, keeping flax's own assertion and adding a
comparison with flax's layer on the same inputs and parameters. Then every
kind of ``reduction_axes`` flax accepts (any order, negative, repeated,
kept axes anywhere), against ``flax.linen.GroupNorm``, values and gradients,
within gnorm's bound (1e-5 on N(0, 1) float32 data, docs/accuracy.md).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import random

from gnorm.compat import linen as compat
from gnorm.compat import nnx as compat_nnx
from tests.reference import group_norm_ref


def _nnx_layer(cls, channels, **kw):
  return cls(channels, rngs=nnx.Rngs(0), **kw)


def _nnx_call(layer, x, **call):
  # Jitted, as everything here: one compilation instead of one per operation.
  return nnx.jit(lambda m, x, c: m(x, **c))(layer, x, call)


def _both(kw, x, **call):
  """The outputs of the linen drop-in and flax.linen (``init_with_output``
  with flax's key, as flax's tests do), and of the nnx drop-in."""
  key2 = random.split(random.key(0))[1]
  y, v = jax.jit(compat.GroupNorm(**kw).init_with_output)(key2, x, **call)
  y_flax, v_flax = jax.jit(nn.GroupNorm(**kw).init_with_output)(key2, x, **call)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), v, v_flax))
  nnx_kw = {k: a for k, a in kw.items() if k != "num_groups"}
  layer = _nnx_layer(compat_nnx.GroupNorm, x.shape[-1], num_groups=kw.get("num_groups"), **nnx_kw)
  return y, y_flax, _nnx_call(layer, x, **call)


# --- tests/linen/linen_test.py, NormalizationTest ------------------------------------


def _flax_reference(x, group_shape, axes, e):
  """flax's one-liner ``(x_gr - mean) * rsqrt(var + e)``, in NumPy (float64)."""
  x_gr = np.asarray(x, np.float64).reshape(group_shape)
  y = (x_gr - x_gr.mean(axis=axes, keepdims=True)) / np.sqrt(
      x_gr.var(axis=axes, keepdims=True) + e)
  return y.reshape(np.shape(x))



def test_group_norm():
  # NormalizationTest.test_group_norm: the default reduction axes on rank 5.
  key1 = random.split(random.key(0))[0]
  e = 1e-5
  x = random.normal(key1, (2, 5, 4, 4, 32))
  y, y_flax, y_nnx = _both(dict(num_groups=2, use_bias=False, use_scale=False, epsilon=e), x)
  y_test = _flax_reference(x, [2, 5, 4, 4, 2, 16], (1, 2, 3, 5), e)
  for out in (y, y_nnx):
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_allclose(y_test, out, atol=1e-4)  # flax's assertion
    np.testing.assert_allclose(out, y_flax, rtol=0, atol=1e-5)


def test_group_norm_unbatched():
  # NormalizationTest.test_group_norm_unbatched: reduction_axes=(0, 1, 3, 4)
  # keeps axis 2, between reduced axes (the drop-ins transpose it to the front).
  key1 = random.split(random.key(0))[0]
  e = 1e-5
  x = random.normal(key1, (2, 5, 4, 4, 32))
  kw = dict(num_groups=2, use_bias=False, use_scale=False, epsilon=e,
            reduction_axes=(0, 1, 3, 4))
  y, y_flax, y_nnx = _both(kw, x)
  y_test = _flax_reference(x, [2, 5, 4, 4, 2, 16], (0, 1, 3, 5), e)
  nnx_flax = _nnx_call(_nnx_layer(nnx.GroupNorm, 32, num_groups=2, use_bias=False,
                                  use_scale=False, epsilon=e, reduction_axes=(0, 1, 3, 4)), x)
  for out in (y, y_nnx):
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_allclose(y_test, out, atol=1e-4)  # flax's assertion
    np.testing.assert_allclose(out, y_flax, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out, nnx_flax, rtol=0, atol=1e-5)  # one kept axis: nnx agrees


def test_group_norm_batched():
  # NormalizationTest.test_group_norm_batched: reduction_axes=(-3, -2, -1),
  # then the same layer on 5 stacked copies (two leading kept axes).
  key1 = random.split(random.key(0))[0]
  e = 1e-5
  x = random.normal(key1, (3, 4, 32))
  kw = dict(num_groups=2, use_bias=False, use_scale=False, epsilon=e,
            reduction_axes=(-3, -2, -1))
  y, y_flax, y_nnx = _both(kw, x)
  x_stacked = jnp.stack([x] * 5)
  y_stacked = jax.jit(compat.GroupNorm(**kw).apply)({}, x_stacked)
  y_stacked_flax = jax.jit(nn.GroupNorm(**kw).apply)({}, x_stacked)
  y_stacked_nnx = _nnx_call(_nnx_layer(compat_nnx.GroupNorm, 32, **kw), x_stacked)
  y_test = _flax_reference(x_stacked, [5, 3, 4, 2, 16], (1, 2, 4), e)
  for one, stacked in ((y, y_stacked), (y_nnx, y_stacked_nnx)):
    assert one.dtype == x.dtype and one.shape == x.shape
    np.testing.assert_allclose(one, stacked[0, ...], atol=1e-4)  # flax's assertions
    np.testing.assert_allclose(y_test, stacked, atol=1e-4)
    np.testing.assert_allclose(one, y_flax, rtol=0, atol=1e-5)
    np.testing.assert_allclose(stacked, y_stacked_flax, rtol=0, atol=1e-5)


def test_group_norm_mask():
  # NormalizationTest.test_group_norm_mask: NaN wherever the random mask is
  # False; the counted positions have mean 0 and variance 1 per group. The
  # drop-ins output 0 at the padding (flax: NaN there), so flax's values are
  # compared where the mask holds.
  key = random.key(0)
  keys = random.split(key)
  x = random.normal(keys[0], (13, 3, 5, 7 * 11))
  m = random.choice(keys[1], 2, x.shape).astype(bool)
  m = m.at[..., :2].set(True)  # guarantee at least 2 elements
  x = jnp.where(m, x, jnp.nan)
  y, y_flax, y_nnx = _both(dict(num_groups=7, use_bias=False, use_scale=False), x, mask=m)
  m = np.asarray(m)
  mr = m.reshape((13, 3, 5, 7, 11))
  axes = tuple(range(1, x.ndim - 1)) + (-1,)
  for out in (y, y_nnx):
    out = np.asarray(out)
    yr = out.reshape((13, 3, 5, 7, 11))
    np.testing.assert_allclose(yr.mean(axes, where=mr), 0, atol=1e-4)  # flax's assertions
    np.testing.assert_allclose(yr.var(axes, where=mr), 1, atol=1e-4)
    np.testing.assert_allclose(out[m], np.asarray(y_flax)[m], rtol=0, atol=1e-5)
    assert not np.any(out[~m])  # padding outputs 0, not NaN


@pytest.mark.parametrize("kw, match", [
    # NormalizationTest.test_group_norm_raises
    (dict(num_groups=3), r"\(3\).* divid\w* the number of channels \(32\)"),
    # NormalizationTest.test_group_norm_raises_incorrect_reduction_axes
    (dict(num_groups=3, reduction_axes=(0, 1, 2, 3)),
     r"must include the (final dimension|last axis)"),
], ids=["test_group_norm_raises", "test_group_norm_raises_incorrect_reduction_axes"])
def test_group_norm_raises(kw, match):
  key1, key2 = random.split(random.key(0))
  x = random.normal(key1, (2, 5, 4, 4, 32))
  for cls in (nn.GroupNorm, compat.GroupNorm):
    with pytest.raises(ValueError, match=match):
      cls(use_bias=False, use_scale=False, epsilon=1e-5, **kw).init_with_output(key2, x)
  # The nnx drop-in, with groups that divide 32 for the axes' case (its
  # constructor checks the groups first, as flax.nnx's does; flax.nnx 0.12
  # itself accepts these axes with 4 groups).
  nnx_kw = dict(kw, num_groups=4) if "reduction_axes" in kw else kw
  with pytest.raises(ValueError, match=match):
    _nnx_layer(compat_nnx.GroupNorm, 32, **nnx_kw)(x)


@pytest.mark.parametrize("other, kw", [
    (nn.LayerNorm(reduction_axes=(1, 2, 3), bias_init=nn.initializers.uniform(),
                  scale_init=nn.initializers.uniform()), dict(num_groups=1)),
    (nn.InstanceNorm(bias_init=nn.initializers.uniform(), scale_init=nn.initializers.uniform()),
     dict(num_groups=None, group_size=1)),
], ids=["layer_norm", "instance_norm"])
def test_normalization_equivalence(other, kw):
  # NormalizationTest.test_normalization_equivalence, its two GroupNorm cases:
  # the same variables as flax's LayerNorm / InstanceNorm, the same outputs.
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  layer = compat.GroupNorm(bias_init=nn.initializers.uniform(),
                           scale_init=nn.initializers.uniform(), **kw)
  v_other, v_ours = (jax.jit(m.init)(jax.random.key(1), x) for m in (other, layer))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), v_other, v_ours))
  y_ours = jax.jit(layer.apply)(v_ours, x)
  np.testing.assert_allclose(jax.jit(other.apply)(v_other, x), y_ours, atol=1e-6)
  np.testing.assert_allclose(jax.jit(nn.GroupNorm(**kw).apply)(v_ours, x), y_ours, atol=1e-6)


# --- tests/nnx/nn/normalization_test.py, TestLinenConsistency ------------------------


class _LinenModel(nn.Module):
  norm: type
  dtype: object = None
  param_dtype: object = jnp.float32
  use_fast_variance: bool = True

  def setup(self):
    self.norm_layer = self.norm(num_groups=3, dtype=self.dtype, param_dtype=self.param_dtype,
                                use_fast_variance=self.use_fast_variance)
    self.linear = nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, x, *, mask=None):
    return self.linear(self.norm_layer(x, mask=mask))


class _NNXModel(nnx.Module):
  def __init__(self, norm, dtype, param_dtype, use_fast_variance, rngs):
    self.norm_layer = norm(6, num_groups=3, dtype=dtype, param_dtype=param_dtype,
                           use_fast_variance=use_fast_variance, rngs=rngs)
    self.linear = nnx.Linear(6, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, *, mask=None):
    return self.linear(self.norm_layer(x, mask=mask))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("use_fast_variance", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_nnx_linen_groupnorm_equivalence(dtype, param_dtype, use_fast_variance, masked):
  # TestLinenConsistency.test_nnx_linen_groupnorm_equivalence: GroupNorm(6,
  # num_groups=3) then a Linear, in linen and nnx, with the linen model's
  # Dense weights copied into the nnx model. flax asserts the two flax models
  # equal; here each drop-in's model equals flax's within the dtype's
  # rounding. With the mask (one channel of each group counted) the drop-ins
  # output 0 at the padding, so the normalisation layers' outputs are
  # compared where the mask holds.
  mask = np.array([True, False, True, False, True, False]) if masked else None
  x = jax.random.normal(jax.random.key(0), (10, 6))
  kw = dict(dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance)
  variables = _LinenModel(nn.GroupNorm, **kw).init(jax.random.key(1), x)
  tol = 1e-5 if dtype == param_dtype == jnp.float32 else 1e-2
  outs = []
  for norm, nnx_norm in ((nn.GroupNorm, nnx.GroupNorm), (compat.GroupNorm, compat_nnx.GroupNorm)):
    linen = _LinenModel(norm, **kw)
    model = _NNXModel(nnx_norm, rngs=nnx.Rngs(42), **kw)
    # flax writes ``.value =``, deprecated since (filterwarnings=error here).
    model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    model.linear.bias[...] = variables["params"]["linear"]["bias"]
    if masked:
      outs.append((linen.apply(variables, x, mask=mask, method=lambda m, x, mask: m.norm_layer(
          x, mask=mask)), model.norm_layer(x, mask=mask)))
    else:
      outs.append((linen.apply(variables, x), model(x)))
  (linen_flax, nnx_flax), (linen_ours, nnx_ours) = outs
  if not masked:
    # Each output of the Linear sums the 6 of the normalisation, each within
    # tol: within tol times the largest column sum of |kernel|.
    kernel = np.asarray(variables["params"]["linear"]["kernel"], np.float32)
    tol *= float(np.abs(kernel).sum(0).max())
  for ours, theirs in ((linen_ours, linen_flax), (nnx_ours, nnx_flax), (nnx_ours, linen_ours)):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    keep = np.ones(ours.shape, bool) if mask is None else np.broadcast_to(mask, ours.shape)
    np.testing.assert_allclose(np.where(keep, ours, 0).astype(np.float32),
                               np.where(keep, theirs, 0).astype(np.float32), rtol=0, atol=tol)


# --- every reduction_axes flax accepts -----------------------------------------------


def _scale_init(key, shape, dtype):
  return (1 + 0.3 * jax.random.normal(key, shape)).astype(dtype)


# Leading kept axes, channels only and unbatched input are in test_compat_linen.py.
AXES = {
    "interleaved": (0, 1, 3, 4),  # flax's test_group_norm_unbatched: axis 2 kept
    "unordered_repeated": (4, 1, 3, 1),  # kept: axes 0 and 2
    "negative_mixed": (-4, 2, -1),  # kept: axes 0 and 3
    "kept_next_to_channels": (0, 1, 2, -1),  # kept: axis 3
}


@pytest.mark.parametrize("name", sorted(AXES))
def test_reduction_axes_equal_flax_linen(name):
  # Values and gradients (w.r.t. x, scale and bias) of both drop-ins against
  # flax.linen on the same parameters, under jit, with a mask that varies
  # along a kept and a reduced axis.
  axes = AXES[name]
  x = jax.random.normal(jax.random.key(2), (2, 3, 4, 5, 8))
  # Of shape (1, 3, 4, 1, C), as flax reshapes the mask's last axis into
  # groups; the same for every channel, so that no group keeps only one or
  # two elements (flax's one-pass variance would lose its digits there).
  mask = jax.random.uniform(jax.random.key(3), (1, 3, 4, 1, 1)) < 0.8
  mask = jnp.broadcast_to(mask.at[:, 0].set(True), (1, 3, 4, 1, 8))
  kw = dict(num_groups=2, reduction_axes=axes, scale_init=_scale_init,
            bias_init=nn.initializers.normal(0.3))
  variables = jax.jit(nn.GroupNorm(**kw).init)(jax.random.key(1), x)
  w = jax.random.normal(jax.random.key(4), x.shape)
  nnx_layer = compat_nnx.GroupNorm(8, 2, reduction_axes=axes, rngs=nnx.Rngs(0))
  state = nnx.state(nnx_layer)
  nnx.replace_by_pure_dict(state, variables["params"])
  nnx.update(nnx_layer, state)

  def loss(apply, jit=jax.jit, grad=jax.value_and_grad):
    def f(v, x):
      y = apply(v, x)
      return jnp.sum(jnp.where(mask, jnp.sin(y) * w, 0.0)), y
    return jit(grad(f, argnums=(0, 1), has_aux=True))

  results = [loss(lambda v, x, m=m: m.apply(v, x, mask=mask))(variables, x)
             for m in (nn.GroupNorm(**kw), compat.GroupNorm(**kw))]
  (_, y), (g_state, g_x) = loss(lambda m, x: m(x, mask=mask), nnx.jit, nnx.value_and_grad)(
      nnx_layer, x)
  results.append(((None, y), ({"params": nnx.to_pure_dict(g_state)}, g_x)))
  (_, y_flax), g_flax = results[0]
  for (_, y), g in results[1:]:
    np.testing.assert_allclose(jnp.where(mask, y, 0), jnp.where(mask, y_flax, 0), rtol=0,
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_flax), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
  # Unmasked, against the float64 reference: the kept axes moved to the
  # front and folded into its batch axis.
  kept = [a for a in range(4) if a not in {int(b) % 5 for b in np.atleast_1d(axes)}]
  moved = np.moveaxis(np.asarray(x), kept, list(range(len(kept))))
  p = variables["params"]
  ref = group_norm_ref(moved.reshape(-1, *moved.shape[len(kept):]), 2, p["scale"], p["bias"],
                       eps=1e-6).reshape(moved.shape)
  ref = np.moveaxis(ref, list(range(len(kept))), kept)
  np.testing.assert_allclose(jax.jit(compat.GroupNorm(**kw).apply)(variables, x), ref, rtol=0,
                             atol=1e-5)
