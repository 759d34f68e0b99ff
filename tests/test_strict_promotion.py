"""Strict dtype promotion: every program of the test matrix, traced and
lowered inside ``jax.numpy_dtype_promotion("strict")``, for every
implementation on the platform that lowers it.

Strict mode only refuses (a mixed-dtype operation that is not an explicit
cast raises at trace time); it never changes a value, so tracing and
lowering every program is the whole check, and the matrix's own files
check the values. Lowering is inside the context too: gnorm's primitives
trace the maths when they are lowered. The programs: the output, and for
floating x the gradient in the parameters and x, a forward-mode JVP, and a
Hessian-vector product (forward over reverse); a case with a vmapped axis
is traced under ``vmap``. Beside the matrix's cases (parameters in x's
dtype, or float32 for integer and half-precision x), parameters in other
dtypes than x's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm
from gnorm._src import dispatch
from gnorm._src import maths
from tests import matrix_cases as cases

# Each implementation on the platform whose program it is; the kernels'
# bodies are traced when the kernels are bound, on any platform.
LOWERINGS = [("xla", "cpu"), ("xla_gpu", "cuda"), ("pallas", "cuda")]
KERNELS_REFUSE = {"mask", "middle"}  # validation refuses them for "pallas" by name

# One case per program (cases that differ only in their data trace alike).
PROGRAMS = {c.program: c for table in cases.TABLES.values() for c in table}
MIXED = [
    cases.Case((2, 4, 4, 8), 2, dtype="bfloat16"),
    cases.Case((2, 4, 4, 8), 2, dtype="float16", affine="sample"),
    cases.Case((2, 4, 4, 8), 2, dtype="float64"),
    cases.Case((2, 4, 4, 8), 2, dtype="float32", activation="silu"),
    cases.Case((2, 5, 8), 2, dtype="int32"),
]
PARAM_DTYPES = {"bfloat16": "float32", "float16": "bfloat16", "float64": "float32",
                "float32": "bfloat16", "int32": "bfloat16"}


def _floating(case):
  return jnp.issubdtype(cases.np_dtype(case.dtype), jnp.floating)


def _programs(case, params, mask):
  """``fn(params, x, t)``: the output and, for floating x, its derivatives."""
  def f(p, x):
    return gnorm.group_norm(p, x, case.n_groups, case.eps, channel_axis=case.channel_axis,
                            mask=mask, activation=case.activation)

  as_given = case.affine in ("mixed", "scalar")  # lists and Python floats: closed over

  def per_input(p, x, t):
    if as_given:
      p = params
    y = f(p, x)
    if not _floating(case):
      return y

    def loss(p, x):
      y = f(p, x)
      return jnp.sum(y * y)

    grads = jax.grad(loss, argnums=1 if as_given else (0, 1))(p, x)
    tangent = jax.jvp(lambda x: f(p, x), (x,), (t,))[1]
    hvp = jax.jvp(jax.grad(lambda x: loss(p, x)), (x,), (t,))[1]
    return y, grads, tangent, hvp

  if not case.batch:
    return per_input
  return jax.vmap(per_input, (0 if case.affine == "batched" else None, 0, 0))


def _lower(case, params, implementation, platform):
  x = cases.x_of(case)
  mask = cases.mask_of(case)
  t = x.astype(np.float32).astype(x.dtype) if _floating(case) else x
  fn = _programs(case, params, mask)
  held = None if case.affine in ("mixed", "scalar") else params
  with jax.numpy_dtype_promotion("strict"), dispatch.forced(implementation):
    jax.jit(fn).trace(held, x, t).lower(lowering_platforms=(platform,))


def _applies(case, implementation):
  return implementation != "pallas" or not (case.tags & KERNELS_REFUSE)


def _params(case, dtype):
  params, _, _ = cases.params_of(case)
  return jax.tree_util.tree_map(lambda a: np.asarray(jnp.asarray(a, dtype)), params)


# Masks and a middle channel axis are refused by name for "pallas"
# (test_matrix_pallas.py checks the message): those pairs are not collected.
EVERY_PROGRAM = [pytest.param(case, impl, platform, id=f"{case.id}-{impl}")
                 for case in PROGRAMS.values() for impl, platform in LOWERINGS
                 if _applies(case, impl)]


@pytest.mark.parametrize("case,implementation,platform", EVERY_PROGRAM)
def test_every_matrix_program_lowers_under_strict_promotion(case, implementation, platform,
                                                            request):
  if "x64" in case.tags:
    request.getfixturevalue("x64")
  _lower(case, cases.params_of(case)[0], implementation, platform)


@pytest.mark.parametrize("implementation,platform", LOWERINGS, ids=[i for i, _ in LOWERINGS])
@pytest.mark.parametrize("case", MIXED, ids=[c.id for c in MIXED])
def test_parameters_in_another_dtype_lower_under_strict_promotion(case, implementation, platform,
                                                                  x64):
  _lower(case, _params(case, PARAM_DTYPES[case.dtype]), implementation, platform)


def test_strict_promotion_reaches_the_lowered_maths(monkeypatch):
  # The checks above would pass vacuously if the context did not reach the
  # maths, which gnorm's primitives trace only when they are lowered: a
  # mixed-dtype operation planted in the maths passes tracing and is refused
  # by the same harness's lowering.
  rsqrt_or_zero = maths.rsqrt_or_zero
  monkeypatch.setattr(maths, "rsqrt_or_zero",
                      lambda v, *a: rsqrt_or_zero(v, *a) + jnp.zeros((), jnp.bfloat16))
  case = cases.Case((2, 4, 8), 2, eps=0.0)  # eps=0: rstd goes through rsqrt_or_zero
  x = cases.x_of(case)
  with jax.numpy_dtype_promotion("strict"):
    traced = jax.jit(lambda x: gnorm.group_norm(None, x, 2, 0.0)).trace(x)
    with pytest.raises(jax.dtypes.TypePromotionError, match="strict"):
      traced.lower(lowering_platforms=("cpu",))
  with pytest.raises(jax.dtypes.TypePromotionError, match="strict"):
    _lower(case, None, "xla", "cpu")


# --- the modules and the drop-ins ---------------------------------------------

X_DTYPES = ["float32", "bfloat16", "float16", "float64"]


def _linen(module):
  def run(x):
    variables = module.init(jax.random.key(0), x)
    grads = jax.grad(lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) ** 2),
                     argnums=(0, 1))(variables, x)
    return module.apply(variables, x), grads
  return run


def _nnx(make):
  from flax import nnx

  def run(x):
    model = make(nnx.Rngs(0))
    graph, state = nnx.split(model)

    def loss(state, x):
      return jnp.sum(nnx.merge(graph, state)(x).astype(jnp.float32) ** 2)

    return nnx.merge(graph, state)(x), jax.grad(loss, argnums=(0, 1))(state, x)
  return run


def _equinox(x):
  from gnorm.compat import equinox as gn_eqx
  model = gn_eqx.GroupNorm(2, 8)
  per_example = jax.vmap(lambda m, x: m(jnp.moveaxis(x, -1, 0)), (None, 0))
  grads = jax.grad(lambda m, x: jnp.sum(per_example(m, x).astype(jnp.float32) ** 2),
                   argnums=(0, 1))(model, x)
  return per_example(model, x), grads


def _haiku(x):
  import haiku as hk
  from gnorm.compat import haiku as gn_hk
  f = hk.without_apply_rng(hk.transform(lambda x: gn_hk.GroupNorm(2)(x)))
  params = f.init(jax.random.key(0), x)
  grads = jax.grad(lambda p, x: jnp.sum(f.apply(p, x).astype(jnp.float32) ** 2),
                   argnums=(0, 1))(params, x)
  return f.apply(params, x), grads


def _layers():
  import gnorm.nnx
  from gnorm.compat import linen as gn_linen
  from gnorm.compat import nnx as gn_nnx
  return {
      "gnorm.GroupNorm": _linen(gnorm.GroupNorm(2, activation="silu")),
      "gnorm.GroupNorm-param_dtype=bfloat16": _linen(gnorm.GroupNorm(2, param_dtype=jnp.bfloat16)),
      "gnorm.nnx.GroupNorm": _nnx(lambda rngs: gnorm.nnx.GroupNorm(2, 8, rngs=rngs)),
      "compat.linen": _linen(gn_linen.GroupNorm(num_groups=2)),
      "compat.linen-dtype=float32": _linen(gn_linen.GroupNorm(num_groups=2, dtype=jnp.float32)),
      "compat.linen-param_dtype=bfloat16": _linen(gn_linen.GroupNorm(num_groups=2,
                                                                     param_dtype=jnp.bfloat16)),
      "compat.nnx": _nnx(lambda rngs: gn_nnx.GroupNorm(8, num_groups=2, rngs=rngs)),
      "compat.nnx-dtype=bfloat16": _nnx(lambda rngs: gn_nnx.GroupNorm(
          8, num_groups=2, dtype=jnp.bfloat16, rngs=rngs)),
      "compat.equinox": _equinox,
      "compat.haiku": _haiku,
  }


LAYERS = list(_layers())


@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("layer", LAYERS)
def test_modules_and_drop_ins_run_under_strict_promotion(layer, dtype, x64):
  # Built, initialised, applied and differentiated under strict promotion;
  # outputs in the dtype standard promotion gives (strict mode only refuses).
  x = np.asarray(jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 8)), dtype))
  run = _layers()[layer]
  standard = jax.jit(run)(x)
  with jax.numpy_dtype_promotion("strict"):
    strict = jax.jit(_layers()[layer])(x)
  for a, b in zip(jax.tree_util.tree_leaves(strict), jax.tree_util.tree_leaves(standard),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
