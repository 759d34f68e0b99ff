"""The test matrix (``tests/matrix.py``) on ``"xla"``: maths.py's plan, which
the CPU and the TPU lower (on CUDA and ROCm ``"xla"`` is the GPU's plan). It
covers every case but some of the slowest checks' (``LEAVE_OUT``).

Beside it, a check of the matrix's own data: its tiny-spread case (docs/accuracy.md's
third row) really tells an exact variance from the one-pass ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import numpy as np

from tests import matrix_cases as cases
from tests.matrix import Matrix


class TestXla(Matrix):
  IMPLEMENTATION = "xla"
  # CI time: a second-order check_grads costs about 2.5 s a case and a
  # per-example gradient 0.5 s; the exact derivative check
  # (test_derivatives_match_plain_autodiff) holds the others' second
  # derivatives here, and test_matrix_xla_gpu.py runs every folding case.
  LEAVE_OUT = {
      cases.keep_only("test_check_grads_to_second_order", "2x3x8-G4-float64-loc1",
                      "2x4x3x2-c1-G2-float64-loc1", "3x8-G2-float64-loc1"):
          "numerical second order for three layouts; the others' derivatives are exact-checked",
      cases.keep_only("test_derivatives_match_plain_autodiff", "2x3x8-G4-float64-loc-2",
                      "2x4x3x2-c1-G2-float64-loc-2"):
          "channels last and first; activations and per-sample parameters to first order "
          "by test_vjp_in_the_input_dtype and the folding cases",
      cases.keep_only("test_vmap_of_grad_folds_the_batch",
                      "3x6x6x16-G4-silu-mask=rows4-affine=sample-vmap4", "3x6x6x16-G4-vmap4",
                      "1x6x6x16-G4-silu-mask=rows4-vmap4", "1x6x6x16-G4-affine=sample-vmap4"):
          "four of the sixteen, each option on and off twice (the GPU plan's file runs all)",
      cases.keep_only("test_vjp_in_the_input_dtype", "2x6x6x16-G4-loc100-sd3",
                      "2x32x32x32-G8-loc100-sd3", "2x9x9x40-G8-bfloat16-silu-affine=sample",
                      "2x8x4x4-c1-G2-float16"):
          "large means, bfloat16 and float16; the other cases are the Pallas kernels' tails",
  }


def _one_pass_float32(x, n_groups, eps):
  """What a one-pass E[x^2] - E[x]^2 implementation computes in float32."""
  n, c = x.shape[0], x.shape[-1]
  xg = x.astype(np.float32).reshape(n, -1, n_groups, c // n_groups)
  mean = xg.mean(axis=(1, 3), keepdims=True, dtype=np.float32)
  meansq = (xg * xg).mean(axis=(1, 3), keepdims=True, dtype=np.float32)
  var = np.maximum(meansq - mean * mean, 0)
  return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_the_tiny_spread_case_defeats_a_one_pass_variance():
  (case,) = [c for c in cases.VALUES if c.loc == 100 and c.scale == 0.01]
  x = cases.x_of(case)
  err = np.abs(_one_pass_float32(x, case.n_groups, case.eps) - cases.reference(case, x, None, None))
  assert err.max() > 100 * case.bound  # far off, where the matrix allows 2e-3
