"""``axis_index_groups`` on 8 simulated CPU devices: checks run by ``test_sharding.py``.

``multidevice_checks.py`` runs these in its subprocess (float64 mode, 8 CPU
devices) with its own checks. Each check compares gnorm, with statistics
combined within groups of devices, against a float64 reference that
normalises each group's shards on their own, joined along the split axis;
and the flax drop-ins against flax's own layers, whose ``lax.pmean`` with
``axis_index_groups`` runs only outside ``shard_map``'s ``check_vma`` (JAX
0.10 raises ``NotImplementedError`` there) or in ``pmap``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm
from gnorm._src import dispatch
from gnorm.compat import linen as compat_linen
from gnorm.compat import nnx as compat_nnx
from tests.reference import naive_jnp

# Shards i of the 8 along axis 1 (2 rows each), grouped two ways: blocks of
# neighbours, and every other shard (the groups interleave).
BLOCKS = ((0, 1), (2, 3), (4, 5), (6, 7))
STRIDED = ((0, 2, 4, 6), (1, 3, 5, 7))
ROWS = 2  # rows of axis 1 per shard


def _mesh(shape=(8,), names=("s",)):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _close(a, b, tol=1e-10):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert u.shape == v.shape, (u.shape, v.shape)
    err = np.max(np.abs(u - v))
    if not err <= tol * max(1.0, np.max(np.abs(v))):
      raise AssertionError(f"max abs difference {err} > {tol}")


def _per_group(params, x, mask, n_groups, groups):
  """The reference: each group of shards (rows of axis 1) normalised alone."""
  y = jnp.zeros(x.shape, x.dtype)
  for g in groups:
    rows = np.concatenate([np.arange(i * ROWS, (i + 1) * ROWS) for i in g])
    y = y.at[:, rows].set(naive_jnp(params, x[:, rows], n_groups, mask=mask[:, rows]))
  return y


def _data(seed=0):
  """(4, 16, 3, 8) data with padded rows: shards with unequal, even zero, counts."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 8 * ROWS, 3, 8)) * 2 + 3
  lengths = np.array([13, 3, 16, 7])
  mask = np.broadcast_to(np.arange(8 * ROWS)[None, :, None, None] < lengths[:, None, None, None],
                         (4, 8 * ROWS, 3, 1)).copy()
  params = {"gamma": rng.normal(size=8) + 1, "beta": rng.normal(size=8)}
  return params, x, mask


def _check_values_and_gradients(groups):
  mesh = _mesh()
  params, x, mask = _data()
  spec = P(None, "s")

  def body(p, x, m):
    return gnorm.group_norm(p, x, 2, mask=m, axis_name="s", axis_index_groups=groups)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), spec, spec), out_specs=spec))
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
  args = (put(params, P()), put(x, spec), put(mask, spec))
  _close(f(*args), _per_group(params, x, mask, 2, groups))

  def loss(fn):
    return lambda p, x, m: jnp.sum(jnp.sin(jnp.where(m, fn(p, x, m), 0.0)))

  g = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(*args)
  g_ref = jax.grad(loss(lambda p, x, m: _per_group(p, x, m, 2, groups)), argnums=(0, 1))(
      params, x, mask)
  _close(g, g_ref)


def check_axis_index_groups_blocks_values_and_gradients():
  _check_values_and_gradients(BLOCKS)


def check_axis_index_groups_strided_values_and_gradients():
  _check_values_and_gradients(STRIDED)


def check_axis_index_groups_gpu_plan_on_the_cpu():
  # CUDA and ROCm reduce by a plan of their own (backends/xla_gpu.py), which
  # combines the shards' statistics too; forced here, traced inside the block.
  with dispatch.forced("xla_gpu"):
    _check_values_and_gradients(BLOCKS)


def check_axis_index_groups_in_pmap():
  params, x, mask = _data(1)
  pieces = np.stack(np.split(x, 8, axis=1))  # (8, N, ROWS, W, C)
  masks = np.stack(np.split(mask, 8, axis=1))
  y = jax.pmap(lambda x, m: gnorm.group_norm(params, x, 2, mask=m, axis_name="d",
                                             axis_index_groups=STRIDED),
               axis_name="d")(pieces, masks)
  _close(np.concatenate(list(np.asarray(y)), axis=1), _per_group(params, x, mask, 2, STRIDED))


