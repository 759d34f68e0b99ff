"""Multi-device checks, run by ``test_sharding.py`` in a subprocess.

The subprocess gets 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) so that the rest of
the suite keeps one device. Each ``check_*`` function raises on failure; the
script prints one JSON object mapping check names to ``"ok"`` or the error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm
from tests import multidevice_example
from tests import multidevice_groups
from tests.reference import naive_jnp

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all",
               "reduce-scatter")


def _mesh(shape=(2, 4), names=("b", "s")):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _data(shape, seed=0, loc=3.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 2 + loc
  c = shape[-1]
  params = {"gamma": rng.normal(size=c) + 1, "beta": rng.normal(size=c)}
  return x, params


def _close(a, b, tol=1e-10):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.max(np.abs(a - b))
  if not err <= tol:
    raise AssertionError(f"max abs difference {err} > {tol}")


def _collectives(hlo: str):
  return [c for c in COLLECTIVES if c in hlo]


def check_batch_sharding_compiles_without_collectives():
  mesh = _mesh()
  x, params = _data((8, 6, 6, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(("b", "s"))))
  f = jax.jit(lambda p, x: gnorm.group_norm(p, x, 4))
  hlo = f.lower(params, xs).compile().as_text()
  assert not _collectives(hlo), _collectives(hlo)
  def loss(p, x):
    return jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4)))

  # The input gradient needs no communication at all; the parameter gradient
  # sums over the batch, which needs all-reduces of (C,)-sized arrays only.
  hlo_x = jax.jit(jax.grad(loss, argnums=1)).lower(params, xs).compile().as_text()
  assert not _collectives(hlo_x), _collectives(hlo_x)
  hlo_p = jax.jit(jax.grad(loss, argnums=0)).lower(params, xs).compile().as_text()
  assert set(_collectives(hlo_p)) <= {"all-reduce"}, _collectives(hlo_p)
  for line in hlo_p.splitlines():
    if " all-reduce(" in line or " all-reduce-start(" in line:
      assert "[16]" in line.split("=")[1].split("all-reduce")[0], line
  _close(f(params, xs), naive_jnp(params, x, 4))


def check_spatial_sharding_under_jit_equals_unsharded():
  mesh = _mesh()
  x, params = _data((2, 16, 6, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, ("b", "s"))))
  y = jax.jit(lambda p, x: gnorm.group_norm(p, x, 4))(params, xs)
  _close(y, naive_jnp(params, x, 4))
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4))),
                       argnums=(0, 1)))(params, xs)
  g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(naive_jnp(p, x, 4))), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref),
                  strict=True):
    _close(a, b)


def _shard_map_case(spec, axis_name, n_groups, shape, mask=None, param_spec=None,
                    local_groups=None):
  param_spec = P() if param_spec is None else param_spec
  mesh = _mesh()
  x, params = _data(shape, seed=1)
  xs = jax.device_put(x, NamedSharding(mesh, spec))
  ps = jax.device_put(params, NamedSharding(mesh, param_spec))
  args, specs = (ps, xs), (param_spec, spec)
  if mask is not None:
    args += (jax.device_put(mask, NamedSharding(mesh, spec)),)
    specs += (spec,)

  def body(p, x, m=None):
    return gnorm.group_norm(p, x, local_groups or n_groups, mask=m,
                            axis_name=axis_name)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec))
  _close(f(*args), naive_jnp(params, x, n_groups, mask=mask))

  def loss_sharded(p, x, *m):
    return jnp.sum(jnp.sin(f(p, x, *m)))

  def loss_ref(p, x):
    return jnp.sum(jnp.sin(naive_jnp(p, x, n_groups, mask=mask)))

  g = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(*args)
  g_ref = jax.grad(loss_ref, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref),
                  strict=True):
    _close(a, b)


def check_shard_map_spatial_split_values_and_gradients():
  _shard_map_case(P("b", "s"), "s", 4, (4, 16, 6, 16))


def check_shard_map_split_over_two_axes():
  _shard_map_case(P(None, ("b", "s")), ("b", "s"), 2, (2, 16, 3, 8))


def check_shard_map_channel_split_within_a_group():
  # One group of 16 channels split over the 4 devices of "s": each shard
  # holds 4 channels of it (n_groups=1 per shard) and its slice of gamma/beta.
  _shard_map_case(P("b", None, None, "s"), "s", 1, (4, 5, 3, 16),
                  param_spec=P("s"))


def check_shard_map_masked_unequal_shards():
  # Sequences of different lengths padded to 16 and split 4 ways: the shards
  # hold different numbers of counted positions (some none at all).
  lengths = np.array([13, 3, 16, 6])
  mask = (np.arange(16)[None, :, None, None] < lengths[:, None, None, None])
  mask = np.broadcast_to(mask, (4, 16, 3, 1)).copy()
  _shard_map_case(P("b", "s"), "s", 2, (4, 16, 3, 8), mask=mask)


def check_all_options_compose_with_axis_name():
  # group_size + mask + fused activation + per-sample (N, C) gamma/beta, on
  # an input split spatially over 4 devices, against the unsplit float64
  # computation (values and gradients).
  mesh = _mesh()
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 16, 3, 8)) * 2 + 5
  lengths = np.array([11, 2, 16, 7])
  mask = np.broadcast_to(
      np.arange(16)[None, :, None, None] < lengths[:, None, None, None],
      (4, 16, 3, 1)).copy()
  params = {"gamma": rng.normal(size=(4, 8)) + 1, "beta": rng.normal(size=(4, 8))}

  def norm(p, x, m, axis_name=None):
    return gnorm.group_norm(p, x, group_size=4, mask=m, activation="silu",
                            axis_name=axis_name)

  spec = P("b", "s")
  sharded = jax.jit(jax.shard_map(
      lambda p, x, m: norm(p, x, m, axis_name="s"), mesh=mesh,
      in_specs=(P("b"), spec, spec), out_specs=spec))
  args = (jax.device_put(params, NamedSharding(mesh, P("b"))),
          jax.device_put(x, NamedSharding(mesh, spec)),
          jax.device_put(mask, NamedSharding(mesh, spec)))
  _close(sharded(*args), norm(params, x, mask))

  def loss(f):
    return lambda p, x, m: jnp.sum(jnp.where(m, f(p, x, m), 0.0) ** 2)

  g = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(*args)
  g_ref = jax.grad(loss(norm), argnums=(0, 1))(params, x, mask)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref),
                  strict=True):
    _close(a, b)


def check_nan_padding_with_axis_name_reaches_no_gradient():
  # Issue 12: NaN and Inf in the padding of unequal shards (one shard of
  # sample 1 counts nothing), all options on, float32: the gradients equal
  # those of zeros in the padding, within 1e-6.
  mesh = _mesh()
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(4, 16, 3, 8)) * 2 + 5).astype(np.float32)
  lengths = np.array([11, 2, 16, 7])
  mask = np.arange(16)[None, :, None, None] < lengths[:, None, None, None]  # (4, 16, 1, 1)
  params = {"gamma": (rng.normal(size=(4, 8)) + 1).astype(np.float32),
            "beta": rng.normal(size=(4, 8)).astype(np.float32)}
  ct = rng.normal(size=x.shape).astype(np.float32)
  spec = P("b", "s")
  sharded = jax.shard_map(
      lambda p, x, m: gnorm.group_norm(p, x, group_size=4, mask=m, activation="silu",
                                       axis_name="s"),
      mesh=mesh, in_specs=(P("b"), spec, spec), out_specs=spec)

  def loss(p, x, m):
    return jnp.sum(jnp.where(m, sharded(p, x, m), 0.0) * ct)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
  counted = np.broadcast_to(mask, x.shape)
  want = grad(put(params, P("b")), put(np.where(counted, x, 0), spec), put(mask, spec))
  for garbage in (np.nan, np.inf):
    dirty = np.where(counted, x, np.float32(garbage))
    got = grad(put(params, P("b")), put(dirty, spec), put(mask, spec))
    for k in ("gamma", "beta"):
      np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-6, atol=1e-6)
    gx, wx = np.asarray(got[1]), np.asarray(want[1])
    np.testing.assert_allclose(gx[counted], wx[counted], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(gx[~counted], 0.0)


def check_pmap_axis_name():
  # Split the spatial axis of a (2, 16, 8) input into 4 pieces of 4.
  x, params = _data((2, 16, 8))
  pieces = np.stack(np.split(x, 4, axis=1))  # (4, 2, 4, 8)
  y = jax.pmap(lambda x: gnorm.group_norm(params, x, 2, axis_name="d"),
               axis_name="d", devices=jax.devices()[:4])(pieces)
  _close(np.concatenate(list(np.asarray(y)), axis=1), naive_jnp(params, x, 2))


def _module_data(seed):
  """NHWC input, per-sample AdaGN scale/shift and layer values, float64."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 16, 3, 16)) * 2 + 3
  scale = 0.5 * rng.normal(size=(4, 16))
  shift = rng.normal(size=(4, 16))
  gamma, beta = rng.normal(size=16) + 1, rng.normal(size=16)
  return x, scale, shift, gamma, beta


