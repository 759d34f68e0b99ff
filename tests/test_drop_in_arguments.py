"""Every argument of the four originals, and the test that shows the drop-in honours it.

``ARGUMENTS`` lists, for ``flax.linen.GroupNorm``, ``flax.nnx.GroupNorm``,
``equinox.nn.GroupNorm`` and ``haiku.GroupNorm``, every constructor and call
argument of the installed release, each with the tests that compare the
drop-in with the original on it. A new release that adds an argument fails
``test_every_argument_of_the_originals_is_listed`` until it is handled and
listed here and in the table of docs/drop_ins.md (which must list the same
rows and tests). The tests of arguments that no other file covers follow.
"""

import ast
import inspect
import re
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import gnorm
from gnorm.compat import equinox as compat_eqx
from gnorm.compat import haiku as compat_hk
from gnorm.compat import linen as compat_linen
from gnorm.compat import nnx as compat_nnx

ROOT = Path(__file__).resolve().parent.parent

ORIGINALS = {
    "flax.linen.GroupNorm": (nn.GroupNorm, nn.GroupNorm.__call__),
    "flax.nnx.GroupNorm": (nnx.GroupNorm.__init__, nnx.GroupNorm.__call__),
    "equinox.nn.GroupNorm": (eqx.nn.GroupNorm.__init__, eqx.nn.GroupNorm.__call__),
    "haiku.GroupNorm": (hk.GroupNorm.__init__, hk.GroupNorm.__call__),
}

L, X, E, H = ("test_compat_linen.py", "test_compat_nnx.py", "test_compat_equinox.py",
              "test_compat_haiku.py")
F, A, S = "test_compat_flax_tests.py", "test_drop_in_arguments.py", "test_sharding.py"
L_OUT, X_OUT = f"{L}::test_outputs_and_gradients_equal_flax", \
    f"{X}::test_outputs_and_gradients_equal_flax"
ERRORS = "test_compat_errors.py::test_the_drop_in_raises_as_the_original"

