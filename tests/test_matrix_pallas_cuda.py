"""The test matrix's cases, ``implementation="pallas"`` lowered for CUDA on the CPU.

Lowering a jitted function for ``cuda`` from this CPU-only machine runs
Pallas's Triton lowering of every kernel, which fails loudly on anything
Triton cannot compile (a block whose size is not a power of two, an operation
it has no rule for). Every argument is a ``jax.ShapeDtypeStruct``: nothing
runs, so a case's data does not matter and each program is lowered once.
Triton calls carry no export-compatibility promise, so most checks use
``jit(f).trace(...).lower(lowering_platforms=...)``; one goes through
``jax.export`` with that check disabled.

Beside the matrix: every dtype, layout and activation, the forward alone and
in a training step, with its kernel count, both forward plans, and which
platforms get Triton.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export

import gnorm
from gnorm._src.backends import pallas
from gnorm._src.backends import pallas_triton
from tests import matrix_cases as cases
from tests.test_matrix_pallas import UNSUPPORTED

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


def _kernels(shape, axis, groups, backward=False):
  """How many Triton kernels the forward of ``shape`` launches (and the
  backward's three, with ``backward``)."""
  n, c = shape[0], shape[axis]
  s = math.prod(shape) // (n * c)
  last = math.prod(shape[axis % len(shape) + 1:]) == 1
  one = pallas_triton.group_tiling(n, s, c, groups, channels_last=last)
  one = one is not None and n * groups >= pallas.ONE_PASS_MIN_PROGRAMS
  return (1 if one else 3) + (3 if backward else 0)


def _lower(f, *args, platform="cuda"):
  return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _count(text):
  return text.count(f"@{TRITON}(")


def _abstract(case):
  """``(params, x)`` of ``case`` as ``ShapeDtypeStruct``s."""
  params, _, _ = cases.params_of(case)
  params = jax.tree_util.tree_map(lambda a: S(a.shape, a.dtype), params)
  return params, S(case.full_shape, cases.np_dtype(case.dtype))


def _another_program(check):
  seen = {}

  def left_out(case):
    return seen.setdefault(case.program, case) is not case

  return (check, left_out)


LEAVE_OUT = {
    **UNSUPPORTED,
    "x64": "Triton's float64 is not a GPU training dtype; the interpreter runs the kernels "
           "in float64 for the derivative checks (test_matrix_pallas.py)",
    "param_form": "validation normalises the parameters' forms before any implementation",
    "int": "promoted to float32 before any implementation: a float32 case's program",
    _another_program("test_values"): "the same program as another case's: only data differ",
    ("test_values", lambda c: c.dtype == "float16" and c not in cases.KERNEL_CASES):
        "float16 lowers in every layout of test_forward_and_training_step_lower",
}


@cases.parametrize("test_values", LEAVE_OUT)
def test_values_cases_lower(case):
  # A gradient's program: the forward's kernels and the backward's three.
  params, x = _abstract(case)

  def f(p, x):
    return gnorm.group_norm(p, x, case.n_groups, case.eps, channel_axis=case.channel_axis,
                            activation=case.activation, implementation="pallas")

  out = jax.eval_shape(f, params, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  loss = lambda p, x: jnp.sum(f(p, x).astype(jnp.float32))  # noqa: E731
  grad = _lower(jax.grad(loss, argnums=1 if params is None else (0, 1)), params, x)
  assert _count(grad) == _kernels(case.shape, case.axis, case.n_groups, backward=True)


def _folded(case):
  return (case.batch * case.shape[0],) + case.shape[1:]


@cases.parametrize("test_vmap", LEAVE_OUT)
def test_vmap_cases_lower(case):
  # vmap folds its axis into the samples: the kernels of the folded batch.
  params, x = _abstract(case)
  in_axes = (0 if case.affine == "batched" else None, 0)
  f = jax.vmap(lambda p, x: gnorm.group_norm(p, x, case.n_groups, channel_axis=case.channel_axis,
                                             activation=case.activation,
                                             implementation="pallas"), in_axes)
  assert _count(_lower(f, params, x)) == _kernels(_folded(case), case.axis, case.n_groups)


@cases.parametrize("test_vmap_of_grad_folds_the_batch", LEAVE_OUT)
def test_per_example_gradient_cases_lower(case):
  params, x = _abstract(case)

  def grads(p, x):
    return jax.grad(lambda p, x: jnp.sum(gnorm.group_norm(
        p, x, case.n_groups, activation=case.activation, implementation="pallas")),
        argnums=(0, 1))(p, x)

  want = _kernels(_folded(case), case.axis, case.n_groups, backward=True)
  assert _count(_lower(jax.vmap(grads, (None, 0)), params, x)) == want


# "one_pass": 64 samples x 8 groups = ONE_PASS_MIN_PROGRAMS (sample, group)
# pairs, each fitting a block: the forward's one-kernel plan.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LAYOUTS = {"nhwc": ((2, 16, 16, 320), -1), "nchw": ((2, 320, 16, 16), 1),
           "odd": ((3, 7, 5, 24), -1), "one_pass": ((64, 7, 5, 24), -1)}
ACTIVATIONS = (None, "relu", "silu", "gelu", "gelu_tanh")


def _params(c, per_sample=None):
  shape = (c,) if per_sample is None else (per_sample, c)
  return {"gamma": S(shape, jnp.float32), "beta": S(shape, jnp.float32)}


def test_the_layouts_lower_both_forward_plans():
  assert sorted(_kernels(shape, axis, 8) for shape, axis in LAYOUTS.values()) == [1, 3, 3, 3]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype,layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_forward_and_training_step_lower(dtype, layout, activation):
  # gamma and beta trained by optax through the forward's kernels (one where
  # a (sample, group) fits in a block and there are enough of them, else
  # three: partial moments, their combine, normalise) and the backward's three.
  shape, axis = LAYOUTS[layout]
  x, opt = S(shape, DTYPES[dtype]), optax.sgd(0.1)
  params = _params(shape[axis])
  state = jax.eval_shape(opt.init, params)

  def f(p, x):
    return gnorm.group_norm(p, x, 8, channel_axis=axis, activation=activation,
                            implementation="pallas")

  out = jax.eval_shape(f, params, x)
  assert out.shape == shape and out.dtype == x.dtype
  assert _count(_lower(f, params, x)) == _kernels(shape, axis, 8)  # the forward on its own

  def step(params, state, x):
    loss = lambda p: jnp.mean(f(p, x).astype(jnp.float32) ** 2)  # noqa: E731
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  assert _count(_lower(step, params, state, x)) == _kernels(shape, axis, 8, backward=True)
  new_params, _ = jax.eval_shape(step, params, state, x)
  assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), new_params) == (
      jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params))


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_with_a_linen_module_lowers(dtype):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(32, (3, 3))(x)
      return gnorm.GroupNorm(8, activation="silu", implementation="pallas")(x)

  model, opt = Block(), optax.adam(1e-3)
  x = S((2, 16, 16, 8), DTYPES[dtype])
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  state = jax.eval_shape(opt.init, params)

  def step(params, state, x):
    loss = lambda p: jnp.mean(model.apply({"params": p}, x).astype(jnp.float32) ** 2)  # noqa: E731
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  # The forward's and the backward's kernels (conv output 2x16x16x32, G=8).
  assert _count(_lower(step, params, state, x)) == _kernels((2, 16, 16, 32), -1, 8, backward=True)
  new_params, _ = jax.eval_shape(step, params, state, x)
  assert jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params)


