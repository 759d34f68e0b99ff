"""gnorm lowers for GPU and TPU: ``jax.export`` checks that run on a CPU-only machine.

``jax.export`` lowers for a platform the machine does not have, so CI can check
that everything gnorm offers still lowers for ``cuda`` and ``tpu``: the function
with each of its options, layouts and dtypes, its derivatives (``grad``,
``jvp``), ``vmap``, ``shard_map`` with ``axis_name`` over an abstract mesh of 8
devices, and the linen and nnx modules inside a jitted training step. Every
argument is a ``jax.ShapeDtypeStruct``: nothing is computed. Each export is
checked for what gnorm promises (the output has the input's shape and dtype,
gradients have their parameters' shapes, a training step returns parameters
shaped as the ones it took), not only for the absence of an exception.

The ``optimization_barrier`` calls of ``gnorm/_src/backends/xla_cpu.py`` are
XLA:CPU scheduling hints; the last tests check that they reach modules lowered
for CPU and no others.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax import export
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm

S = jax.ShapeDtypeStruct
F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
PLATFORMS = ("cuda", "tpu")
N, H, W, C = 2, 8, 8, 16


def _affine(shape=(C,)):
  return {"gamma": S(shape, F32), "beta": S(shape, F32)}


# name: (params, x, mask, keyword arguments of group_norm).
CASES = {
    "nhwc": (_affine(), S((N, H, W, C), F32), None, dict(n_groups=4)),
    "nchw": (_affine(), S((N, C, H, W), F32), None, dict(n_groups=4, channel_axis=1)),
    "group_size": (_affine(), S((N, H, W, C), F32), None, dict(group_size=8)),
    "sequence": (_affine(), S((N, 10, C), F32), None, dict(n_groups=2)),
    "no_affine": (None, S((N, H, W, C), F32), None, dict(n_groups=4)),
    "silu": (_affine(), S((N, H, W, C), F32), None, dict(n_groups=4, activation="silu")),
    "gelu": (_affine(), S((N, H, W, C), F32), None, dict(n_groups=4, activation="gelu")),
    "mask": (_affine(), S((N, H, W, C), F32), S((N, H, W, 1), jnp.bool_),
             dict(n_groups=4)),
    "per_sample_affine": (_affine((N, C)), S((N, H, W, C), F32), None, dict(n_groups=4)),
    "bfloat16": (_affine(), S((N, H, W, C), BF16), None, dict(n_groups=4)),
    "float16": (_affine(), S((N, H, W, C), F16), None, dict(n_groups=4)),
    # eps=0 takes a per-group shift (maths.pivot); with a mask it is masked too.
    "eps_zero_mask": (_affine(), S((N, H, W, C), F32), S((N, H, W, 1), jnp.bool_),
                      dict(n_groups=4, eps=0.0)),
    # Everything at once, channels-first in bfloat16.
    "all_options": (_affine((N, C)), S((N, C, H, W), BF16), S((N, 1, H, W), jnp.bool_),
                    dict(group_size=4, channel_axis=1, activation="silu")),
}


def _forward(name):
  """``f(params, x, mask)`` for one case, and its arguments."""
  params, x, mask, kwargs = CASES[name]

  def f(p, x, m):
    return gnorm.group_norm(p, x, mask=m, **kwargs)

  return f, (params, x, mask)


def _loss(f):
  # A float32 loss whatever the input dtype, with a gradient that is not constant.
  return lambda p, x, m: jnp.sum(jnp.sin(f(p, x, m).astype(F32)))


def _export(f, platforms, *args):
  exported = export.export(jax.jit(f), platforms=platforms)(*args)
  assert exported.platforms == platforms
  return exported


def _outputs(exported):
  """The exported function's outputs as a tree of ``(shape, dtype)``."""
  return jax.tree_util.tree_unflatten(
      exported.out_tree, [(a.shape, a.dtype) for a in exported.out_avals])


def _like(tree):
  """``tree``'s leaves as ``(shape, dtype)``, to compare with ``_outputs``."""
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def _ops(exported, name):
  """How many ``stablehlo.<name>`` operations the module holds (locations aside)."""
  return exported.mlir_module().count(f"stablehlo.{name}")