# original -> argument (call arguments marked "(call)") -> the tests that cover it.
ARGUMENTS = {
    "flax.linen.GroupNorm": {
        "num_groups": (L_OUT, f"{L}::test_errors_as_flax"),
        "group_size": (L_OUT, ERRORS),
        "epsilon": (L_OUT, f"{F}::test_group_norm"),
        "dtype": (L_OUT, f"{L}::test_float16_input_bfloat16_result"),
        "param_dtype": (f"{L}::test_same_parameters", L_OUT),
        "use_bias": (f"{L}::test_same_parameters", L_OUT),
        "use_scale": (f"{L}::test_same_parameters", L_OUT),
        "bias_init": (f"{L}::test_same_parameters",),
        "scale_init": (f"{L}::test_same_parameters",),
        "reduction_axes": (f"{F}::test_reduction_axes_equal_flax_linen",
                           f"{F}::test_group_norm_unbatched", L_OUT),
        "axis_name": (f"{L}::test_axis_name_in_shard_map", f"{S}::test_multidevice"),
        "axis_index_groups": (f"{A}::test_axis_index_groups_on_one_device",
                              f"{S}::test_multidevice"),
        "use_fast_variance": (L_OUT, f"{L}::test_more_accurate_than_flax_on_large_mean"),
        "force_float32_reductions": (L_OUT,),
        "parent": (f"{A}::test_linen_name_and_parent",),
        "name": (f"{A}::test_linen_name_and_parent", f"{L}::test_checkpoints_load_both_ways"),
        "x (call)": (L_OUT,),
        "mask (call)": (f"{L}::test_mask", f"{F}::test_group_norm_mask"),
    },
    "flax.nnx.GroupNorm": {
        "num_features": (f"{X}::test_same_attributes_and_state",
                         f"{X}::test_wrong_channel_count_as_flax"),
        "num_groups": (X_OUT, f"{X}::test_construction_errors_as_flax"),
        "group_size": (X_OUT, ERRORS),
        "epsilon": (X_OUT, f"{X}::test_same_attributes_and_state"),
        "dtype": (X_OUT,),
        "param_dtype": (X_OUT, f"{X}::test_same_attributes_and_state"),
        "use_bias": (X_OUT, f"{X}::test_same_attributes_and_state"),
        "use_scale": (X_OUT, f"{X}::test_same_attributes_and_state"),
        "bias_init": (f"{X}::test_same_attributes_and_state",),
        "scale_init": (f"{X}::test_same_attributes_and_state",),
        "reduction_axes": (f"{X}::test_reduction_axes",
                           f"{F}::test_reduction_axes_equal_flax_linen"),
        "axis_name": (f"{X}::test_axis_name_in_shard_map", f"{S}::test_multidevice"),
        "axis_index_groups": (f"{A}::test_axis_index_groups_on_one_device",
                              f"{A}::test_axis_index_groups_errors", f"{S}::test_multidevice"),
        "use_fast_variance": (X_OUT,),
        "promote_dtype": (f"{X}::test_custom_promote_dtype",),
        "rngs": (f"{X}::test_same_attributes_and_state",),
        "bias_metadata": (f"{X}::test_same_attributes_and_state",),
        "scale_metadata": (f"{X}::test_same_attributes_and_state",),
        "x (call)": (X_OUT,),
        "mask (call)": (f"{X}::test_mask", f"{F}::test_nnx_linen_groupnorm_equivalence"),
    },
    "equinox.nn.GroupNorm": {
        "groups": (f"{E}::test_matches_equinox_outputs_and_gradients",
                   f"{E}::test_constructor_errors_match_equinox"),
        "channels": (f"{E}::test_fields_and_leaves_match_equinox",
                     f"{E}::test_constructor_errors_match_equinox"),
        "eps": (f"{A}::test_eps_as_the_originals", f"{E}::test_fields_and_leaves_match_equinox"),
        "channelwise_affine": (f"{E}::test_matches_equinox_outputs_and_gradients",),
        "dtype": (f"{E}::test_fields_and_leaves_match_equinox",
                  f"{E}::test_low_precision_dtypes_match_equinox"),
        "x (call)": (f"{E}::test_matches_equinox_outputs_and_gradients",
                     f"{E}::test_call_errors_match_equinox"),
        "state (call)": (f"{E}::test_state_and_key_conventions",),
        "key (call)": (f"{E}::test_state_and_key_conventions",),
    },
    "haiku.GroupNorm": {
        "groups": (f"{H}::test_matches_haiku_outputs_and_gradients",),
        "axis": (f"{H}::test_axis_and_data_format", f"{H}::test_axis_over_the_groups_axis_only"),
        "create_scale": (f"{H}::test_matches_haiku_outputs_and_gradients",),
        "create_offset": (f"{H}::test_matches_haiku_outputs_and_gradients",),
        "eps": (f"{A}::test_eps_as_the_originals",),
        "scale_init": (f"{H}::test_params_match_haiku",),
        "offset_init": (f"{H}::test_params_match_haiku",),
        "data_format": (f"{H}::test_axis_and_data_format",),
        "name": (f"{H}::test_params_match_haiku",),
        "x (call)": (f"{H}::test_matches_haiku_outputs_and_gradients",),
        "scale (call)": (f"{H}::test_call_time_scale_offset_shapes",),
        "offset (call)": (f"{H}::test_call_time_scale_offset_shapes",),
    },
}


def _arguments(init, call):
  names = [p for p in inspect.signature(init).parameters if p != "self"]
  return names + [f"{p} (call)" for p in inspect.signature(call).parameters if p != "self"]


@pytest.mark.parametrize("original", sorted(ORIGINALS))
def test_every_argument_of_the_originals_is_listed(original):
  # Read from the installed release: an argument it adds fails here first.
  assert _arguments(*ORIGINALS[original]) == list(ARGUMENTS[original])


def _docs_rows() -> dict:
  """The rows of docs/drop_ins.md's argument table: (original, argument) -> tests."""
  rows = {}
  for line in (ROOT / "docs" / "drop_ins.md").read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 4 and cells[0].strip("`") in ORIGINALS:
      argument = re.sub(r"`([^`]*)`", r"\1", cells[1])
      rows[(cells[0].strip("`"), argument)] = tuple(re.findall(r"`([^`]+::[^`]+)`", cells[3]))
  return rows


def test_the_docs_table_lists_every_argument_and_its_tests():
  listed = {(o, a): t for o, args in ARGUMENTS.items() for a, t in args.items()}
  assert _docs_rows() == listed


