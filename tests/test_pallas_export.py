"""``implementation="pallas"`` lowers for CUDA: Triton's lowering rules, run on a CPU.

Lowering a jitted function for ``cuda`` from this CPU-only machine runs
Pallas's Triton lowering of both kernels, which fails loudly on anything
Triton cannot compile (a block whose size is not a power of two, an
operation it has no rule for). Triton calls carry no export-compatibility
promise, so most checks use ``jit(f).trace(...).lower(lowering_platforms=...)``;
one goes through ``jax.export`` with that check disabled. Every argument is a
``jax.ShapeDtypeStruct``: nothing runs.
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

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "one_pass": 64 samples x 8 groups = ONE_PASS_MIN_PROGRAMS (sample, group)
# pairs, each fitting a block: the forward's one-kernel plan.
LAYOUTS = {"nhwc": ((2, 16, 16, 320), -1), "nchw": ((2, 320, 16, 16), 1),
           "odd": ((3, 7, 5, 24), -1), "one_pass": ((64, 7, 5, 24), -1)}
ACTIVATIONS = (None, "relu", "silu", "gelu", "gelu_tanh")


def _kernels(shape, axis, groups, backward=False):
  """How many Triton kernels the forward of ``shape`` launches (and the
  backward's three, with ``backward``)."""
  from gnorm._src.backends import pallas
  from gnorm._src.backends import pallas_triton

  c = shape[axis]
  s = math.prod(shape) // (shape[0] * c)
  one = pallas_triton.group_tiling(shape[0], s, c, groups, channels_last=axis == -1)
  one = one is not None and shape[0] * groups >= pallas.ONE_PASS_MIN_PROGRAMS
  return (1 if one else 3) + (3 if backward else 0)


def test_the_layouts_lower_both_forward_plans():
  assert sorted(_kernels(shape, axis, 8) for shape, axis in LAYOUTS.values()) == [1, 3, 3, 3]


def _lower(f, *args, platform="cuda"):
  return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _params(c, per_sample=None):
  shape = (c,) if per_sample is None else (per_sample, c)
  return {"gamma": S(shape, jnp.float32), "beta": S(shape, jnp.float32)}


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype,layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_forward_lowers_to_its_triton_kernels(dtype, layout, activation):
  shape, axis = LAYOUTS[layout]
  x = S(shape, DTYPES[dtype])

  def f(p, x):
    return gnorm.group_norm(p, x, 8, channel_axis=axis, activation=activation,
                            implementation="pallas")

  text = _lower(f, _params(shape[axis]), x)
  # One kernel where a (sample, group) fits in a block and there are enough of
  # them, else three (partial moments, their combine, normalise).
  assert text.count(f"@{TRITON}(") == _kernels(shape, axis, 8), text.count(TRITON)
  out = jax.eval_shape(f, _params(shape[axis]), x)
  assert out.shape == shape and out.dtype == x.dtype


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype,layout", list(itertools.product(DTYPES, LAYOUTS)))
def test_training_step_lowers(dtype, layout, activation):
  # gamma and beta trained by optax through the Pallas forward and backward.
  shape, axis = LAYOUTS[layout]
  x, opt = S(shape, DTYPES[dtype]), optax.sgd(0.1)
  params = _params(shape[axis])
  state = jax.eval_shape(opt.init, params)

  def step(params, state, x):
    def loss(p):
      y = gnorm.group_norm(p, x, 8, channel_axis=axis, activation=activation,
                           implementation="pallas")
      return jnp.mean(y.astype(jnp.float32) ** 2)

    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  text = _lower(step, params, state, x)
  assert text.count(f"@{TRITON}(") == _kernels(shape, axis, 8, backward=True)
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
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  text = _lower(step, params, state, x)
  # The forward's and the backward's kernels (conv output 2x16x16x32, G=8).
  assert text.count(f"@{TRITON}(") == _kernels((2, 16, 16, 32), -1, 8, backward=True)
  new_params, _ = jax.eval_shape(step, params, state, x)
  assert jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params)


def test_per_sample_affine_grad_and_vmap_lower():
  x = S((4, 8, 8, 64), jnp.bfloat16)

  def f(p, x):
    return gnorm.group_norm(p, x, 32, activation="silu", implementation="pallas")

  loss = lambda p, x: jnp.sum(f(p, x).astype(jnp.float32))  # noqa: E731
  want = _kernels(x.shape, -1, 32, backward=True)
  assert _lower(jax.grad(loss, argnums=(0, 1)), _params(64, 4), x).count(f"@{TRITON}(") == want
  xs = S((3, 4, 8, 8, 64), jnp.bfloat16)
  want = _kernels(xs.shape[1:], -1, 32)
  assert _lower(jax.vmap(f, (None, 0)), _params(64), xs).count(f"@{TRITON}(") == want


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
