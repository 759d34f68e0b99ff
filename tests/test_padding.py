"""Garbage in the padding reaches nothing; zero-variance groups give no NaN.

Masked-out positions output 0 and pass no gradient; the counted positions'
outputs and gradients, and gamma's and beta's gradients, are those of the
same input with zeros in the padding, whatever the padding holds (NaN, Inf,
huge values). With ``eps=0`` a group of zero variance normalises to 0, so
its output is ``act(beta)``, with finite gradients.

The ``axis_name`` case (shards with unequal counts) is in
``multidevice_checks.py``: it needs several devices.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm
from tests.reference import group_norm_ref_full

N, L, C = 3, 7, 8
LENGTHS = np.array([7, 3, 1])


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(N, L, C)) * 2 + 3).astype(np.float32)
  ct = rng.normal(size=(N, L, C)).astype(np.float32)
  gamma = (rng.normal(size=(N, C)) + 1).astype(np.float32)
  beta = rng.normal(size=(N, C)).astype(np.float32)
  return x, ct, gamma, beta


def _mask(kind):
  rows = np.arange(L)[None, :, None] < LENGTHS[:, None, None]  # (N, L, 1)
  if kind == "rows":
    return rows
  # Varies along the channels too: sample 0 also drops channels 2 and 5.
  full = np.broadcast_to(rows, (N, L, C)).copy()
  full[0, 1:, [2, 5]] = False
  return full


def _fill(x, mask, value):
  return np.where(np.broadcast_to(mask, x.shape), x, np.float32(value))


OPTIONS = [
  dict(zip(("group_size", "activation", "per_sample", "mask"), combo, strict=True))
  for combo in itertools.product((None, 2), (None, "silu"), (False, True), ("rows", "full"))
]


def _ids(o):
  return "-".join(f"{k}={v}" for k, v in o.items())


def _norm(opts, mask):
  def f(params, x):
    kw = {"group_size": 2} if opts["group_size"] else {"n_groups": 2}
    return gnorm.group_norm(params, x, mask=mask, activation=opts["activation"], **kw)

  return f


def _params(opts, gamma, beta):
  if opts["per_sample"]:
    return {"gamma": gamma, "beta": beta}
  return {"gamma": gamma[0], "beta": beta[0]}


def _loss(f, mask, ct):
  # A loss that ignores the padded outputs, as a padded-sequence model's does.
  return lambda p, x: jnp.sum(jnp.where(mask, f(p, x), 0.0) * ct)


def _assert_same_grads(got, want, counted):
  (gp, gx), (wp, wx) = got, want
  for k in wp:
    assert np.all(np.isfinite(gp[k])), k
    np.testing.assert_allclose(gp[k], wp[k], rtol=1e-6, atol=1e-6, err_msg=k)
  assert np.all(np.isfinite(np.asarray(gx)[counted]))
  np.testing.assert_allclose(np.asarray(gx)[counted], np.asarray(wx)[counted], rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 3e38])
@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
def test_garbage_in_padding_reaches_no_output_and_no_gradient(opts, garbage):
  x, ct, gamma, beta = _data()
  mask = _mask(opts["mask"])
  counted = np.broadcast_to(mask, x.shape)
  f, p = _norm(opts, mask), _params(opts, gamma, beta)
  clean, dirty = _fill(x, mask, 0.0), _fill(x, mask, garbage)

  y_dirty = np.asarray(jax.jit(f)(p, dirty))
  np.testing.assert_array_equal(y_dirty, np.asarray(jax.jit(f)(p, clean)))
  np.testing.assert_array_equal(y_dirty[~counted], 0.0)  # padded outputs are 0
  groups = C // 2 if opts["group_size"] else 2
  ref = group_norm_ref_full(clean, groups, p["gamma"], p["beta"], mask=mask,
                            activation=opts["activation"])
  assert np.abs(y_dirty - ref).max() <= 1e-5

  grad = jax.jit(jax.grad(_loss(f, mask, ct), argnums=(0, 1)))
  got, want = grad(p, dirty), grad(p, clean)
  _assert_same_grads(got, want, counted)
  # Nothing flows back into the padding either.
  np.testing.assert_array_equal(np.asarray(got[1])[~counted], 0.0)


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=_ids)
def test_garbage_in_padding_under_vmap_of_grad(opts):
  # Per-example gradients: vmap over a leading axis of independent batches.
  x, ct, gamma, beta = _data(1)
  mask = _mask(opts["mask"])
  f, p = _norm(opts, mask), _params(opts, gamma, beta)
  xs = np.stack([_fill(x, mask, np.nan), _fill(x[::-1], mask, np.inf)])
  clean = np.stack([_fill(x, mask, 0.0), _fill(x[::-1], mask, 0.0)])
  grad = jax.jit(jax.vmap(jax.grad(_loss(f, mask, ct), argnums=(0, 1)), in_axes=(None, 0)))
  got, want = grad(p, xs), grad(p, clean)
  counted = np.broadcast_to(mask, xs.shape)
  _assert_same_grads(got, want, counted)


def test_garbage_in_padding_second_order():
  # A gradient penalty (grad of a grad norm) stays finite too.
  x, ct, gamma, beta = _data(2)
  mask = _mask("rows")
  f = _norm(dict(group_size=None, activation="silu"), mask)
  p = {"gamma": gamma[0], "beta": beta[0]}

  def penalty(p, x):
    gx = jax.grad(_loss(f, mask, ct), argnums=1)(p, x)
    return jnp.sum(jnp.where(mask, gx, 0.0) ** 2)

  got = jax.jit(jax.grad(penalty))(p, _fill(x, mask, np.nan))
  want = jax.jit(jax.grad(penalty))(p, _fill(x, mask, 0.0))
  for k in want:
    assert np.all(np.isfinite(got[k])), k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_padded_outputs_are_zero_with_the_modules():
  x, _, _, _ = _data(3)
  mask = _mask("rows")
  dirty = _fill(x, mask, np.nan)
  layer = gnorm.GroupNorm(2, activation="silu")
  variables = layer.init(jax.random.key(0), dirty, mask=mask)
  y = np.asarray(layer.apply(variables, dirty, mask=mask))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[~np.broadcast_to(mask, x.shape)], 0.0)
  nnx_layer = gnorm.nnx.GroupNorm(2, C, activation="silu", rngs=None)
  np.testing.assert_array_equal(np.asarray(nnx_layer(dirty, mask=mask)), y)


# --- eps = 0 ---------------------------------------------------------------------


def _zero_variance_cases():
  const = np.zeros((2, 5, 4), np.float32)
  const[0] = 0.1  # not exactly representable: sums of it round
  const[1] = -7.0
  mixed = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
  mixed[1, :, 2:] = 123.456  # one constant group next to an ordinary one
  return [
    ("constant 0.1 and -7", const, 2, -1),
    ("one constant group", mixed, 2, -1),
    ("single-element groups", np.random.default_rng(1).normal(size=(3, 1, 6)), 6, -1),
    ("G = C on rank 2", np.random.default_rng(2).normal(size=(4, 6)), 6, -1),
    ("constant NCHW", np.full((2, 4, 3, 3), 2.5), 2, 1),
  ]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16], ids=str)
@pytest.mark.parametrize("case", _zero_variance_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_eps_zero_zero_variance_group_outputs_act_beta(case, dtype, activation):
  _, x, g, axis = case
  x = np.asarray(x).astype(dtype)
  c = x.shape[axis]
  beta = np.linspace(-1, 1, c).astype(np.float32)
  params = {"gamma": np.full(c, 1.5, np.float32), "beta": beta}

  def f(p, x):
    return gnorm.group_norm(p, x, g, eps=0.0, channel_axis=axis, activation=activation)

  y = np.asarray(jax.jit(f)(params, x), np.float64)
  assert np.all(np.isfinite(y))
  ref = group_norm_ref_full(np.asarray(x, np.float64), g, params["gamma"], beta, eps=0.0,
                            channel_axis=axis, activation=activation)
  assert np.all(np.isfinite(ref))
  tol = 1e-5 if dtype == np.float32 else 2.0 ** -7 * (1 + np.abs(ref).max())
  assert np.abs(y - ref).max() <= tol
  # Every zero-variance group outputs act(beta) exactly, in x's dtype.
  xg = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(x.shape[0], -1, g, c // g)
  flat = xg.reshape(x.shape[0], -1, g, c // g)
  const = np.all(flat == flat[:, :1, :, :1], axis=(1, 3))  # (N, G)
  assert const.any()
  act = (lambda t: t / (1 + np.exp(-t))) if activation else (lambda t: t)
  want = np.asarray(act(beta.astype(np.float64)).astype(dtype), np.float64)
  yl = np.moveaxis(y, axis, -1).reshape(flat.shape)
  # Without an activation exactly; with silu to one rounding of x's dtype.
  rtol = 0.0 if activation is None else float(jnp.finfo(dtype).eps)
  for n, gi in zip(*np.nonzero(const), strict=True):
    sl = slice(gi * (c // g), (gi + 1) * (c // g))
    np.testing.assert_allclose(yl[n, :, gi, :], np.broadcast_to(want[sl], yl[n, :, gi].shape),
                               rtol=rtol, atol=0)

  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x).astype(jnp.float32))),
                           argnums=(0, 1)))(params, x)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))


def test_eps_zero_with_a_mask_and_an_empty_group():
  x = np.random.default_rng(5).normal(size=(2, 6, 4)).astype(np.float32)
  mask = np.ones((2, 6, 4), bool)
  mask[0, 1:, :2] = False
  mask[0, 0, 1] = False  # sample 0, group 0: a single counted element, [0, 0, 0]
  mask[1, :, 2:] = False  # sample 1, group 1: nothing counted
  x = _fill(x, mask, np.nan)
  params = {"gamma": np.ones(4, np.float32), "beta": np.full(4, 0.5, np.float32)}
  f = jax.jit(lambda p, x: gnorm.group_norm(p, x, 2, eps=0.0, mask=mask))
  y = np.asarray(f(params, x))
  assert np.all(np.isfinite(y))
  assert y[0, 0, 0] == 0.5  # the single counted element: x - mean = 0, output beta
  np.testing.assert_array_equal(y[~mask], 0.0)
  g = jax.grad(lambda p, x: jnp.sum(jnp.where(mask, f(p, x), 0) ** 2), argnums=(0, 1))(params, x)
  assert np.all(np.isfinite(np.asarray(g[1])[mask]))
  assert all(np.all(np.isfinite(v)) for v in g[0].values())