def _check_normalises(exported):
  # Statistics need reductions over x: a module without them is not GroupNorm.
  assert _ops(exported, "reduce") >= 2, exported.mlir_module()[:2000]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_exports(platform, name):
  f, args = _forward(name)
  exported = _export(f, (platform,), *args)
  assert _outputs(exported) == _like(args[1])  # x's shape and dtype
  assert [(a.shape, a.dtype) for a in exported.in_avals] == [
      (a.shape, a.dtype) for a in jax.tree.leaves(args)]
  _check_normalises(exported)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_grad_exports(platform, name):
  f, args = _forward(name)
  exported = _export(jax.grad(_loss(f), argnums=(0, 1)), (platform,), *args)
  params, x, _ = args
  # Gradients have the shapes and dtypes of what they differentiate.
  assert _outputs(exported) == _like((params, x))
  _check_normalises(exported)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("platform", PLATFORMS)
def test_jvp_exports(platform, name):
  f, (params, x, mask) = _forward(name)

  def push(p, x, m, tp, tx):
    return jax.jvp(lambda p, x: f(p, x, m), (p, x), (tp, tx))

  exported = _export(push, (platform,), params, x, mask, params, x)
  assert _outputs(exported) == _like((x, x))
  _check_normalises(exported)


@pytest.mark.parametrize("name", ["nhwc", "mask", "per_sample_affine", "all_options"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_vmap_exports(platform, name):
  # A leading axis of 3 mapped over x and the mask; parameters shared.
  f, (params, x, mask) = _forward(name)

  def stack(a):
    return S((3, *a.shape), a.dtype)

  xs, masks = stack(x), None if mask is None else stack(mask)
  exported = _export(jax.vmap(f, in_axes=(None, 0, 0)), (platform,), params, xs, masks)
  assert _outputs(exported) == _like(xs)
  # Per-example gradients: one parameter gradient per mapped example.
  per_example = jax.vmap(jax.grad(_loss(f), argnums=(0, 1)), in_axes=(None, 0, 0))
  exported = _export(per_example, (platform,), params, xs, masks)
  assert _outputs(exported) == _like((jax.tree.map(stack, params), xs))


# The mesh of tests/multidevice_checks.py, abstract: no devices are needed.
MESH = AbstractMesh((2, 4), ("b", "s"), axis_types=(AxisType.Auto,) * 2)


def _on_mesh(a, spec):
  return S(a.shape, a.dtype, sharding=NamedSharding(MESH, spec))


@pytest.mark.parametrize("options", ["plain", "mask_silu_per_sample"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_shard_map_with_axis_name_exports(platform, options):
  # Batch over "b", the first spatial axis over "s": every shard of "s" holds
  # part of each group, so the statistics must be combined across "s".
  spec = P("b", "s")
  x = _on_mesh(S((4, 16, 3, C), F32), spec)
  if options == "plain":
    params, p_spec, mask, kwargs = _affine(), P(), None, dict(n_groups=4)
  else:
    params, p_spec = _affine((4, C)), P("b")
    mask = _on_mesh(S((4, 16, 3, 1), jnp.bool_), spec)
    kwargs = dict(group_size=4, activation="silu")
  params = jax.tree.map(lambda a: _on_mesh(a, p_spec), params)

  def body(p, x, m):
    return gnorm.group_norm(p, x, mask=m, axis_name="s", **kwargs)

  f = jax.shard_map(body, mesh=MESH, in_specs=(p_spec, spec, spec), out_specs=spec)

  exported = _export(f, (platform,), params, x, mask)
  assert exported.nr_devices == MESH.size == 8
  assert _outputs(exported) == _like(x)  # global shapes
  # The statistics of the shards are combined by one all_gather.
  assert _ops(exported, "all_gather") == 1, exported.mlir_module()
  assert "mhlo.num_partitions = 8" in exported.mlir_module()

  grad = _export(jax.grad(_loss(f), argnums=(0, 1)), (platform,), params, x, mask)
  assert grad.nr_devices == 8
  assert _outputs(grad) == _like((params, x))
  # The backward pass sums across shards as well.
  assert _ops(grad, "all_reduce") >= 1, grad.mlir_module()


class _LinenNet(nn.Module):
  """Conv, GroupNorm with fused SiLU, pooled linear head: a small classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(C, (3, 3))(x)
    x = gnorm.GroupNorm(group_size=4, activation="silu")(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class _NnxNet(nnx.Module):
  """The same network in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, C, (3, 3), rngs=rngs)
    self.norm = gnorm.nnx.GroupNorm(num_channels=C, group_size=4, activation="silu")
    self.head = nnx.Linear(C, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.conv(x)).mean(axis=(1, 2)))


IMAGES, LABELS = S((N, H, W, 3), F32), S((N,), jnp.int32)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_linen_training_step_exports(platform):
  model, optimizer = _LinenNet(), optax.adam(1e-3)
  params = jax.eval_shape(model.init, jax.random.key(0), IMAGES)["params"]
  opt_state = jax.eval_shape(optimizer.init, params)

  def train_step(params, opt_state, x, labels):
    loss, grads = jax.value_and_grad(
        lambda p: _cross_entropy(model.apply({"params": p}, x), labels))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  exported = _export(train_step, (platform,), params, opt_state, IMAGES, LABELS)
  assert "GroupNorm_0" in params
  assert _outputs(exported) == _like((params, opt_state, S((), F32)))
  _check_normalises(exported)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_nnx_training_step_exports(platform):
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _NnxNet(nnx.Rngs(0))))

  def train_step(state, x, labels):
    def loss(state):
      return _cross_entropy(nnx.merge(graphdef, state)(x), labels)

    value, grads = jax.value_and_grad(loss)(state)
    # Plain SGD.
    return jax.tree.map(lambda p, g: p - 0.1 * g, state, grads), value

  exported = _export(train_step, (platform,), state, IMAGES, LABELS)
  assert _like(nnx.to_pure_dict(state["norm"])) == _like(_affine())
  assert _outputs(exported) == _like((state, S((), F32)))
  _check_normalises(exported)


