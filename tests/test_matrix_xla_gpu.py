"""The test matrix (``tests/matrix.py``) on ``"xla_gpu"``: the GPU's plan
(``backends/xla_gpu.py``, ``xla_gpu_vjp.py``), which CUDA and ROCm lower,
forced on the CPU so that it meets the same reference and bounds.

Beside it, what is the GPU plan's own: that forcing really reaches the
lowered program, and its error bound with pivots far from the mean.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import gnorm
from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src.backends import xla_gpu
from tests import matrix_cases as cases
from tests.matrix import Matrix
from tests.matrix import Property


class TestXlaGpu(Matrix):
  IMPLEMENTATION = "xla_gpu"
  # Spatial sizes up to 24: axes the plan splits into several partials.
  PROPERTY = Property(30, st.sampled_from([1, 2, 4]), st.sampled_from([1, 3, 5, 16, 24]))
  # CI time, as in test_matrix_xla.py: numerical second order costs about
  # 2.5 s a case, the exact derivative check 1.5 s.
  LEAVE_OUT = {
      cases.keep_only("test_check_grads_to_second_order", "2x4x3x2-c1-G2-float64-loc1-silu",
                      "2x5x6x4-c2-G3-float64-loc1-gelu-affine=sample"):
          "numerical second order with an activation, channels first and in the middle",
      cases.keep_only("test_derivatives_match_plain_autodiff", "2x3x8-G4-float64-loc-2",
                      "2x4x3x2-c1-G2-float64-loc-2-silu", "3x8-G2-float64-loc-2-affine=sample",
                      "2x5x6x4-c2-G3-float64-loc-2-gelu-affine=sample"):
          "every layout, with and without an activation and per-sample parameters",
      ("test_vmap_of_grad_folds_the_batch", "2x5x6-G3-silu-vmap2"):
          "the Pallas kernels' case: the sixteen here cover its options",
      "test_equals_flax": "the op's definition, checked on test_matrix_xla.py; G = 1 and G = C "
                          "run in test_values",
      cases.keep_only("test_vjp_in_the_input_dtype", "2x6x6x16-G4-loc100-sd3",
                      "2x32x32x32-G8-loc100-sd3", "2x9x9x40-G8-bfloat16-silu-affine=sample",
                      "2x8x4x4-c1-G2-float16"):
          "large means, bfloat16 and float16; the other cases are the Pallas kernels' tails",
  }


def _gpu(fn):
  return TestXlaGpu().jit(fn)


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


def test_pivots_far_from_the_mean_keep_the_bound():
  # Each partial is shifted by its first element; make every first element
  # a 30-sigma outlier (the worst case Samuelson's inequality allows a
  # partial of 32 is about 5.6 sigma; this is far beyond it) on offset data.
  case = cases.Case((2, 64, 64, 32), 8, loc=100.0, seed=3)
  x = cases.x_of(case)
  _, gamma, beta = cases.params_of(case)
  r = xla_gpu.chunks(maths.view(case.shape, 3)).r
  x.reshape(2, -1, 32)[:, ::r, :] = 130.0
  y = _gpu(lambda x: gnorm.group_norm({"gamma": gamma, "beta": beta}, x, 8))(x)
  xg = cases.group_view(x, case)
  spread = np.min(np.abs(xg).max(axis=(1, 3)) / xg.std(axis=(1, 3)))
  err = np.abs(np.asarray(y, np.float64) - cases.reference(case, x, gamma, beta)).max()
  assert err <= 1e-5 * max(1.0, float(spread) / 4)
