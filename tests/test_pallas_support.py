"""``backends/pallas_support.py``: what ``implementation="pallas"`` needs from JAX.

Availability of the Triton backend (this JAX has it; a JAX without it is
simulated by hiding the module), the filter that keeps the backend's
deprecation warning from users (and nothing else), including when the
warning is raised while a program is lowered, and the index-range check
(shapes only: nothing is allocated).
"""

from __future__ import annotations

import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

from gnorm._src.backends import pallas_support as ps

# The warning as JAX 0.11.2's Triton lowering rule words it.
TRITON_WARNING = (
    "The Pallas Triton backend is deprecated and will be removed in a future JAX version. "
    "To keep using Pallas on GPU, please migrate to the Mosaic GPU backend. To keep using "
    "Triton, switch to the official Triton bindings and jax_triton.")


@pytest.fixture
def fresh_probe():
  """The availability probe re-run for this test, and forgotten after it."""
  ps.why_unavailable.cache_clear()
  yield
  ps.why_unavailable.cache_clear()


def test_this_jax_has_the_triton_backend(fresh_probe):
  # jax 0.10.2 (CI) and 0.11.2 (the GPU machine) both ship it, CPU-only builds too.
  assert ps.why_unavailable() is None
  assert ps.why_unavailable() is None


def test_the_probe_runs_once(fresh_probe, monkeypatch):
  assert ps.why_unavailable() is None
  # Hidden after the first call: the cached answer stands.
  monkeypatch.setitem(sys.modules, ps.TRITON_MODULE, None)
  assert ps.why_unavailable() is None


def test_a_jax_without_the_backend(fresh_probe, monkeypatch):
  # None in sys.modules makes the import fail, as for a JAX that dropped the module.
  monkeypatch.setitem(sys.modules, ps.TRITON_MODULE, None)
  assert ps.why_unavailable() is not None
  why = ps.why_unavailable()
  assert why is not None and why.startswith(f"{ps.TRITON_MODULE} cannot be imported")
  message = ps.unavailable_message(why)
  assert why in message and jax.__version__ in message
  assert "implementation='xla'" in message and "'auto'" in message


def test_a_backend_without_what_the_kernels_use(fresh_probe, monkeypatch):
  stub = types.ModuleType(ps.TRITON_MODULE)
  stub.CompilerParams = object
  monkeypatch.setitem(sys.modules, ps.TRITON_MODULE, stub)
  assert ps.why_unavailable() is not None
  assert ps.why_unavailable() == f"{ps.TRITON_MODULE} has no load, store"


def test_a_deprecation_on_import_does_not_reach_the_user(fresh_probe, monkeypatch):
  # Should a JAX warn when the module is imported, the probe's import is quiet.
  import importlib

  real = importlib.import_module

  def import_module(name, *args):
    _warn(TRITON_WARNING)
    return real(name, *args)

  monkeypatch.setattr(ps.importlib, "import_module", import_module)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ps.why_unavailable() is None


def _warn(message, category=DeprecationWarning):
  # One code location for every warning, so that a registry entry left by an
  # ignored warning would show as a later warning going missing.
  warnings.warn(message, category, stacklevel=2)


def test_the_triton_warning_is_swallowed_and_nothing_leaks():
  before = list(warnings.filters)
  with warnings.catch_warnings(record=True) as seen:
    # "default": once per code location, which consults the registry that an
    # ignored warning could otherwise leave behind.
    warnings.simplefilter("default")
    with ps.quiet_deprecations():
      _warn(TRITON_WARNING)
      assert not seen
    _warn(TRITON_WARNING)  # the same warning, same place, after the context
  assert [(w.category, str(w.message)) for w in seen] == [(DeprecationWarning, TRITON_WARNING)]
  assert warnings.filters == before
  # As this suite runs (filterwarnings = ["error"]): swallowed inside, raised after.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with ps.quiet_deprecations():
      _warn(TRITON_WARNING)
    with pytest.raises(DeprecationWarning, match="Pallas Triton backend is deprecated"):
      _warn(TRITON_WARNING)


def test_other_warnings_pass_through():
  with ps.quiet_deprecations():
    with pytest.warns(DeprecationWarning, match="jax.numpy.foo is deprecated"):
      _warn("jax.numpy.foo is deprecated.")
    # The Triton text as another category is not the backend's warning.
    with pytest.warns(FutureWarning, match="Pallas Triton"):
      _warn(TRITON_WARNING, FutureWarning)
    # The message must start with it: a quote of it inside another message passes.
    with pytest.warns(DeprecationWarning, match="gnorm says"):
      _warn("gnorm says: " + TRITON_WARNING)


# A stand-in for JAX 0.11's Triton lowering: a primitive whose MLIR lowering
# raises the warning, as pallas_call's does (not its tracing).
_noisy_p = Primitive("gnorm_test_noisy")
_noisy_p.def_abstract_eval(lambda x: x)


def _noisy_lowering(ctx, x):
  _warn(TRITON_WARNING)
  return [x]


mlir.register_lowering(_noisy_p, _noisy_lowering)

# gnorm's side: a primitive lowered by tracing the kernels' caller and
# lowering it there, inside quiet_lowering (how primitives.py lowers them).
_kernels_p = Primitive("gnorm_test_kernels")
_kernels_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_kernels_p, ps.quiet_lowering(
    mlir.lower_fun(lambda x: _noisy_p.bind(x) + 1, multiple_results=False)))


