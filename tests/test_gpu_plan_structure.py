"""The GPU plan's structure, pinned on the StableHLO lowered for CUDA from the CPU.

What made gnorm slow on a GPU (docs/performance.md) was the shape of the program,
not its maths: statistics reduced straight to per-channel ``(N, C)`` sums (a
reduction with too few outputs to fill the GPU, into which XLA then refuses
to fuse ``x - mean`` and writes it out in float32 instead), and full-size
intermediates shared between passes. The lowered module shows the plan that
prevents both, so these tests pin it, per pass over ``x``:

* every reduction of an ``x``-sized operand sums at most ``R_MAX`` elements
  per output (the first, parallel stage), never straight to ``(N, C)`` or
  ``(N, G)``;
* nothing of ``x``'s size crosses an optimization barrier except ``x`` and
  the cotangent themselves, in their own dtype: a barrier makes XLA
  materialise its operands, so a float32 ``x - mean`` there would be written;
* the number of those reductions: one per pass over ``x`` (the forward
  reads it once for its statistics without a mask, twice with one; the
  backward once more).

What XLA:GPU then compiles from these modules (kernels, bytes) is measured by
``benchmarks/xla_gpu_plan.py`` where a CUDA build of jaxlib is installed.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import gnorm
from gnorm._src.backends import xla_gpu

S = jax.ShapeDtypeStruct
SHAPE, C, G = (2, 64, 64, 320), 320, 32  # an SD-UNet GroupNorm
SIZE = math.prod(SHAPE)
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "i1": jnp.bool_}


def _tensor(t):
  """``tensor<2x3xf32>`` -> ``((2, 3), dtype)``."""
  *dims, dt = t.split("x")
  return tuple(int(d) for d in dims), _DTYPES[dt]


def _types(text):
  return [_tensor(t) for t in re.findall(r"tensor<([0-9x]*[a-z]+[0-9]+)>", text)]


def _reductions(module):
  """``(operands, reduced dims, results)`` of every ``stablehlo.reduce``."""
  found = []
  for m in re.finditer(r"stablehlo\.reduce\(.*? across dimensions = \[([0-9, ]*)\] "
                       r": \((.*?)\) -> (.*)", module):
    dims = [int(d) for d in m.group(1).split(",")]
    ins = _types(m.group(2))
    found.append((ins[: len(ins) // 2], dims, _types(m.group(3))))
  return found


def _barriers(module):
  """The operand types of each ``stablehlo.optimization_barrier``."""
  return [_types(m.group(1))
          for m in re.finditer(r"stablehlo\.optimization_barrier .* : (.*)", module)]


def _lower(f, *args):
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _params():
  return {"gamma": S((C,), jnp.float32), "beta": S((C,), jnp.float32)}


def _forward(dtype, mask=False, **kw):
  x = S(SHAPE, dtype)
  if mask:
    m = S((SHAPE[0], SHAPE[1], SHAPE[2], 1), jnp.bool_)
    return _lower(lambda p, x, m: gnorm.group_norm(p, x, G, mask=m, **kw), _params(), x, m)
  return _lower(lambda p, x: gnorm.group_norm(p, x, G, **kw), _params(), x)


def _forward_backward(dtype, **kw):
  def f(p, x, ct):
    y, vjp = jax.vjp(lambda p, x: gnorm.group_norm(p, x, G, **kw), p, x)
    return y, vjp(ct)

  return _lower(f, _params(), S(SHAPE, dtype), S(SHAPE, dtype))


def _full_size_reductions(module):
  full = []
  for ins, dims, outs in _reductions(module):
    shapes = {shape for shape, _ in ins}
    if any(math.prod(s) == SIZE for s in shapes):
      (shape,) = shapes
      full.append((math.prod(shape[d] for d in dims), [s for s, _ in outs]))
  return full


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask", [False, True])
def test_forward_reduces_x_in_small_partials_only(dtype, mask):
  module = _forward(dtype, mask)
  full = _full_size_reductions(module)
  assert len(full) == (2 if mask else 1), full
  for extent, outs in full:
    assert extent <= xla_gpu.R_MAX
    assert all(math.prod(o) == SIZE // extent for o in outs)
    assert all(o not in ((SHAPE[0], C), (SHAPE[0], G)) for o in outs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_nothing_full_size_crosses_a_barrier(dtype, activation):
  for module in (_forward(dtype, activation=activation),
                 _forward_backward(dtype, activation=activation)):
    barriers = _barriers(module)
    assert barriers, "no barrier found: the plan's stages, or this test's parser, changed"
    for operands in barriers:
      big = [(shape, dt) for shape, dt in operands if math.prod(shape) >= SIZE // xla_gpu.R_MIN]
      # at most x and the cotangent, as they are
      assert len(big) <= 2 and all(math.prod(s) == SIZE and dt == dtype for s, dt in big), big


@pytest.mark.parametrize("activation", [None, "silu"])
def test_backward_reads_x_once_for_its_sums(activation):
  # forward statistics + the backward's first stage: two x-sized reductions
  # in a training step's forward+backward program, both in small partials.
  full = _full_size_reductions(_forward_backward(jnp.bfloat16, activation=activation))
  assert len(full) == 2 and all(extent <= xla_gpu.R_MAX for extent, _ in full), full


def test_the_cpu_program_has_no_gpu_plan():
  # The CPU keeps maths.py's plan: per-channel reductions of x, no variadic
  # reduce, whatever the GPU does.
  x = S(SHAPE, jnp.bfloat16)
  module = jax.jit(lambda p, x: gnorm.group_norm(p, x, G)).trace(_params(), x).lower(
      lowering_platforms=("cpu",)).as_text()
  assert all(len(ins) == 1 for ins, _, _ in _reductions(module))
  assert {tuple(outs[0]) for _, outs in _full_size_reductions(module)} == {(SHAPE[0], C)}
