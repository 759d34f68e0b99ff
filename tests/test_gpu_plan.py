"""The GPU's reduction plan and backward pass, proven on the CPU.

CUDA and ROCm lower ``backends/xla_gpu.py`` (statistics) and
``backends/xla_gpu_vjp.py`` (the cotangent map) instead of ``maths.py``'s
plan. ``dispatch.forced("xla_gpu")`` makes the CPU lower them too, so
the suite holds them to the same float64 reference and bounds as the default
path, and their derivatives to plain autodiff. ``jax.jit`` caches a traced
program by function object, so every check traces a fresh function inside
the context (``_gpu``); ``test_the_plan_is_really_forced`` checks that the
switch reaches the lowered program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import gnorm
from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src.backends import xla_gpu
from tests.reference import group_norm_ref
from tests.reference import group_norm_ref_full
from tests.reference import naive_jnp


def _gpu(fn):
  """``fn`` jitted and traced with the GPU's plan, on the CPU."""

  def traced(*args):
    with dispatch.forced("xla_gpu"):
      return fn(*args)

  return jax.jit(traced)


def _data(shape, channel_axis=-1, loc=0.0, scale=1.0, seed=0, per_sample=False):
  rng = np.random.default_rng(seed)
  c = shape[channel_axis]
  pshape = (shape[0], c) if per_sample else (c,)
  x = (rng.normal(size=shape) * scale + loc).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, size=pshape).astype(np.float32)
  beta = rng.uniform(-1.0, 1.0, size=pshape).astype(np.float32)
  return x, gamma, beta


def _err(y, ref):
  return float(np.max(np.abs(np.asarray(y, np.float64) - ref)))


def test_the_plan_is_really_forced():
  # The GPU plan sums several terms in one variadic reduction; maths.py's
  # plan never does. Lowered for the CPU, only the forced program has them.
  x = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)

  def f(x):
    return gnorm.group_norm(None, x, 8)

  def variadic(text):
    return len(re.findall(r"stablehlo\.reduce\(%\S+ init: %\S+\), \(%", text))

  forced = _gpu(f).trace(x).lower().as_text()
  default = jax.jit(lambda x: f(x)).trace(x).lower().as_text()
  assert variadic(forced) >= 2 and variadic(default) == 0


def test_forced_plan_names_are_checked():
  with pytest.raises(ValueError, match="implementation must be one of"):
    with dispatch.forced("cuda"):
      pass


# (shape, channel_axis, n_groups): ranks 2 to 5, every layout, and shapes big
# enough that partials hold R_MAX elements or that an axis cannot be split.
LAYOUTS = [
    ((4, 12), -1, 3),
    ((3, 7, 16), -1, 4),
    ((3, 16, 7), 1, 8),
    ((2, 5, 6, 8), -1, 1),
    ((2, 8, 5, 6), 1, 2),
    ((2, 5, 8, 6), 2, 4),
    ((2, 3, 4, 5, 16), -1, 4),
    ((2, 16, 3, 4, 5), 1, 16),
    ((2, 64, 64, 32), -1, 8),
    ((1, 32, 48, 48), 1, 4),
    ((2, 40, 16, 96), 2, 4),
    ((2, 1031, 16), -1, 4),  # a prime length: one partial per channel
]


@pytest.mark.parametrize("shape,channel_axis,n_groups", LAYOUTS)
@pytest.mark.parametrize("loc,scale,bound", [(0.0, 1.0, 1e-5), (100.0, 3.0, 1e-4)])
def test_float32_matches_reference(shape, channel_axis, n_groups, loc, scale, bound):
  x, gamma, beta = _data(shape, channel_axis, loc, scale, seed=1)
  y = _gpu(lambda x, g, b: gnorm.group_norm({"gamma": g, "beta": b}, x, n_groups,
                                            channel_axis=channel_axis))(x, gamma, beta)
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  assert y.dtype == jnp.float32 and _err(y, ref) <= bound


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_within_one_output_rounding(dtype):
  x, gamma, beta = _data((2, 32, 32, 64), seed=2)
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  y = _gpu(lambda x: gnorm.group_norm({"gamma": gamma, "beta": beta}, x.astype(dtype), 8))(x)
  ref = group_norm_ref(x, 8, gamma, beta)
  assert y.dtype == dtype
  ulp = 2.0 ** -(8 if dtype == jnp.bfloat16 else 11)
  assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= ulp * np.abs(ref) + 1e-5)


