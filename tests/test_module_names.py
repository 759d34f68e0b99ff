"""Names of ``gnorm.GroupNorm`` modules: the seed's patterns (``"gn{}"``) in
compact and setup parents, under lifted transforms, across processes."""

import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm


class _Block(nn.Module):
  """A compact parent with pattern, literal and automatic names."""

  @nn.compact
  def __call__(self, x):
    x = gnorm.GroupNorm(2, name="gn{}")(x)
    x = gnorm.GroupNorm(2, name="fc-{:>03d}")(x)
    x = gnorm.GroupNorm(2, name="gn{}", gamma=gnorm.init.Normal(1.0, 0.1))(x)
    x = gnorm.GroupNorm(2, name="fc-{:>03d}")(x)
    x = gnorm.GroupNorm(2, name="fixed")(x)
    x = gnorm.GroupNorm(2)(x)
    return gnorm.GroupNorm(2)(x)


BLOCK_NAMES = ["GroupNorm_0", "GroupNorm_1", "fc-001", "fc-002", "fixed", "gn1", "gn2"]


class _Net(nn.Module):
  """A setup parent holding compact children, one of them used twice."""

  def setup(self):
    self.first = _Block()
    self.second = _Block()
    self.head = gnorm.GroupNorm(2, name="gn{}")
    self.tail = gnorm.GroupNorm(2, name="gn{}")

  def __call__(self, x):
    return self.tail(self.head(self.second(self.first(self.first(x)))))


def test_pattern_names_in_compact_parent():
  params = _Block().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert sorted(params) == BLOCK_NAMES


def test_nested_model_init_and_apply_agree():
  x = jax.random.normal(jax.random.key(1), (2, 8))
  net = _Net()
  variables = net.init(jax.random.key(0), x)
  params = variables["params"]
  assert sorted(params) == ["first", "gn1", "gn2", "second"]
  assert sorted(params["first"]) == sorted(params["second"]) == BLOCK_NAMES

  # apply with the init variables works, repeatedly, eagerly and under jit, and
  # every module reads (not creates) its parameters: the trees are identical.
  y0, state = net.apply(variables, x, mutable=True)
  assert jax.tree.structure(state) == jax.tree.structure(variables)
  for _ in range(3):
    np.testing.assert_array_equal(net.apply(variables, x), y0)
  np.testing.assert_allclose(jax.jit(net.apply)(variables, x), y0, rtol=1e-6, atol=1e-6)
  # A second init gives the same tree, and so does a fresh model object.
  assert jax.tree.structure(_Net().init(jax.random.key(3), x)) == jax.tree.structure(
      variables)
  # Changing a pattern-named param changes the output: it is really used.
  for path in (("gn2",), ("second", "gn2"), ("first", "fc-001")):
    bumped = jax.tree.map(lambda p: p, variables)
    layer_params = bumped["params"]
    for key in path:
      layer_params = layer_params[key]
    layer_params["gamma"] = layer_params["gamma"] * jnp.arange(1.0, 9.0)
    assert not np.allclose(net.apply(bumped, x), y0), path


def test_pattern_names_under_lifted_transforms():
  class Lifted(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.remat(_Block)(name="block")(x)
      x = nn.remat(gnorm.GroupNorm)(2, name="gn{}")(x)
      return gnorm.GroupNorm(2, name="gn{}")(x)

  x = jnp.ones((1, 4))
  variables = Lifted().init(jax.random.key(0), x)
  assert sorted(variables["params"]) == ["block", "gn1", "gn2"]
  assert sorted(variables["params"]["block"]) == BLOCK_NAMES
  _, state = Lifted().apply(variables, x, mutable=True)
  assert jax.tree.structure(state) == jax.tree.structure(variables)

  class Body(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
      carry = gnorm.GroupNorm(2, name="gn{}")(carry)
      return gnorm.GroupNorm(2, name="gn{}")(carry), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
      return gnorm.GroupNorm(2, name="gn{}")(scan(name="layers")(x, None)[0])

  variables = Scanned().init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "layers": {"gn1": {"gamma": (3, 4), "beta": (3, 4)},
                 "gn2": {"gamma": (3, 4), "beta": (3, 4)}},
      "gn1": {"gamma": (4,), "beta": (4,)}}
  _, state = Scanned().apply(variables, x, mutable=True)
  assert jax.tree.structure(state) == jax.tree.structure(variables)


def test_pattern_counters_are_per_parent_and_per_pattern():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = gnorm.GroupNorm(2, name="a{}")
      b = gnorm.GroupNorm(2, name="b{}")
      c = gnorm.GroupNorm(2, name="a{}")
      return [m.name for m in (a, b, c)]

  names, _ = Two().init_with_output(jax.random.key(0), jnp.ones((1, 4)))
  assert names == ["a1", "b1", "a2"]
  names, _ = Two().init_with_output(jax.random.key(0), jnp.ones((1, 4)))
  assert names == ["a1", "b1", "a2"]  # counted afresh in every call


def test_seed_left_aligned_pattern_follows_python():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = gnorm.GroupNorm(2, name="fc-{:03d}")(x)
      return gnorm.GroupNorm(2, name="fc-{:<03d}")(x)

  params = M().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert sorted(params) == ["fc-001", "fc-100"]


def test_top_level_modules_use_a_process_wide_counter():
  pattern = "top-level-{}-test"
  names = [gnorm.GroupNorm(2, name=pattern).name for _ in range(3)]
  assert names == ["top-level-1-test", "top-level-2-test", "top-level-3-test"]
  layer = gnorm.GroupNorm(2, name="top-level-{:>02d}")
  assert layer.name == "top-level-01"
  # init and apply clone the module; the clone keeps the filled name.
  x = jnp.ones((1, 4))
  v = layer.init(jax.random.key(0), x)
  assert layer.clone().name == "top-level-01"
  layer.apply(v, x)
  assert gnorm.GroupNorm(2, name="top-level-{:>02d}").name == "top-level-02"


def test_names_are_identical_across_processes():
  script = textwrap.dedent("""
      import os
      os.environ["JAX_PLATFORMS"] = "cpu"
      import jax, jax.numpy as jnp
      from tests.test_module_names import _Net
      v = _Net().init(jax.random.key(0), jnp.ones((1, 4)))
      print(sorted("/".join(str(k.key) for k in path)
                   for path, _ in jax.tree_util.tree_leaves_with_path(v)))
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True, timeout=120).stdout.strip()
  # This process has built many pattern-named modules already.
  v = _Net().init(jax.random.key(0), jnp.ones((1, 4)))
  here = sorted("/".join(str(k.key) for k in path)
                for path, _ in jax.tree_util.tree_leaves_with_path(v))
  assert out == str(here)


@pytest.mark.parametrize("name,error,match", [
    ("gn{}{}", ValueError, "2 replacement fields"),
    ("a{}-{:03d}-{}", ValueError, "3 replacement fields"),
    ("gn{x}", ValueError, "positional field"),
    ("gn{!r}", ValueError, "positional field"),
    ("gn{", ValueError, "not a valid format pattern"),
    ("gn{:s}", ValueError, "cannot be filled with an integer"),
    ("gn{{}}", ValueError, "literal braces"),
    (3, TypeError, "name must be a str"),
])
def test_bad_names(name, error, match):
  with pytest.raises(error, match=match):
    gnorm.GroupNorm(2, name=name)


def test_none_keeps_flax_automatic_names():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return gnorm.GroupNorm(2, name=None)(gnorm.GroupNorm(2)(x))

  params = M().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert sorted(params) == ["GroupNorm_0", "GroupNorm_1"]