def test_a_warning_raised_at_lowering_is_swallowed_by_the_lowering_rule():
  x = jax.ShapeDtypeStruct((4,), jnp.float32)

  def f(x):
    return _kernels_p.bind(x) * 2

  jax.jit(f).trace(x).lower()  # lowers _noisy_p: the warning is raised, and dropped
  assert jax.jit(f)(jnp.zeros(4)).tolist() == [2.0] * 4  # so does a call


def test_a_scope_around_tracing_alone_misses_it():
  # Why the lowering rule carries the filter: under a user's jit, lowering
  # happens after the traced (gnorm) code has returned.
  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  with ps.quiet_deprecations():
    traced = jax.jit(_noisy_p.bind).trace(x)
  with pytest.warns(DeprecationWarning, match="Pallas Triton backend is deprecated"):
    traced.lower()


def _make_triton_warn(monkeypatch):
  """Makes this JAX's Triton lowering rule warn first, as JAX 0.11.2's does."""
  from jax._src.pallas import core as pallas_core  # the backends' lowering rules
  from jax._src.pallas.triton import pallas_call_registration  # registers Triton's rule
  from jax.experimental.pallas import triton as plgpu

  del pallas_call_registration
  rules = pallas_core._backend_lowering_rules
  rule, platform = rules[plgpu.CompilerParams]

  def warning_rule(*args, **kwargs):
    _warn(TRITON_WARNING)
    return rule(*args, **kwargs)

  monkeypatch.setitem(rules, plgpu.CompilerParams, (warning_rule, platform))


def test_a_real_triton_kernel_lowered_for_cuda(monkeypatch):
  """JAX 0.11's behaviour on this JAX (0.10.2 does not warn): its Triton
  lowering rule, made to warn first as 0.11.2's does, run for CUDA from this
  CPU through a primitive lowered with ``quiet_lowering``."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  _make_triton_warn(monkeypatch)

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1

  def kernel(x):
    return pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          compiler_params=plgpu.CompilerParams(num_warps=4))(x)

  p = Primitive("gnorm_test_triton")
  p.def_abstract_eval(lambda x: x)
  mlir.register_lowering(p, ps.quiet_lowering(mlir.lower_fun(kernel, multiple_results=False)),
                         platform="cuda")
  x = jax.ShapeDtypeStruct((128,), jnp.float32)
  text = jax.jit(p.bind).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text
  # Lowered without the primitive, the same kernel warns: the rule does warn.
  with pytest.warns(DeprecationWarning, match="Pallas Triton backend is deprecated"):
    jax.jit(kernel).trace(x).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape", [(2**31 - 1,), (1, 2**31 - 1, 1), (1, 1, 2**31 - 1),
                                   (2, 2**30 - 1, 1), (16, 64, 64, 320)], ids=str)
def test_largest_indexable_tensors(shape):
  ps.check_index_range(shape, "x")  # does not raise


@pytest.mark.parametrize("shape", [(2**31,), (2, 2**30, 1), (2, 32, 1024, 32768),
                                   (1, 65536, 65536)], ids=str)
def test_too_large_tensors_raise_naming_the_shape(shape):
  with pytest.raises(ValueError, match=r"cannot index x of shape \(") as e:
    ps.check_index_range(shape, "x")
  message = str(e.value)
  assert str(tuple(shape)) in message and "2,147,483,647" in message
  assert "implementation='xla'" in message


def test_numpy_integer_dimensions():
  with pytest.raises(ValueError, match="cannot index x"):
    ps.check_index_range((np.int64(2), np.int64(2**30)), "x")
  ps.check_index_range((np.int32(3), np.int64(5)), "x")


def test_symbolic_dimensions_are_not_indexable():
  shape = jax.export.symbolic_shape("b, 64, 32")
  with pytest.raises(ValueError, match="needs static dimensions"):
    ps.check_index_range(shape, "x")


# Through gnorm itself: what a user sees.


def test_no_triton_deprecation_reaches_a_user_of_gnorm(monkeypatch):
  # Triton's lowering rule made to warn as JAX 0.11's does; a training step
  # through implementation="pallas" lowered for CUDA (6 kernels) under
  # pyproject's warnings-are-errors: nothing escapes.
  import gnorm

  _make_triton_warn(monkeypatch)
  x = jax.ShapeDtypeStruct((2, 8, 8, 32), jnp.bfloat16)

  def step(x):
    return jax.grad(lambda x: gnorm.group_norm(None, x, 8, activation="silu",
                                               implementation="pallas").sum())(x)

  text = jax.jit(step).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 6


def test_without_the_backend_pallas_names_why_and_auto_keeps_to_xla(fresh_probe, monkeypatch):
  import gnorm

  monkeypatch.setitem(sys.modules, ps.TRITON_MODULE, None)  # as if this JAX had none
  x = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
  with pytest.raises(ValueError, match=r"'pallas' needs Pallas's Triton backend, which this JAX"):
    gnorm.group_norm(None, x, 2, implementation="pallas")
  y = gnorm.group_norm(None, x, 2)
  np.testing.assert_allclose(y, gnorm.group_norm(None, x, 2, implementation="xla"), atol=0)


def test_too_large_for_the_kernels_pallas_refuses_and_auto_accepts():
  from gnorm._src import maths
  from gnorm._src import validation

  shape = (2, 2**15, 2**15)  # 2**31 elements, never allocated
  cfg = maths.Config(2, 1e-5, 2)
  with pytest.raises(ValueError, match=r"cannot index x of shape \(2, 32768, 32768\)"):
    validation.check_implementation("pallas", cfg, shape, False)
  assert validation.check_implementation("auto", cfg, shape, False) == "auto"