def test_every_listed_test_exists():
  defined = {}
  for tests in (t for args in ARGUMENTS.values() for t in args.values()):
    for test in tests:
      path, name = test.split("::")
      if path not in defined:
        tree = ast.parse((ROOT / "tests" / path).read_text())
        defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
      assert name in defined[path], test


# --- arguments no other file covers --------------------------------------------------


def test_eps_as_the_originals():
  # A spread of 0.3 against eps=0.1: eps changes every output by a third.
  x = 0.3 * jax.random.normal(jax.random.key(0), (5, 8, 6))  # (N, C, L)
  ys = [jax.vmap(cls(4, 8, eps=0.1))(x) for cls in (eqx.nn.GroupNorm, compat_eqx.GroupNorm)]
  np.testing.assert_allclose(ys[1], ys[0], rtol=0, atol=1e-5)
  assert float(jnp.abs(ys[0] - jax.vmap(eqx.nn.GroupNorm(4, 8))(x)).max()) > 0.1
  xh = jnp.moveaxis(x, 1, -1)
  fs = [hk.without_apply_rng(hk.transform(lambda x, c=cls: c(4, eps=0.1)(x)))
        for cls in (hk.GroupNorm, compat_hk.GroupNorm)]
  params = fs[0].init(None, xh)
  np.testing.assert_allclose(fs[1].apply(params, xh), fs[0].apply(params, xh), rtol=0, atol=1e-5)
  # Where the originals return NaN, the drop-ins raise, naming the value.
  for eps in (-1.0, float("nan"), float("inf")):
    match = rf"eps must be a finite number >= 0, got {eps}"
    with pytest.raises(ValueError, match=match):
      compat_eqx.GroupNorm(4, 8, eps=eps)(x[0])
    with pytest.raises(ValueError, match=match):
      hk.transform(lambda x, e=eps: compat_hk.GroupNorm(4, eps=e)(x)).init(None, xh)


class _Parent(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x):
    y = self.norm(num_groups=2, name="gn")(x)
    # parent=None: a module of its own, not a child (flax's semantics).
    detached = self.norm(num_groups=2, parent=None)
    return y, detached.init(jax.random.key(0), x)


def test_linen_name_and_parent():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  outs = [jax.jit(_Parent(n).init_with_output)(jax.random.key(1), x)
          for n in (nn.GroupNorm, compat_linen.GroupNorm)]
  ((y_flax, own_flax), v_flax), ((y, own), v) = outs
  assert jax.tree.structure(v) == jax.tree.structure(v_flax)
  assert set(v["params"]) == {"gn"}  # the named child only
  assert jax.tree.structure(own) == jax.tree.structure(own_flax)
  np.testing.assert_allclose(y, y_flax, rtol=0, atol=1e-5)


def _one_device_mesh():
  return jax.make_mesh((1,), ("s",), axis_types=(AxisType.Auto,))


def test_axis_index_groups_on_one_device():
  # One CPU device here (tests/multidevice_groups.py has 8): a shard_map over
  # one shard in one group runs the grouped collectives for real. flax's
  # lax.pmean with axis_index_groups needs check_vma=False in shard_map.
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
  variables = jax.jit(nn.GroupNorm(num_groups=2).init)(jax.random.key(1), x)
  spec = P(None, "s")

  def sharded(apply, check_vma=True):
    return jax.jit(jax.shard_map(apply, mesh=_one_device_mesh(), in_specs=(P(), spec),
                                 out_specs=spec, check_vma=check_vma))

  kw = dict(num_groups=2, axis_name="s", axis_index_groups=[[0]])
  want = sharded(nn.GroupNorm(**kw).apply, check_vma=False)(variables, x)
  np.testing.assert_allclose(sharded(compat_linen.GroupNorm(**kw).apply)(variables, x), want,
                             rtol=0, atol=1e-5)
  graphdef, state = nnx.split(compat_nnx.GroupNorm(8, 2, axis_name="s", axis_index_groups=[[0]],
                                                   rngs=nnx.Rngs(0)))
  y = sharded(lambda st, x: nnx.merge(graphdef, st)(x))(state, x)
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
  assert compat_nnx.GroupNorm(8, 2, axis_index_groups=[[0]], rngs=nnx.Rngs(0)) \
      .axis_index_groups == [[0]]  # kept as given, as flax keeps it
  # gnorm's own function and modules take it too.
  p = {"gamma": variables["params"]["scale"], "beta": variables["params"]["bias"]}
  f = sharded(lambda p, x: gnorm.group_norm(p, x, 2, 1e-6, axis_name="s",
                                            axis_index_groups=((0,),)))
  np.testing.assert_allclose(f(p, x), want, rtol=0, atol=1e-5)
  layer = gnorm.GroupNorm(2, epsilon=1e-6, axis_name="s", axis_index_groups=[[0]])
  np.testing.assert_allclose(sharded(lambda p, x: layer.apply({"params": p}, x))(p, x), want,
                             rtol=0, atol=1e-5)
  assert gnorm.nnx.GroupNorm(2, 8, axis_name="s", axis_index_groups=[[0]]) \
      .axis_index_groups == ((0,),)  # a static attribute: hashable


