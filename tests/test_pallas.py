"""``implementation="pallas"``: the GPU kernels, run in Pallas's interpreter.

On a CPU the kernels of ``gnorm/_src/backends/pallas_triton.py`` run in
interpret mode (picked at lowering time), so CI checks their values against
the float64 reference and the XLA path, and every transformation through
them, for both plans (one pass when a group fits in a block, two kernels
otherwise). Their lowering for CUDA (Triton) is checked in ``test_pallas_export.py``.
Shapes are small, but cover the tails: several row blocks with a partial
last one (S > 512), several channel blocks (C > 128), odd C, G = 1 and G = C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gnorm
from tests.reference import group_norm_ref_full
from tests.reference import naive_jnp

# (shape, n_groups, channel_axis, dtype, activation, per_sample)
CASES = {
  "nhwc-odd": ((2, 7, 12), 3, -1, np.float32, None, False),
  "nchw-silu": ((2, 12, 5, 3), 4, 1, np.float32, "silu", False),
  "rank2-G=C-relu": ((3, 10), 10, -1, np.float32, "relu", False),
  "G=1-gelu": ((2, 5, 5, 6), 1, -1, np.float32, "gelu", False),
  "row-tail": ((1, 600, 12), 4, -1, np.float32, "gelu_tanh", False),
  "channel-tail": ((2, 3, 200), 8, -1, np.float32, None, True),
  "nchw-row-tail": ((1, 6, 700), 3, 1, np.float32, "silu", False),
  "bf16-per-sample-silu": ((2, 9, 9, 40), 8, -1, jnp.bfloat16, "silu", True),
  "f16-nchw": ((2, 8, 4, 4), 2, 1, np.float16, None, False),
}


def _data(shape, axis, dtype, per_sample, seed=0):
  rng = np.random.default_rng(seed)
  x = np.asarray(jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype))
  c, n = shape[axis], shape[0]
  pshape = (n, c) if per_sample else (c,)
  params = {"gamma": (1 + 0.3 * rng.normal(size=pshape)).astype(np.float32),
            "beta": (0.3 * rng.normal(size=pshape)).astype(np.float32)}
  return x, params


def _norm(impl, g, axis, act):
  return jax.jit(lambda p, x: gnorm.group_norm(p, x, g, channel_axis=axis, activation=act,
                                               implementation=impl))


@pytest.fixture(params=["one_pass", "two_kernels"])
def plan(request, monkeypatch):
  """Both plans of ``backends/pallas.py``: a group in one block (x read
  once), or partial moments then a normalising pass (forced by a zero
  one-pass budget, as for a large group)."""
  from gnorm._src.backends import pallas
  from gnorm._src.backends import pallas_triton

  if request.param == "two_kernels":
    monkeypatch.setattr(pallas_triton, "ONE_PASS_MAX_ELEMENTS", 0)
  else:  # these small tests have few (sample, group) pairs
    monkeypatch.setattr(pallas, "ONE_PASS_MIN_PROGRAMS", 0)
  return request.param


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_match_reference_and_xla(name, plan):
  shape, g, axis, dtype, act, per_sample = CASES[name]
  x, p = _data(shape, axis, dtype, per_sample)
  y = _norm("pallas", g, axis, act)(p, x)
  assert y.dtype == x.dtype and y.shape == x.shape
  y = np.asarray(y, np.float64)
  ref = group_norm_ref_full(np.asarray(x, np.float64), g, p["gamma"], p["beta"],
                            channel_axis=axis, activation=act)
  # docs/accuracy.md's bounds: 1e-5 in float32 on N(0, 1) data, one output rounding in
  # half precision (2^-8 relative for bfloat16, 2^-11 for float16).
  rel = {np.float32: 0.0, jnp.bfloat16: 2.0**-8, np.float16: 2.0**-10}[dtype]
  assert np.all(np.abs(y - ref) <= 1e-5 + rel * np.abs(ref)), np.max(np.abs(y - ref))
  y_xla = np.asarray(_norm("xla", g, axis, act)(p, x), np.float64)
  assert np.all(np.abs(y - y_xla) <= 2e-6 + 2 * rel * np.abs(y_xla))


@pytest.mark.parametrize("name", ["nhwc-odd", "nchw-silu", "channel-tail", "G=1-gelu",
                                  "bf16-per-sample-silu"])
def test_gradients_match_xla(name, plan):
  shape, g, axis, dtype, act, per_sample = CASES[name]
  x, p = _data(shape, axis, dtype, per_sample, seed=1)
  ct = np.random.default_rng(2).normal(size=shape).astype(np.float32)

  def loss(impl):
    f = lambda p, x: gnorm.group_norm(p, x, g, channel_axis=axis, activation=act,  # noqa: E731
                                      implementation=impl)
    return jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32) * ct),
                            argnums=(0, 1)))

  got, want = loss("pallas")(p, x), loss("xla")(p, x)
  tol = 1e-5 if dtype == np.float32 else 2e-2
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_kernels_match_float64_reference(x64, name):
  # The backward kernels (partial sums, their combine, dx) in the interpreter
  # against float64 autodiff of the plain formula: every layout, tail and
  # dtype. They do not depend on the forward's plan: one run per case.
  shape, g, axis, dtype, act, per_sample = CASES[name]
  x, p = _data(shape, axis, dtype, per_sample, seed=7)
  ct = np.asarray(jnp.asarray(np.random.default_rng(8).normal(size=shape), dtype))
  f = lambda p, x: gnorm.group_norm(p, x, g, channel_axis=axis, activation=act,  # noqa: E731
                                    implementation="pallas")
  y, vjp = jax.vjp(f, p, jnp.asarray(x))
  got = vjp(jnp.asarray(ct, y.dtype))
  p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p)
  _, vjp64 = jax.vjp(lambda p, x: naive_jnp(p, x, g, axis, act), p64,
                     jnp.asarray(x, jnp.float64))
  want = vjp64(jnp.asarray(ct, jnp.float64))
  # float32: rounding only; half precision: dx is rounded to x's dtype once.
  # The terms dx cancels are of the size of |dy| * |gamma| * rstd: rounding
  # is relative to them (with G = C every group is one element, rstd is
  # 1/sqrt(eps) and dx is 0 in exact arithmetic).
  rel = {np.float32: 1e-5, jnp.bfloat16: 2.0**-7, np.float16: 2.0**-9}[dtype]
  xg = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(shape[0], -1, g, shape[axis] // g)
  terms = np.abs(ct).max() * np.abs(p["gamma"]).max() / np.sqrt(xg.var(axis=(1, 3)).min() + 1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b)
    tol = rel * np.max(np.abs(b)) + 4 * np.finfo(np.float32).eps * terms
    assert np.max(np.abs(a - b)) <= tol, (name, np.max(np.abs(a - b)), tol)


def test_kernels_are_deterministic(plan):
  # No atomics, no order that changes between runs: the same bits every time.
  x, p = _data((2, 600, 12), -1, np.float32, False, seed=9)
  ct = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)
  f = jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(gnorm.group_norm(p, x, 4, activation="silu",
                                            implementation="pallas") * ct), argnums=(0, 1)))
  first = jax.tree_util.tree_leaves(f(p, x))
  for _ in range(2):
    for a, b in zip(first, jax.tree_util.tree_leaves(f(p, x)), strict=True):
      np.testing.assert_array_equal(a, b)


def test_vmap_jvp_jacfwd_hessian(plan):
  x, p = _data((2, 5, 6), -1, np.float32, False, seed=3)
  fp = lambda p, x: gnorm.group_norm(p, x, 3, activation="silu", implementation="pallas")  # noqa: E731
  fx = lambda p, x: gnorm.group_norm(p, x, 3, activation="silu")  # noqa: E731
  xs = np.stack([x, 2 * x[::-1] + 1])
  np.testing.assert_allclose(jax.vmap(fp, (None, 0))(p, xs), jax.vmap(fx, (None, 0))(p, xs),
                             atol=2e-6)
  t = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
  yp, tp = jax.jvp(lambda x: fp(p, x), (x,), (t,))
  yx, tx = jax.jvp(lambda x: fx(p, x), (x,), (t,))
  np.testing.assert_allclose(yp, yx, atol=2e-6)
  np.testing.assert_allclose(tp, tx, atol=2e-6)
  small = x[:1, :2]
  np.testing.assert_allclose(jax.jacfwd(lambda x: fp(p, x))(small),
                             jax.jacfwd(lambda x: fx(p, x))(small), atol=2e-6)
  loss = lambda f: lambda x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
  np.testing.assert_allclose(jax.hessian(loss(fp))(small), jax.hessian(loss(fx))(small),
                             atol=1e-5)
  per_example = jax.vmap(jax.grad(loss(fp)))(xs)
  np.testing.assert_allclose(per_example, jax.vmap(jax.grad(loss(fx)))(xs), atol=1e-5)


def test_check_grads_to_second_order(x64, plan):
  x, p = _data((2, 4, 6), -1, np.float64, True, seed=5)
  x = x.astype(np.float64) + 2
  p = jax.tree_util.tree_map(lambda a: a.astype(np.float64), p)
  check_grads(lambda p, x: gnorm.group_norm(p, x, 2, activation="gelu", implementation="pallas"),
              (p, x), order=2, modes=("fwd", "rev"))


def test_backward_keeps_only_x_and_statistics():
  x = jnp.asarray(_data((2, 8, 8, 32), -1, np.float32, False)[0], jnp.bfloat16)
  params = {"gamma": jnp.ones(32), "beta": jnp.zeros(32)}
  _, vjp_fn = jax.vjp(lambda p, x: gnorm.group_norm(p, x, 8, activation="silu",
                                                    implementation="pallas"), params, x)
  leaves = jax.tree_util.tree_leaves(vjp_fn)
  big = [a for a in leaves if a.size >= x.size]
  assert len(big) == 1 and big[0].dtype == jnp.bfloat16, [(a.shape, a.dtype) for a in leaves]
  assert all(a.size <= 32 for a in leaves if a.size < x.size)


def test_eps_zero_constant_group(plan):
  x = np.zeros((2, 5, 4), np.float32)
  x[0] = 0.1
  x[1, :, 2:] = np.arange(5, dtype=np.float32)[:, None]
  p = {"gamma": np.full(4, 2.0, np.float32), "beta": np.array([1, 2, 3, 4], np.float32)}
  y = np.asarray(gnorm.group_norm(p, x, 2, 0.0, implementation="pallas"))
  np.testing.assert_array_equal(y[0], np.broadcast_to(p["beta"], (5, 4)))
  np.testing.assert_array_equal(y[1, :, :2], np.broadcast_to(p["beta"][:2], (5, 2)))
  ref = group_norm_ref_full(x, 2, p["gamma"], p["beta"], eps=0.0)
  assert np.abs(y - ref).max() <= 1e-5


def test_auto_is_xla_and_pallas_is_the_kernels():
  # The kernels are chosen when the program is lowered: Triton calls in a
  # module lowered for CUDA, forward and backward, and none for "auto".
  x = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)

  def lowered(impl, platform):
    def f(x):
      return jax.grad(lambda x: gnorm.group_norm(None, x, 2, implementation=impl).sum())(x)
    return jax.jit(f).trace(x).lower(lowering_platforms=(platform,)).as_text()

  triton = "__gpu$xla.gpu.triton"
  assert lowered("auto", "cpu") == lowered("xla", "cpu")
  assert triton not in lowered("auto", "cuda")
  # forward: partial moments, their combine, normalise; backward: sums, combine, dx
  assert lowered("pallas", "cuda").count(triton) == 6


@pytest.mark.parametrize("kwargs,option", [
  (dict(mask=np.ones((2, 4, 1), bool)), "mask"),
  (dict(axis_name="d"), "axis_name='d'"),
])
def test_uncovered_options_are_refused_by_name(kwargs, option):
  x = np.ones((2, 4, 8), np.float32)
  with pytest.raises(ValueError, match=rf"implementation='pallas' does not support {option}"):
    gnorm.group_norm(None, x, 2, implementation="pallas", **kwargs)
  gnorm.group_norm(None, x, 2, implementation="auto", **{k: v for k, v in kwargs.items()
                                                          if k == "mask"})


def test_middle_channel_axis_is_refused_and_bad_names_too():
  x = np.ones((2, 3, 8, 4), np.float32)
  with pytest.raises(ValueError, match=r"does not support channel_axis=2 with spatial axes"):
    gnorm.group_norm(None, x, 2, channel_axis=2, implementation="pallas")
  with pytest.raises(ValueError, match=r"implementation must be one of \['auto', 'xla', "
                                       r"'pallas'\], got 'triton'; input shape \(2, 3, 8, 4\)"):
    gnorm.group_norm(None, x, 2, implementation="triton")


def test_modules_pass_implementation_through():
  x, p = _data((2, 4, 4, 8), -1, np.float32, False, seed=6)
  layer = gnorm.GroupNorm(4, activation="silu", implementation="pallas")
  variables = layer.init(jax.random.key(0), x)
  want = gnorm.group_norm(variables["params"], x, 4, activation="silu")
  np.testing.assert_allclose(layer.apply(variables, x), want, atol=2e-6)
  nnx_layer = gnorm.nnx.GroupNorm(4, 8, activation="silu", implementation="pallas")
  np.testing.assert_allclose(nnx_layer(x), want, atol=2e-6)
  with pytest.raises(ValueError, match="implementation must be one of"):
    gnorm.nnx.GroupNorm(4, 8, implementation="cuda")
