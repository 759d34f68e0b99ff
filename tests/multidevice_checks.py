"""Multi-device checks, run by ``test_sharding.py`` in a subprocess.

The subprocess gets 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) so that the rest of
the suite keeps one device. Each ``check_*`` function raises on failure; the
script prints one JSON object mapping check names to ``"ok"`` or the error.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all",
               "reduce-scatter")


def _mesh(shape=(2, 4), names=("b", "s")):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _naive(params, x, n_groups, mask=None, eps=1e-5):
  """Float64 plain-autodiff GroupNorm (channels last): the oracle."""
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, n_groups, c // n_groups)
  m = (jnp.ones(x.shape, bool) if mask is None
       else jnp.broadcast_to(mask, x.shape)).reshape(xg.shape)
  cnt = m.sum(axis=(1, 3), keepdims=True)
  mean = jnp.where(m, xg, 0).sum(axis=(1, 3), keepdims=True) / cnt
  var = (jnp.where(m, xg - mean, 0) ** 2).sum(axis=(1, 3), keepdims=True) / cnt
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape)
  b = (1,) * (x.ndim - 1) + (c,)
  return y * params["gamma"].reshape(b) + params["beta"].reshape(b)


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
  loss = lambda p, x: jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4)))
  # The parameter gradient sums over the batch, which needs exactly one
  # all-reduce of a (C,)-sized array; the input gradient needs nothing.
  hlo_x = jax.jit(jax.grad(loss, argnums=1)).lower(params, xs).compile().as_text()
  assert not _collectives(hlo_x), _collectives(hlo_x)
  _close(f(params, xs), _naive(params, x, 4))


def check_spatial_sharding_under_jit_equals_unsharded():
  mesh = _mesh()
  x, params = _data((2, 16, 6, 16))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, ("b", "s"))))
  y = jax.jit(lambda p, x: gnorm.group_norm(p, x, 4))(params, xs)
  _close(y, _naive(params, x, 4))
  g = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(gnorm.group_norm(p, x, 4))),
                       argnums=(0, 1)))(params, xs)
  g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(_naive(p, x, 4))), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    _close(a, b)


def _shard_map_case(spec, axis_name, n_groups, shape, mask=None, param_spec=P(),
                    local_groups=None):
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
  _close(f(*args), _naive(params, x, n_groups, mask))

  def loss_sharded(p, x, *m):
    return jnp.sum(jnp.sin(f(p, x, *m)))

  def loss_ref(p, x):
    return jnp.sum(jnp.sin(_naive(p, x, n_groups, mask)))

  g = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(*args)
  g_ref = jax.grad(loss_ref, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
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


def check_pmap_axis_name():
  # Split the spatial axis of a (2, 16, 8) input into 4 pieces of 4.
  x, params = _data((2, 16, 8))
  pieces = np.stack(np.split(x, 4, axis=1))  # (4, 2, 4, 8)
  y = jax.pmap(lambda x: gnorm.group_norm(params, x, 2, axis_name="d"),
               axis_name="d", devices=jax.devices()[:4])(pieces)
  _close(np.concatenate(list(np.asarray(y)), axis=1), _naive(params, x, 2))


CHECKS = {name: fn for name, fn in sorted(globals().items())
          if name.startswith("check_")}


def main() -> int:
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  for name, fn in CHECKS.items():
    try:
      fn()
      results[name] = "ok"
    except Exception:  # noqa: BLE001 - reported to the parent test
      results[name] = traceback.format_exc()
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