def test_pivots_far_from_the_mean_keep_the_bound():
  # Each partial is shifted by its first element; make every first element
  # a 30-sigma outlier (the worst case Samuelson's inequality allows a
  # partial of 32 is about 5.6 sigma; this is far beyond it) on offset data.
  shape = (2, 64, 64, 32)
  x, gamma, beta = _data(shape, loc=100.0, scale=1.0, seed=3)
  r = xla_gpu.chunks(maths.view(shape, 3)).r
  xs = x.reshape(2, -1, 32)
  xs[:, ::r, :] = 130.0
  y = _gpu(lambda x: gnorm.group_norm({"gamma": gamma, "beta": beta}, x, 8))(x)
  ref = group_norm_ref(x, 8, gamma, beta)
  xg = x.astype(np.float64).reshape(2, -1, 8, 4)
  bound = 1e-5 * max(1.0, float(np.min(np.abs(xg).max(axis=(1, 3)) / xg.std(axis=(1, 3)))) / 4)
  assert _err(y, ref) <= bound


@st.composite
def _cases(draw):
  rank = draw(st.integers(2, 5))
  n = draw(st.integers(1, 3))
  n_groups = draw(st.sampled_from([1, 2, 4]))
  c = n_groups * draw(st.integers(1, 4))
  spatial = [draw(st.sampled_from([1, 3, 5, 16, 24])) for _ in range(rank - 2)]
  channel_axis = draw(st.integers(1, rank - 1))
  shape = [n, *spatial]
  shape.insert(channel_axis, c)
  return (tuple(shape), channel_axis, n_groups, draw(st.floats(-1e3, 1e3)),
          draw(st.floats(1e-2, 1e2)), draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=30, deadline=None)
