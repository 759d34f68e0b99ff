"""The checks of the test matrix, written once and run by every implementation.

``Matrix`` holds one check per test method, each run on its table of
``tests/matrix_cases.py``. An implementation's file subclasses it as
``Test<Name>``, names its entry of ``dispatch.IMPLEMENTATIONS`` and leaves out,
at collection and with its reason, what it cannot run (``LEAVE_OUT``); its own
checks sit beside the subclass. Every check traces its program anew inside
``dispatch.forced`` (``jax.jit`` caches a trace per function object), so
``implementation="auto"`` runs that entry on any platform, the CPU included.

Values are held to the float64 NumPy reference of ``tests/reference.py`` with
docs/accuracy.md's bounds; derivatives to plain autodiff of
``reference.naive_jnp`` in float64 (the ``x64`` fixture).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax import lax
from jax.test_util import check_grads

import gnorm
from gnorm._src import dispatch
from tests import matrix_cases as cases
from tests.reference import naive_jnp

F32_EPS = float(np.finfo(np.float32).eps)
# One rounding of a half-precision output, relative.
OUTPUT_ROUNDING = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


class Property(NamedTuple):
  """The property test's draws: examples, group counts, spatial sizes, and
  whether the channel axis may have spatial axes on both sides."""

  examples: int
  groups: st.SearchStrategy
  spatial: st.SearchStrategy
  middle: bool = True


def _norm(case, params, x, mask=None):
  return gnorm.group_norm(params, x, case.n_groups, case.eps, channel_axis=case.channel_axis,
                          mask=mask, activation=case.activation)


def _naive(case, params, x):
  return naive_jnp(params, x, case.n_groups, case.channel_axis, case.activation, case.eps)


def _leaves_close(got, want, rtol, atol):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _assert_within(y, ref, case):
  err = np.abs(np.asarray(y, np.float64) - ref)
  tol = case.bound + OUTPUT_ROUNDING.get(case.dtype, 0.0) * np.abs(ref)
  assert np.all(err <= tol), f"max error {err.max():.3g}, over the bound by {(err - tol).max():.3g}"


def _spread_bound(case, x):
  """docs/accuracy.md's float32 bound scaled to each group's spread,
  1e-5 * max(1, max|x| * rstd / 4), as an x-shaped array."""
  xg = cases.group_view(x, case)
  rstd = 1 / np.sqrt(xg.var(axis=(1, 3)) + case.eps)
  tol = 1e-5 * np.maximum(1.0, np.abs(xg).max(axis=(1, 3)) * rstd / 4)  # (N, G)
  tol = np.broadcast_to(tol[:, None, :, None], xg.shape).reshape(*xg.shape[:2], -1)
  xl = np.moveaxis(np.asarray(x), case.axis, -1)
  return np.moveaxis(tol.reshape(xl.shape), -1, case.axis)


@st.composite
def _drawn(draw, prop: Property):
  rank = draw(st.integers(2, 5))
  n_groups = draw(prop.groups)
  shape = [draw(st.integers(1, 3)), *[draw(prop.spatial) for _ in range(rank - 2)]]
  axes = st.integers(1, rank - 1) if prop.middle else st.sampled_from(sorted({1, rank - 1}))
  axis = draw(axes)
  shape.insert(axis, n_groups * draw(st.integers(1, 4)))
  return cases.Case(tuple(shape), n_groups, axis, loc=draw(st.floats(-1e3, 1e3)),
                    scale=draw(st.floats(1e-2, 1e2)), seed=draw(st.integers(0, 2**31 - 1)))


_PROGRAMS: dict = {}


class Matrix:
  """The op's checks; a subclass names ``IMPLEMENTATION`` and what it leaves out."""

  IMPLEMENTATION = ""
  # {check name | tag | (check name, tag) | predicate of a case: reason}
  LEAVE_OUT: dict = {}
  PROPERTY = Property(40, st.integers(1, 4), st.integers(1, 5))
  # check_grads through one jitted program (XLA compiles each of its
  # derivatives whole: a quarter faster than op by op) or op by op (each
  # primitive compiled once and reused: the Pallas interpreter's way).
  CHECK_GRADS_JIT = True
  AGREE_WITH = ""  # an implementation to agree with, closer than the reference (``agrees``)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    checks = {name for name in dir(Matrix) if name.startswith("test_")}
    cases.check_leave_out(cls.LEAVE_OUT, checks)
    for key in cls.LEAVE_OUT:
      if key in checks:  # the whole check: not collected
        setattr(cls, key, None)

  def pytest_generate_tests(self, metafunc):
    if "case" not in metafunc.fixturenames:
      return
    name = metafunc.function.__name__
    chosen = cases.select(name, self.LEAVE_OUT)
    # An empty parametrization would collect a skip: leave the check out instead.
    assert chosen, f"{type(self).__name__} leaves every case of {name} out"
    metafunc.parametrize("case", list(chosen.values()), ids=list(chosen))

  def traced(self, fn):
    """``fn``, tracing ``group_norm`` with this implementation."""
    name = self.IMPLEMENTATION

    @functools.wraps(fn)
    def call(*args, **kwargs):
      with dispatch.forced(name):
        return fn(*args, **kwargs)

    return call

  def jit(self, fn, **kwargs):
    return jax.jit(self.traced(fn), **kwargs)

  def agrees(self, fn, args, got, rtol, atol):
    """``got``, dtypes too, within rtol/atol of ``fn(*args)`` by ``AGREE_WITH`` (if any)."""
    if self.AGREE_WITH:
      with dispatch.forced(self.AGREE_WITH):
        want = jax.jit(fn)(*args)
      assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
      _leaves_close(got, want, rtol, atol)

  def shared(self, check, case, fn):
    """``self.jit(fn)``, one per class, check and program: cases that differ
    only in their data (``Case.program``) share one compile. ``fn`` may read
    only the case's program fields."""
    key = (type(self), check, case.program)
    if key not in _PROGRAMS:
      _PROGRAMS[key] = self.jit(fn)
    return _PROGRAMS[key]

  # --- values -----------------------------------------------------------------

  def test_values(self, case, request):
    if "x64" in case.tags:
      request.getfixturevalue("x64")
    x, mask = cases.x_of(case), cases.mask_of(case)
    params, gamma, beta = cases.params_of(case)
    fed = x if mask is None else np.where(np.broadcast_to(mask, x.shape), x, np.nan)  # garbage
    if case.affine in ("mixed", "scalar"):  # a list and Python floats, as given
      y = self.jit(lambda x, m: _norm(case, params, x, m))(fed.astype(x.dtype), mask)
    else:
      f = self.shared("values", case, lambda p, x, m: _norm(case, p, x, m))
      y = f(params, fed.astype(x.dtype), mask)
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    assert y.shape == x.shape and y.dtype == (x.dtype if floating else jnp.float32)
    _assert_within(y, cases.reference(case, x, gamma, beta, mask), case)
    if case in cases.KERNEL_CASES:  # within 2e-6 (and two output roundings) of AGREE_WITH's
      self.agrees(lambda p, x: _norm(case, p, x), (params, x), y,
                  2 * OUTPUT_ROUNDING.get(case.dtype, 0.0), 2e-6)

  def test_constant_groups(self, case):
    # A zero-variance group outputs beta exactly, a group with nothing counted
    # 0, and the gradients stay finite.
    x, mask = cases.x_of(case), cases.mask_of(case)
    params, gamma, beta = cases.params_of(case)
    ct = np.random.default_rng(0).normal(size=x.shape).astype(x.dtype)

    def loss(p, x, m, ct):
      y = _norm(case, p, x, m)
      return jnp.sum(jnp.sin(y) * ct), y

    f = self.shared("constant", case, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), grads = f(params, x, mask, ct)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    y = np.asarray(y, np.float64)
    assert np.all(np.isfinite(y))
    err = np.abs(y - cases.reference(case, x, gamma, beta, mask))
    where = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= case.bound, f"max error {err.max():.3g} at {where}"
    counted = cases.group_view(np.broadcast_to(True if mask is None else mask, x.shape), case)
    xg, yg = cases.group_view(x, case), cases.group_view(y, case)
    bg = (np.zeros(case.channels) if beta is None else beta).reshape(case.n_groups, -1)
    exact = 0
    for n, g in np.ndindex(*xg.shape[::2]):
      ok = counted[n, :, g] > 0
      if not ok.any():
        np.testing.assert_array_equal(yg[n, :, g], 0.0)
      elif np.all(xg[n, :, g][ok] == xg[n, :, g][ok][0]):
        np.testing.assert_array_equal(yg[n, :, g][ok], np.broadcast_to(bg[g], ok.shape)[ok],
                                      err_msg=f"constant group (sample {n}, group {g})")
        exact += 1
    assert exact, "the case has no constant group"

  def test_nan_and_inf_stay_in_their_group(self, case):
    x = cases.x_of(case)
    y = cases.group_view(self.jit(lambda x: _norm(case, None, x))(x), case)
    bad = ~np.all(np.isfinite(cases.group_view(x, case)), axis=(1, 3))  # (N, G)
    assert bad.any() and np.all(np.isnan(y.transpose(0, 2, 1, 3)[bad]))
    assert np.all(np.isfinite(y.transpose(0, 2, 1, 3)[~bad]))

  def test_equals_flax(self, case):
    x = cases.x_of(case)
    params, gamma, beta = cases.params_of(case)
    plain = dict(use_fast_variance=False, epsilon=1e-5)
    if case.n_groups == 1:
      layer, variables = nn.LayerNorm(reduction_axes=tuple(range(1, x.ndim)), use_scale=False,
                                      use_bias=False, **plain), {}
    elif case.n_groups == case.channels:
      layer, variables = nn.InstanceNorm(use_scale=False, use_bias=False, **plain), {}
    else:
      layer = nn.GroupNorm(num_groups=case.n_groups, **plain)
      variables = {"params": {"scale": params["gamma"], "bias": params["beta"]}}
    y = self.jit(lambda p, x: _norm(case, p, x))(params, x)
    np.testing.assert_allclose(y, layer.apply(variables, x), atol=2e-6)

  def test_property(self):
    prop = self.PROPERTY

    @settings(max_examples=prop.examples, deadline=None)
    @given(_drawn(prop))
    def check(case):
      x = cases.x_of(case)
      params, gamma, beta = cases.params_of(case)
      y = np.asarray(self.jit(lambda x: _norm(case, params, x))(x), np.float64)
      err = np.abs(y - cases.reference(case, x, gamma, beta))
      assert np.all(err <= _spread_bound(case, x)), np.max(err - _spread_bound(case, x))

    check()

  # --- transformations --------------------------------------------------------

  def test_jit(self, case):
    traces = []

    def f(p, x):
      traces.append(1)  # runs only while tracing
      return _norm(case, p, x)

    x, (params, gamma, beta) = cases.x_of(case), cases.params_of(case)
    jf = self.jit(f)
    np.testing.assert_allclose(jf(params, x), self.traced(_norm)(case, params, x), atol=1e-6)
    jf(jax.tree_util.tree_map(lambda a: 2 * a, params), cases.x_of(case, seed_offset=1))
    assert len(traces) == 1
    static = self.jit(gnorm.group_norm, static_argnames=("n_groups", "eps", "channel_axis"))
    y = static(params, x, n_groups=case.n_groups, channel_axis=case.channel_axis)
    _assert_within(y, cases.reference(case, x, gamma, beta), case)

  def test_vmap(self, case):
    x, (params, gamma, beta) = cases.x_of(case), cases.params_of(case)
    batched_params = case.affine == "batched"

    def both(p, x):
      f = functools.partial(_norm, case)
      looped = (lax.map(lambda a: f(*a), (p, x)) if batched_params
                else lax.map(lambda x: f(p, x), x))
      return jax.vmap(f, (0 if batched_params else None, 0))(p, x), looped

    batched, looped = self.jit(both)(params, x)
    np.testing.assert_allclose(batched, looped, atol=1e-6)
    self.agrees(lambda p, x: both(p, x)[0], (params, x), batched, 0.0, 2e-6)
    for i in range(case.batch):
      g, b = (gamma[i], beta[i]) if batched_params else (gamma, beta)
      _assert_within(batched[i], cases.reference(case, x[i], g, b), case)

  def test_vmap_of_grad_folds_the_batch(self, case):
    # vmap over inputs and cotangents (per-example gradients), the case the
    # primitives fold into their sample axis, against a loop (lax.map).
    xs, mask, (params, _, _) = cases.x_of(case), cases.mask_of(case), cases.params_of(case)
    cts = np.random.default_rng(case.seed).normal(size=xs.shape).astype(np.float32)

    def grads(x, ct):
      return jax.grad(lambda p, x: jnp.sum(_norm(case, p, x, mask) * ct), argnums=(0, 1))(params, x)

    batched, looped = self.jit(lambda xs, cts: (
        jax.vmap(grads)(xs, cts), lax.map(lambda a: grads(*a), (xs, cts))))(xs, cts)
    _leaves_close(batched, looped, rtol=2e-5, atol=2e-5)
    self.agrees(jax.vmap(grads), (xs, cts), batched, 0.0, 1e-5)

  def test_vmap_with_batched_parameters(self, case):
    # Parameters batched with x (flax's nn.vmap over params), and tangents of
    # parameters batched while the parameters are not.
    x, (params, _, _) = cases.x_of(case), cases.params_of(case)
    gs, bs = params["gamma"], params["beta"]
    g0, b0 = gs[0], bs[0]
    tg = np.random.default_rng(case.seed).normal(size=gs.shape).astype(np.float32)

    def f(g, b, x):
      return jnp.sum(jnp.sin(_norm(case, {"gamma": g, "beta": b}, x)))

    df = jax.grad(f, argnums=(0, 1, 2))

    def jvp_at(x, t):
      return jax.jvp(lambda g: f(g, b0, x), (g0,), (t,))[1]

    def every(gs, bs, x, tg):
      return (jax.vmap(df)(gs, bs, x), lax.map(lambda a: df(*a), (gs, bs, x)),
              jax.grad(lambda g, b, x: jnp.sum(jax.vmap(f)(g, b, x)), argnums=(0, 1))(gs, bs, x),
              jax.vmap(jvp_at)(x, tg), lax.map(lambda a: jvp_at(*a), (x, tg)))

    batched, looped, grad_of_vmap, jvps, jvps_looped = self.jit(every)(gs, bs, x, tg)
    _leaves_close(batched, looped, rtol=2e-5, atol=2e-5)
    _leaves_close(grad_of_vmap, batched[:2], rtol=2e-5, atol=2e-5)
    _leaves_close(jvps, jvps_looped, rtol=2e-5, atol=2e-5)

  def test_jacobians_batch_tangents_or_cotangents_only(self, case, x64):
    # jacfwd batches only the tangents, jacrev only the cotangents: the
    # primitives then vmap their linear maps.
    x, (params, _, _) = cases.x_of(case), cases.params_of(case)
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)

    jacobians = lambda f: lambda x: (jax.jacfwd(f)(x), jax.jacrev(f)(x))  # noqa: E731
    ours = self.jit(jacobians(lambda x: _norm(case, params, x)))(x)
    want = jax.jit(jacobians(lambda x: _naive(case, p64, x)))(x.astype(np.float64))
    _leaves_close(ours, want, rtol=1e-5, atol=1e-6)
    self.agrees(jacobians(lambda x: _norm(case, params, x)), (x,), ours, 0.0, 2e-6)

  # --- derivatives --------------------------------------------------------------

  def test_derivatives_match_plain_autodiff(self, case, x64):
    x, (params, _, _) = cases.x_of(case), cases.params_of(case)
    rng = np.random.default_rng(case.seed)
    ct, tx = rng.normal(size=x.shape), rng.normal(size=x.shape)
    tp = jax.tree_util.tree_map(np.ones_like, params)

    def derivatives(gn):
      f = lambda p, x: jnp.sum(jnp.tanh(gn(p, x)) * ct)  # noqa: E731
      return (jax.grad(f, argnums=(0, 1))(params, x), jax.jacfwd(f, argnums=1)(params, x),
              jax.hessian(f, argnums=1)(params, x), jax.hessian(f, argnums=0)(params, x),
              jax.jacrev(jax.grad(f), argnums=1)(params, x),
              jax.jvp(gn, (params, x), (tp, tx))[1])

    ours = self.jit(lambda: derivatives(functools.partial(_norm, case)))()
    want = jax.jit(lambda: derivatives(functools.partial(_naive, case)))()
    _leaves_close(ours, want, rtol=1e-9, atol=1e-9)

  def test_check_grads_to_second_order(self, case, x64):
    x, (params, _, _) = cases.x_of(case), cases.params_of(case)
    run = self.jit if self.CHECK_GRADS_JIT else self.traced
    check_grads(run(lambda p, x: _norm(case, p, x)), (params, x), order=2, modes=("fwd", "rev"))

  def test_vjp_in_the_input_dtype(self, case, x64):
    # float32: rounding only; half precision: dx is rounded to x's dtype once.
    # The terms dx cancels are of the size of |dy| * |gamma| * rstd: rounding
    # is relative to them (with G = C every group is one element, rstd is
    # 1/sqrt(eps) and dx is 0 in exact arithmetic).
    x, (params, gamma, _) = cases.x_of(case), cases.params_of(case)
    ct = np.asarray(jnp.asarray(np.random.default_rng(case.seed + 8).normal(size=x.shape),
                                x.dtype))

    vjp = lambda gn: lambda p, x, ct: jax.vjp(gn, p, x)[1](ct)  # noqa: E731
    got = self.jit(vjp(functools.partial(_norm, case)))(params, x, ct)
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    want = jax.jit(vjp(functools.partial(_naive, case)))(p64, *(np.asarray(a, np.float64)
                                                                for a in (x, ct)))
    rel = {"float32": 1e-5, "bfloat16": 2.0**-7, "float16": 2.0**-9}[case.dtype]
    var = cases.group_view(x, case).var(axis=(1, 3)).min()
    terms = np.abs(np.asarray(ct, np.float64)).max() * np.abs(gamma).max() / np.sqrt(var + case.eps)
    assert got[1].dtype == x.dtype
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(got[0]))
    if case in cases.KERNEL_CASES and case.n_groups < case.channels:  # G = C: rounding only
      tol = 1e-5 if case.dtype == "float32" else 2e-2  # of AGREE_WITH's (half precision: 2e-2)
      self.agrees(vjp(functools.partial(_norm, case)), (params, x, ct), got, tol, tol)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
      a, b = np.asarray(a, np.float64), np.asarray(b)
      tol = rel * np.max(np.abs(b)) + 4 * F32_EPS * terms
      assert np.max(np.abs(a - b)) <= tol, (np.max(np.abs(a - b)), tol)

  def test_backward_keeps_only_x_and_statistics(self, case):
    # What reverse mode keeps: x itself, in its dtype, and (N, G) statistics
    # (besides gamma): nothing float32 of x's size.
    x = jax.ShapeDtypeStruct(case.shape, cases.np_dtype(case.dtype))
    params = {"gamma": jnp.ones(case.channels), "beta": jnp.zeros(case.channels)}

    def residuals(p, x):
      return jax.tree_util.tree_leaves(jax.vjp(functools.partial(_norm, case), p, x)[1])

    kept = jax.make_jaxpr(self.traced(residuals))(params, x).out_avals
    big = [(a.shape, a.dtype) for a in kept if a.size >= x.size]
    assert big == [(x.shape, x.dtype)], kept
    n_g = case.shape[0] * case.n_groups
    assert all(a.size <= n_g or a.size == case.channels for a in kept if a.size < x.size), kept