def test_axis_index_groups_ignored_without_axis_name_as_flax():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  kw = dict(num_groups=2, axis_index_groups="anything: flax never reads it")
  v = jax.jit(nn.GroupNorm(num_groups=2).init)(jax.random.key(1), x)
  np.testing.assert_allclose(jax.jit(compat_linen.GroupNorm(**kw).apply)(v, x),
                             jax.jit(nn.GroupNorm(**kw).apply)(v, x), rtol=0, atol=1e-5)
  ys = [nnx.jit(lambda m, x: m(x))(cls(8, 2, axis_index_groups=kw["axis_index_groups"],
                                       rngs=nnx.Rngs(0)), x)
        for cls in (nnx.GroupNorm, compat_nnx.GroupNorm)]
  np.testing.assert_allclose(ys[1], ys[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("groups, error, match", [
    ([[0, 1], [2]], ValueError, r"axis_index_groups=\[\[0, 1\], \[2\]\] must be non-empty "
                                r"groups of one size"),
    ([[0, 2]], ValueError, r"\[\[0, 2\]\] .* each index 0, 1, ..., n-1 of axis 's'"),
    ([[0, 0]], ValueError, r"\[\[0, 0\]\]"),
    ([], ValueError, r"axis_index_groups=\[\]"),
    ([[0.0, 1.0]], TypeError, r"sequence of sequences of ints.*\[\[0.0, 1.0\]\]"),
    ("01", TypeError, r"'01'"),
    ([[True]], TypeError, r"\[\[True\]\]"),
])
def test_axis_index_groups_errors(groups, error, match):
  x = jnp.ones((2, 4, 8))
  with pytest.raises(error, match=match + r".*input shape \(2, 4, 8\)"):
    gnorm.group_norm(None, x, 2, axis_name="s", axis_index_groups=groups)
  with pytest.raises(error, match=match):
    compat_nnx.GroupNorm(8, 2, axis_name="s", axis_index_groups=groups, rngs=nnx.Rngs(0))
  with pytest.raises(error, match=match):
    gnorm.GroupNorm(2, axis_name="s", axis_index_groups=groups)
  with pytest.raises(error, match=match):
    gnorm.nnx.GroupNorm(2, 8, axis_name="s", axis_index_groups=groups)


def test_axis_index_groups_needs_axis_name_and_the_whole_axis():
  x = jnp.ones((2, 4, 8))
  with pytest.raises(ValueError, match=r"axis_index_groups=\(\(0,\),\) needs axis_name.*"
                                       r"input shape \(2, 4, 8\)"):
    gnorm.group_norm(None, x, 2, axis_index_groups=((0,),))
  with pytest.raises(ValueError, match="needs axis_name"):
    gnorm.GroupNorm(2, axis_index_groups=((0,),))
  f = jax.shard_map(lambda x: gnorm.group_norm(None, x, 2, axis_name="s",
                                               axis_index_groups=((0,), (1,))),
                    mesh=_one_device_mesh(), in_specs=P(None, "s"), out_specs=P(None, "s"))
  with pytest.raises(ValueError, match=r"hold 2 indices, but axis 's' has 1"):
    jax.jit(f).lower(jax.ShapeDtypeStruct(x.shape, x.dtype))


def test_axis_index_groups_under_vmap_is_not_implemented_by_jax():
  # docs: JAX runs grouped collectives in shard_map and pmap, not in vmap.
  x = jnp.ones((2, 2, 4, 8))
  with pytest.raises(NotImplementedError):
    jax.vmap(lambda x: gnorm.group_norm(None, x, 2, axis_name="v",
                                        axis_index_groups=((0, 1),)), axis_name="v")(x)
