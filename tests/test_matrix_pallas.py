"""The test matrix (``tests/matrix.py``) on ``"pallas"``: the GPU kernels,
run in Pallas's interpreter on the CPU (chosen when the program is lowered).

``TestPallas`` forces the forward's plan of partial moments then a
normalising pass (the plan of a large group or of few (sample, group)
pairs); ``test_matrix_pallas_one_pass.py`` runs the other plan, a group per
program held in one block (``ONE_PASS`` here says what it leaves out). The
backward's kernels do not depend on the plan. Their lowering for CUDA
(Triton) is checked in ``test_matrix_pallas_cuda.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm
from gnorm._src.backends import pallas
from gnorm._src.backends import pallas_triton
from tests import matrix_cases as cases
from tests.matrix import Matrix


def _group_exceeds_a_block(case):
  n, c = case.shape[0], case.channels
  s = math.prod(case.shape) // (n * c)
  last = math.prod(case.shape[case.axis + 1:]) == 1
  return pallas_triton.group_tiling(n, s, c, case.n_groups, channels_last=last) is None


UNSUPPORTED = {
    "mask": "the kernels take no mask: it is refused by name (test_uncovered_options_...)",
    "middle": "the kernels take channels last or right after the batch; a channel axis with "
              "spatial axes on both sides is refused (test_middle_channel_axis_is_refused_...)",
}
# Each case is a new program for the interpreter, about 0.5 s (a derivative
# 2 s): what runs here is chosen for the kernels, whose risks are tiles,
# tails, dtypes and the combine of partial moments.
TWO_KERNELS = {
    **UNSUPPORTED,
    "int": "promoted to float32 before any implementation: a float32 case",
    "param_form": "validation normalises the parameters' forms before any implementation",
    ("test_values", "x64"): "float64 kernels run in the derivative checks",
    ("test_values", lambda c: c.dtype in ("bfloat16", "float16") and c.loc != 300
     and c not in cases.KERNEL_CASES): "half precision: KERNEL_CASES hold bfloat16 and "
                                       "float16, the float16 near 300 case the overflow",
    ("test_values", lambda c: c.shape in [(2, 64, 64, 32), (1, 32, 48, 48), (2, 1031, 16)]):
        "sized for the GPU plan's partials; the kernels' tails are KERNEL_CASES'",
    ("test_values", lambda c: (c.shape, c.n_groups) in [((3, 7, 16), 4), ((2, 5, 6, 8), 1),
                                                        ((2, 5, 6, 8), 8)]):
        "KERNEL_CASES hold channels-last rank 3 and G = 1; 4x12 and 3x10 G = C",
    ("test_values", lambda c: len(c.shape) == 5):
        "the kernels see a rank-3 view of x: rank 5 is a rank-3 case to them",
    "test_equals_flax": "the op's definition; G = 1 and G = C run in test_values",
    "test_jit": "jit and eager reach the kernels alike: both are the primitives' lowering",
    "test_vmap_with_batched_parameters": "per-sample (N, C) parameters reach the kernels "
                                         "in test_vjp_in_the_input_dtype",
    "test_property": "each drawn shape is a new interpreter program; the tables' tails and "
                     "layouts stand for it",
    cases.keep_only("test_vmap", "2x5x6-G3-silu-vmap2"):
        "one batch folded into the kernels' samples (the XLA files run the others)",
    cases.keep_only("test_vmap_of_grad_folds_the_batch", "2x5x6-G3-silu-vmap2"):
        "a folded batch with an activation (the XLA files run the others)",
    cases.keep_only("test_derivatives_match_plain_autodiff", "1x2x6-G3-float64-silu"):
        "forward mode, jacobians and hessians once (about 3 s); the backward kernels' "
        "layouts, dtypes and options by test_vjp_in_the_input_dtype",
    cases.keep_only("test_check_grads_to_second_order",
                    "2x4x6-G2-float64-loc2-gelu-affine=sample"):
        "numerical second order once; the exact derivative check holds the others",
}
# The forward's plan changes the forward kernels only: the checks through them.
ONE_PASS = {
    **TWO_KERNELS,
    _group_exceeds_a_block: "a group larger than a block takes the two-kernel plan",
    "test_backward_keeps_only_x_and_statistics":
        "the forward's plan changes no transformation rule: TestPallas runs it",
    ("test_values", lambda c: c.affine in ("gamma", "beta", "none") and c.loc != 100):
        "absent parameters are constants outside the kernels: TestPallas runs them",
    cases.keep_only("test_vjp_in_the_input_dtype", "2x7x12-G3", "2x12x5x3-c1-G4-silu",
                    "2x3x200-G8-affine=sample", "2x5x5x6-G1-gelu",
                    "2x9x9x40-G8-bfloat16-silu-affine=sample"):
        "tails, G = 1, per-sample parameters and bfloat16",
    cases.keep_only("test_derivatives_match_plain_autodiff", "1x2x6-G3-float64-silu"):
        "forward mode through the one-pass kernel once",
    cases.keep_only("test_vmap", "2x5x6-G3-silu-vmap2"): "a batch folded into one-pass programs",
    cases.keep_only("test_vmap_of_grad_folds_the_batch", "2x5x6-G3-silu-vmap2"):
        "a batch folded into one-pass programs",
}


@pytest.fixture(scope="class")
def fresh_caches():
  # Executables compiled op by op (check_grads, eager calls) are cached by
  # primitive and shapes, not by plan: none may cross from one plan's class
  # to the other's, or to the tests of the default plan below.
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.mark.usefixtures("fresh_caches")
class TestPallas(Matrix):
  IMPLEMENTATION = "pallas"
  LEAVE_OUT = TWO_KERNELS
  AGREE_WITH = "xla"  # KERNEL_CASES: values within 2e-6, gradients 1e-5 of XLA's
  CHECK_GRADS_JIT = False

  @pytest.fixture(autouse=True)
  def plan(self, monkeypatch):
    monkeypatch.setattr(pallas_triton, "ONE_PASS_MAX_ELEMENTS", 0)

  def test_kernels_are_deterministic(self):
    # No atomics, no order that changes between runs: the same bits every time.
    case = cases.Case((2, 600, 12), 4, activation="silu", seed=9)
    x, (p, _, _) = cases.x_of(case), cases.params_of(case)
    ct = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)
    f = self.jit(jax.value_and_grad(
        lambda p, x: jnp.sum(gnorm.group_norm(p, x, 4, activation="silu") * ct), argnums=(0, 1)))
    first = jax.tree_util.tree_leaves(f(p, x))
    for _ in range(2):
      for a, b in zip(first, jax.tree_util.tree_leaves(f(p, x)), strict=True):
        np.testing.assert_array_equal(a, b)


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
  x = np.random.default_rng(6).normal(size=(2, 4, 4, 8)).astype(np.float32)
  layer = gnorm.GroupNorm(4, activation="silu", implementation="pallas")
  variables = layer.init(jax.random.key(0), x)
  want = gnorm.group_norm(variables["params"], x, 4, activation="silu")
  np.testing.assert_allclose(layer.apply(variables, x), want, atol=2e-6)
  nnx_layer = gnorm.nnx.GroupNorm(4, 8, activation="silu", implementation="pallas")
  np.testing.assert_allclose(nnx_layer(x), want, atol=2e-6)
  with pytest.raises(ValueError, match="implementation must be one of"):
    gnorm.nnx.GroupNorm(4, 8, implementation="cuda")