def test_per_sample_affine_grad_and_vmap_lower():
  x = S((4, 8, 8, 64), jnp.bfloat16)

  def f(p, x):
    return gnorm.group_norm(p, x, 32, activation="silu", implementation="pallas")

  loss = lambda p, x: jnp.sum(f(p, x).astype(jnp.float32))  # noqa: E731
  want = _kernels(x.shape, -1, 32, backward=True)
  assert _count(_lower(jax.grad(loss, argnums=(0, 1)), _params(64, 4), x)) == want
  xs = S((3, 4, 8, 8, 64), jnp.bfloat16)
  want = _kernels(xs.shape[1:], -1, 32)
  assert _count(_lower(jax.vmap(f, (None, 0)), _params(64), xs)) == want


def test_jax_export_with_the_triton_check_disabled():
  x = S((2, 16, 16, 320), jnp.bfloat16)
  f = jax.jit(lambda p, x: gnorm.group_norm(p, x, 32, activation="silu",
                                            implementation="pallas"))
  exp = export.export(
      f, platforms=("cuda",),
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(_params(320), x)
  assert exp.platforms == ("cuda",)
  assert exp.out_avals[0].shape == x.shape and exp.out_avals[0].dtype == x.dtype


def test_cpu_and_tpu_get_the_interpreter_not_triton():
  x = S((2, 8, 8, 16), jnp.float32)
  f = lambda p, x: gnorm.group_norm(p, x, 4, implementation="pallas")  # noqa: E731
  for platform in ("cpu", "tpu"):
    assert TRITON not in _lower(f, _params(16), x, platform=platform), platform


def test_auto_is_xla_and_pallas_is_the_kernels():
  # The kernels are chosen when the program is lowered: Triton calls in a
  # module lowered for CUDA, forward and backward, and none for "auto".
  x = S((2, 4, 8), jnp.float32)

  def lowered(impl, platform):
    def f(x):
      return jax.grad(lambda x: gnorm.group_norm(None, x, 2, implementation=impl).sum())(x)
    return _lower(f, x, platform=platform)

  assert lowered("auto", "cpu") == lowered("xla", "cpu")
  assert TRITON not in lowered("auto", "cuda")
  # forward: partial moments, their combine, normalise; backward: sums, combine, dx
  assert _count(lowered("pallas", "cuda")) == 6