def check_axis_index_groups_over_two_mesh_axes():
  # Over ("b", "s") the index is b * 4 + s: groups of one value of b are
  # the shards of "s" alone.
  mesh = _mesh((2, 4), ("b", "s"))
  params, x, _ = _data(2)
  spec = P(None, ("b", "s"))

  def body(axis_name, groups):
    return jax.jit(jax.shard_map(
        lambda p, x: gnorm.group_norm(p, x, 2, axis_name=axis_name, axis_index_groups=groups),
        mesh=mesh, in_specs=(P(), spec), out_specs=spec))

  xs = jax.device_put(x, NamedSharding(mesh, spec))
  _close(body(("b", "s"), ((0, 1, 2, 3), (4, 5, 6, 7)))(params, xs), body("s", None)(params, xs))


def check_axis_index_groups_not_covering_the_axis_raises():
  f = jax.shard_map(lambda x: gnorm.group_norm(None, x, 2, axis_name="s",
                                               axis_index_groups=((0, 1), (2, 3))),
                    mesh=_mesh(), in_specs=P(None, "s"), out_specs=P(None, "s"))
  try:
    jax.jit(f).lower(jax.ShapeDtypeStruct((2, 16, 8), jnp.float32))
  except ValueError as e:
    assert "hold 4 indices, but axis 's' has 8" in str(e), e
  else:
    raise AssertionError("groups covering 4 of 8 devices were accepted")


def _sharded(apply, mesh, spec, check_vma=True):
  return jax.jit(jax.shard_map(apply, mesh=mesh, in_specs=(P(), spec), out_specs=spec,
                               check_vma=check_vma))


def check_flax_drop_ins_axis_index_groups_match_flax():
  # No mask: flax's pmean of the shards' means is then the exact statistic
  # too (equal shards), so the two agree to float64 rounding.
  mesh = _mesh()
  spec = P(None, "s")
  _, x, _ = _data(3)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  kw = dict(num_groups=2, epsilon=1e-5, axis_name="s",
            axis_index_groups=[list(g) for g in STRIDED], param_dtype=jnp.float64)
  ours, theirs = compat_linen.GroupNorm(**kw), nn.GroupNorm(**kw)
  v = nn.GroupNorm(num_groups=2, param_dtype=jnp.float64,
                   scale_init=nn.initializers.normal(1.0)).init(jax.random.key(0), x)
  f_ours = _sharded(ours.apply, mesh, spec)
  f_theirs = _sharded(theirs.apply, mesh, spec, check_vma=False)
  _close(f_ours(v, xs), f_theirs(v, xs), 1e-9)
  p = {"gamma": v["params"]["scale"], "beta": v["params"]["bias"]}
  _close(f_ours(v, xs), _per_group(p, x, np.ones(x.shape, bool), 2, STRIDED), 1e-9)
  grads = [jax.jit(jax.grad(lambda v, x, f=f: jnp.sum(jnp.sin(f(v, x))), argnums=(0, 1)))(v, xs)
           for f in (f_ours, f_theirs)]
  _close(grads[0], grads[1], 1e-9)
  # flax.nnx: the same through nnx.split/merge.
  outs = []
  for cls, check_vma in ((compat_nnx.GroupNorm, True), (nnx.GroupNorm, False)):
    graphdef, state = nnx.split(cls(8, 2, epsilon=1e-5, axis_name="s",
                                    axis_index_groups=STRIDED, param_dtype=jnp.float64,
                                    rngs=nnx.Rngs(0)))
    apply = lambda st, x, g=graphdef: nnx.merge(g, st)(x)  # noqa: E731
    outs.append(_sharded(apply, mesh, spec, check_vma)(state, xs))
  _close(outs[0], outs[1], 1e-9)


def check_gnorm_modules_axis_index_groups():
  mesh = _mesh()
  spec = P(None, "s")
  params, x, _ = _data(4)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  want = _per_group(params, x, np.ones(x.shape, bool), 2, BLOCKS)
  layer = gnorm.GroupNorm(2, axis_name="s", axis_index_groups=BLOCKS, param_dtype=jnp.float64)
  _close(_sharded(lambda p, x: layer.apply({"params": p}, x), mesh, spec)(params, xs), want)
  graphdef, state = nnx.split(gnorm.nnx.GroupNorm(
      2, 8, gamma=params["gamma"], beta=params["beta"], axis_name="s",
      axis_index_groups=[list(g) for g in BLOCKS], param_dtype=jnp.float64))
  apply = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
  _close(_sharded(apply, mesh, spec)(state, xs), want)


GROUP_CHECKS = {name: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}