def _module_case(apply, params, sharded_apply, x, scale, shift, mask=None):
  """Compares a module sharded over ("b", "s") with the unsharded one.

  ``apply(p, x, s, t, m)`` is the unsharded module, ``sharded_apply`` the same
  with ``axis_name="s"``; both as pure functions of the params pytree.
  """
  mesh = _mesh()
  spec = P("b", "s")  # the batch over "b", the first spatial axis over "s"
  m_spec = () if mask is None else (spec,)
  body = lambda p, x, s, t, *m: sharded_apply(p, x, s, t, *m)  # noqa: E731
  f = jax.jit(jax.shard_map(body, mesh=mesh,
                            in_specs=(P(), spec, P("b"), P("b")) + m_spec,
                            out_specs=spec))
  args = (params, x, scale, shift) + (() if mask is None else (mask,))
  sharded = (jax.device_put(params, NamedSharding(mesh, P())),
             jax.device_put(x, NamedSharding(mesh, spec)),
             jax.device_put(scale, NamedSharding(mesh, P("b"))),
             jax.device_put(shift, NamedSharding(mesh, P("b")))) + tuple(
                 jax.device_put(a, NamedSharding(mesh, spec)) for a in args[4:])
  _close(f(*sharded), jax.jit(apply)(*args))
  w = np.random.default_rng(7).normal(size=x.shape)
  loss_sharded = lambda *a: jnp.sum(jnp.sin(f(*a)) * w)  # noqa: E731
  loss_ref = lambda *a: jnp.sum(jnp.sin(apply(*a)) * w)  # noqa: E731
  argnums = (0, 1, 2, 3)  # params, x, scale, shift
  g = jax.jit(jax.grad(loss_sharded, argnums=argnums))(*sharded)
  g_ref = jax.jit(jax.grad(loss_ref, argnums=argnums))(*args)
  leaves, leaves_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
  assert len(leaves) == len(leaves_ref) == 5, (len(leaves), len(leaves_ref))
  for a, b in zip(leaves, leaves_ref, strict=True):
    _close(a, b)