def test_forward_exports_for_several_platforms_at_once():
  # One module for every platform: anything platform-specific in the lowering
  # must lower side by side with the other platforms' versions.
  f, args = _forward("all_options")
  exported = _export(f, ("cpu", "cuda", "tpu"), *args)
  assert _outputs(exported) == _like(args[1])
  _check_normalises(exported)


# The forwards that the barrier tests look at: the CPU hints are in the
# statistics and the normalising pass, which these cover in both input dtypes.
# (The backward is left out: jax.checkpoint puts barriers of its own there,
# on every platform.)
HINT_CASES = [(name, dtype) for name in ("nhwc", "silu", "mask") for dtype in (F32, BF16)]


def _barriers(platforms):
  """``{"case/dtype": number of optimization barriers}`` of each exported forward."""
  counts = {}
  for name, dtype in HINT_CASES:
    f, (params, x, mask) = _forward(name)
    exported = _export(f, platforms, params, S(x.shape, dtype), mask)
    counts[f"{name}/{jnp.dtype(dtype).name}"] = _ops(exported, "optimization_barrier")
  return counts


def test_forward_has_no_cpu_hints_on_tpu():
  found = {case: n for case, n in _barriers(("tpu",)).items() if n}
  assert not found, (
      f"optimization_barrier (an XLA:CPU scheduling hint) in the forward "
      f"lowered for tpu, per case: {found}")


def test_forward_has_only_the_gpu_plans_stage_barriers_on_cuda():
  # On CUDA the statistics' two reduction stages are kept apart by one
  # barrier per pass over x (backends/xla_gpu.py): one without a mask, two
  # with one. Any more would be CPU hints leaking into the GPU's program.
  expected = {f"{name}/{jnp.dtype(dtype).name}": 2 if name == "mask" else 1
              for name, dtype in HINT_CASES}
  assert _barriers(("cuda",)) == expected


def test_forward_has_cpu_hints_on_cpu():
  # The companion of the test above: the hints are there for CPU, so that
  # test cannot pass only because the op is spelled differently in the text.
  missing = [case for case, n in _barriers(("cpu",)).items() if not n]
  assert not missing, f"no optimization_barrier lowered for cpu in: {missing}"