@given(_cases())
def test_property_matches_reference(case):
  # docs/accuracy.md's bound, scaled to the data's spread as in
  # tests/test_group_norm.py: 1e-5 * max(1, max|x| * rstd / 4) per group.
  shape, channel_axis, n_groups, loc, scale, seed = case
  x, gamma, beta = _data(shape, channel_axis, loc, scale, seed)
  y = _gpu(lambda x: gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups,
                                      channel_axis=channel_axis))(x)
  ref = group_norm_ref(x, n_groups, gamma, beta, 1e-5, channel_axis)
  xl = np.moveaxis(x.astype(np.float64), channel_axis, -1)
  xg = xl.reshape(shape[0], -1, n_groups, xl.shape[-1] // n_groups)
  rstd = 1 / np.sqrt(xg.var(axis=(1, 3)) + 1e-5)
  tol = 1e-5 * np.maximum(1.0, np.abs(xg).max(axis=(1, 3)) * rstd / 4)
  tol = np.repeat(tol, xl.shape[-1] // n_groups, axis=1)[:, None, :]
  err = np.abs(np.moveaxis(np.asarray(y, np.float64) - ref, channel_axis, -1))
  assert np.all(err.reshape(shape[0], -1, xl.shape[-1]) <= tol)


def _seq_mask(n, length):
  lengths = np.linspace(length // 3, length, n).astype(int)
  return np.arange(length)[None, :, None] < lengths[:, None, None]


# name: (shape, channel_axis, n_groups, mask, options)
OPTIONS = {
    "sequence_mask": ((3, 50, 32), -1, 4, _seq_mask(3, 50), {}),
    "random_mask_silu": ((2, 16, 16, 32), -1, 8,
                         np.random.default_rng(4).random((2, 16, 16, 32)) < 0.7,
                         {"activation": "silu"}),
    "nchw_mask_gelu": ((2, 32, 10, 10), 1, 4,
                       np.random.default_rng(5).random((2, 1, 10, 10)) < 0.8,
                       {"activation": "gelu"}),
    "relu": ((2, 16, 16, 32), -1, 8, None, {"activation": "relu"}),
    "gelu_tanh_per_sample": ((3, 8, 8, 16), -1, 4, None, {"activation": "gelu_tanh"}),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_options_match_reference(name):
  shape, channel_axis, n_groups, mask, kw = OPTIONS[name]
  x, gamma, beta = _data(shape, channel_axis, loc=5.0, seed=6,
                         per_sample=name.endswith("per_sample"))
  if mask is not None:
    x = np.where(np.broadcast_to(mask, shape), x, np.nan)  # garbage in the padding
  y = _gpu(lambda x, m: gnorm.group_norm({"gamma": gamma, "beta": beta}, x, n_groups,
                                         channel_axis=channel_axis, mask=m, **kw))(x, mask)
  ref = group_norm_ref_full(np.nan_to_num(x), n_groups, gamma, beta, 1e-5, channel_axis,
                            mask=mask, activation=kw.get("activation"))
  assert _err(y, ref) <= 1e-5


def test_eps_zero_constant_and_empty_groups():
  # eps=0: a constant group normalises to exactly 0 (its variance is exactly
  # 0) with finite gradients; a group with nothing counted outputs 0.
  x = np.random.default_rng(7).normal(size=(2, 6, 6, 8)).astype(np.float32)
  x[0, ..., :4] = 0.1
  mask = np.ones((2, 6, 6, 1), bool)
  mask[1] = False
  for m in (None, mask):
    f = _gpu(lambda x, m: gnorm.group_norm(None, x, 2, eps=0.0, mask=m))
    y = np.asarray(f(x, m))
    assert np.all(y[0, ..., :4] == 0)
    if m is not None:
      assert np.all(y[1] == 0)
    g = _gpu(jax.grad(lambda x, m: jnp.sum(jnp.sin(gnorm.group_norm(None, x, 2, eps=0.0,
                                                                     mask=m)))))(x, m)
    assert np.all(np.isfinite(g))


GRAD_CASES = [((2, 3, 8), -1, 4, None, False), ((2, 4, 3, 2), 1, 2, "silu", False),
              ((3, 8), -1, 2, None, True), ((2, 5, 6, 4), 2, 3, "gelu", True)]


@pytest.mark.parametrize("shape,channel_axis,n_groups,activation,per_sample",
                         GRAD_CASES[1:2] + GRAD_CASES[3:])  # the other two: below, by autodiff
def test_check_grads_second_order_fwd_and_rev(x64, shape, channel_axis, n_groups, activation,
                                             per_sample):
  x, gamma, beta = _data(shape, channel_axis, loc=1.0, seed=8, per_sample=per_sample)
  params = {"gamma": gamma.astype(np.float64), "beta": beta.astype(np.float64)}

  def f(p, x):
    with dispatch.forced("xla_gpu"):
      return gnorm.group_norm(p, x, n_groups, channel_axis=channel_axis, activation=activation)

  check_grads(f, (params, x.astype(np.float64)), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("shape,channel_axis,n_groups,activation,per_sample", GRAD_CASES)
def test_derivatives_match_plain_autodiff(x64, shape, channel_axis, n_groups, activation,
                                          per_sample):
  x, gamma, beta = _data(shape, channel_axis, loc=-2.0, seed=9, per_sample=per_sample)
  params = {"gamma": jnp.asarray(gamma, jnp.float64), "beta": jnp.asarray(beta, jnp.float64)}
  x = jnp.asarray(x, jnp.float64)
  ct = jnp.asarray(np.random.default_rng(9).normal(size=shape))

  def loss(gn):
    return lambda p, x: jnp.sum(jnp.tanh(gn(p, x)) * ct)

  ours = loss(lambda p, x: gnorm.group_norm(p, x, n_groups, channel_axis=channel_axis,
                                            activation=activation))
  naive = loss(lambda p, x: naive_jnp(p, x, n_groups, channel_axis, activation))

  def derivatives(f):
    return (jax.grad(f, argnums=(0, 1))(params, x), jax.jacfwd(f, argnums=1)(params, x),
            jax.hessian(f, argnums=1)(params, x), jax.jacrev(jax.grad(f), argnums=1)(params, x))

  for u, v in zip(jax.tree_util.tree_leaves(_gpu(lambda: derivatives(ours))()),
                  jax.tree_util.tree_leaves(jax.jit(lambda: derivatives(naive))()), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_vmap_of_gradients_folds_the_batch(activation, per_sample, with_mask, n):
  # Per-example gradients: vmap over a batch of inputs and cotangents, the
  # case the primitives fold into their sample axis. Compared with a loop.
  x, gamma, beta = _data((4, n, 6, 6, 16), seed=10, per_sample=False)
  if per_sample:
    gamma = np.broadcast_to(gamma, (n, 16)).copy()
    beta = np.broadcast_to(beta, (n, 16)).copy()
  cts = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)
  mask = (np.arange(6)[None, :, None, None] < 4) if with_mask else None

  def grads(x, ct):
    def loss(p, x):
      y = gnorm.group_norm(p, x, 4, mask=mask, activation=activation)
      return jnp.sum(y * ct)
    return jax.grad(loss, argnums=(0, 1))({"gamma": gamma, "beta": beta}, x)

  batched = _gpu(jax.vmap(grads))(x, cts)
  for i in range(4):
    one = _gpu(grads)(x[i], cts[i])
    for u, v in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(batched),
                    strict=True):
      np.testing.assert_allclose(v[i], u, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_vmap_with_batched_parameters(activation):
  # Parameters batched with x (flax's nn.vmap over params), or tangents of
  # parameters batched while the parameters are not: the folded primitives
  # keep a parameter and its (co)tangent the same shape.
  x, gamma, beta = _data((3, 2, 5, 16), seed=13)
  gammas = 1 + 0.1 * np.random.default_rng(13).normal(size=(3, 16)).astype(np.float32)
  betas = 0.1 * np.random.default_rng(14).normal(size=(3, 16)).astype(np.float32)

  def f(g, b, x):
    return jnp.sum(jnp.sin(gnorm.group_norm({"gamma": g, "beta": b}, x, 4,
                                            activation=activation)))

  batched = _gpu(jax.vmap(jax.grad(f, argnums=(0, 1, 2))))(gammas, betas, x)
  for i in range(3):
    one = _gpu(jax.grad(f, argnums=(0, 1, 2)))(gammas[i], betas[i], x[i])
    for u, v in zip(one, batched, strict=True):
      np.testing.assert_allclose(v[i], u, rtol=2e-5, atol=2e-5)
  grad_of_vmap = _gpu(jax.grad(lambda g, b, x: jnp.sum(jax.vmap(f)(g, b, x)),
                               argnums=(0, 1)))(gammas, betas, x)
  np.testing.assert_allclose(grad_of_vmap[0], batched[0], rtol=2e-5, atol=2e-5)
  # Forward mode, a batch of parameter tangents at one parameter value.
  tg = np.random.default_rng(15).normal(size=(3, 16)).astype(np.float32)
  jvps = _gpu(jax.vmap(lambda x, t: jax.jvp(lambda g: f(g, beta, x), (gamma,), (t,))[1]))(x, tg)
  for i in range(3):
    one = _gpu(lambda x, t: jax.jvp(lambda g: f(g, beta, x), (gamma,), (t,))[1])(x[i], tg[i])
    np.testing.assert_allclose(jvps[i], one, rtol=2e-5, atol=2e-5)


def test_vmap_over_tangents_or_cotangents_only():
  # jacfwd batches the tangents only, jacrev the cotangents only: the
  # primitives then vmap their plain maps. Compared with the default path.
  x, gamma, beta = _data((2, 3, 8), seed=11)
  p = {"gamma": gamma, "beta": beta}

  def f(x):
    return gnorm.group_norm(p, x, 4, activation="silu")

  for jac in (jax.jacfwd, jax.jacrev):
    ours = _gpu(jac(f))(x)
    ref = jax.jit(jac(lambda x: f(x)))(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_float32_gradients_match_float64(x64):
  x, gamma, beta = _data((2, 32, 32, 32), loc=100.0, scale=3.0, seed=12)
  ct = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
  params = {"gamma": gamma, "beta": beta}
  g32 = _gpu(jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(p, x, 8) * ct),
                      argnums=(0, 1)))(params, x)
  p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
  g64 = jax.jit(jax.grad(lambda p, x: jnp.sum(naive_jnp(p, x, 8) * ct.astype(np.float64)),
                         argnums=(0, 1)))(p64, jnp.asarray(x, jnp.float64))
  assert g32[1].dtype == jnp.float32
  np.testing.assert_allclose(g32[1], g64[1], atol=2e-5)
  np.testing.assert_allclose(g32[0]["gamma"], g64[0]["gamma"], atol=1e-3)
  np.testing.assert_allclose(g32[0]["beta"], g64[0]["beta"], atol=1e-3)


def test_backward_keeps_only_x_and_group_statistics():
  # What reverse mode keeps: x itself and (N, G) statistics, nothing float32
  # of x's size, with the GPU plan as with the default one.
  x = jnp.zeros((2, 8, 8, 32), jnp.bfloat16)
  params = {"gamma": jnp.ones(32), "beta": jnp.zeros(32)}

  def leaves(p, x):
    with dispatch.forced("xla_gpu"):
      return jax.tree_util.tree_leaves(
          jax.vjp(lambda p, x: gnorm.group_norm(p, x, 8, activation="silu"), p, x)[1])

  jaxpr = jax.make_jaxpr(leaves)(params, x).jaxpr
  big = [v.aval for v in jaxpr.outvars if v.aval.size >= x.size]
  assert [(a.shape, a.dtype) for a in big] == [(x.shape, x.dtype)]