def check_linen_module_axis_name_in_shard_map():
  x, scale, shift, gamma, beta = _module_data(2)
  kw = dict(group_size=4, activation="silu", gamma=gamma, beta=beta,
            param_dtype=jnp.float64)
  whole = gnorm.GroupNorm(**kw)
  layer = gnorm.GroupNorm(axis_name="s", **kw)
  params = whole.create_variables(x.shape)

  def apply(p, x, s, t):
    return whole.apply({"params": p}, x, scale=s, shift=t)

  def sharded_apply(p, x, s, t):
    return layer.apply({"params": p}, x, scale=s, shift=t)

  _module_case(apply, params, sharded_apply, x, scale, shift)


def check_nnx_module_axis_name_in_shard_map():
  x, scale, shift, gamma, beta = _module_data(3)
  # Padded rows, different per sample: the shards of "s" hold unequal counts.
  lengths = np.array([13, 3, 16, 6])
  mask = np.arange(16)[None, :, None, None] < lengths[:, None, None, None]
  mask = np.broadcast_to(mask, (4, 16, 3, 1)).copy()
  kw = dict(group_size=8, activation="gelu", gamma=gamma, beta=beta,
            param_dtype=jnp.float64)
  graphdef_whole, state = nnx.split(gnorm.nnx.GroupNorm(num_channels=16, **kw))
  graphdef, state_s = nnx.split(gnorm.nnx.GroupNorm(num_channels=16, axis_name="s",
                                                    **kw))
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(state_s)

  def apply(st, x, s, t, m):
    return nnx.merge(graphdef_whole, st)(x, mask=m, scale=s, shift=t)

  def sharded_apply(st, x, s, t, m):
    return nnx.merge(graphdef, st)(x, mask=m, scale=s, shift=t)

  _module_case(apply, state, sharded_apply, x, scale, shift, mask)


# axis_index_groups and the MNIST example: their checks live in their own
# modules, run here with the rest.
CHECKS = dict(sorted({**{name: fn for name, fn in globals().items() if name.startswith("check_")},
                      **multidevice_groups.GROUP_CHECKS,
                      **multidevice_example.EXAMPLE_CHECKS}.items()))


def run_checks(module: str) -> dict[str, str]:
  """Runs ``python -m module`` with 8 simulated CPU devices; its JSON result."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", module], cwd=Path(__file__).resolve().parent.parent,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
  return run_in_child(CHECKS)


def run_in_child(checks) -> int:
  """The child's side of ``run_checks``: every check of ``checks``, its
  result ("ok" or its traceback) printed as one JSON line."""
  # Set here, not at import: the tests import these modules for the check
  # names, and must not change the parent process's configuration.
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  for name, fn in checks.items():
    try:
      fn()
      results[name] = "ok"
    except Exception:  # noqa: BLE001 - reported to the parent test
      results[name] = traceback.format_exc()
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
