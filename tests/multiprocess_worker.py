"""One of the JAX processes of ``test_multiprocess.py``: 2 processes x 2 CPU
devices, ``jax.distributed`` on 127.0.0.1, gloo collectives.

``python -m tests.multiprocess_worker PROCESS_ID PORT`` joins the cluster,
runs every ``check_*`` on the global mesh of 4 devices and prints one JSON
object mapping check names to ``"ok"`` or the error. Every process holds the
whole data (drawn from one seed), loads its part onto its devices and
compares what it fetches back with a float64 run on one device.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

PROCESSES = 2
LOCAL_DEVICES = 2


def _start(process_id: int, port: int) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={LOCAL_DEVICES}")
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=PROCESSES, process_id=process_id,
                             initialization_timeout=120)
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")


def _checks():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gnorm
  from tests.multidevice_example import _mnist_example_modules
  from tests.reference import naive_jnp

  assert jax.process_count() == PROCESSES and jax.device_count() == PROCESSES * LOCAL_DEVICES
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 8, 4, 16)) * 2 + 3
  params = {"gamma": rng.normal(size=16) + 1, "beta": rng.normal(size=16)}
  w = np.sin(np.arange(x.size)).reshape(x.shape)

  def loss(norm):
    return lambda p, x: jnp.sum(jnp.sin(norm(p, x)) * w)

  ref = lambda p, x: naive_jnp(p, x, 4, activation="silu")  # noqa: E731
  y_ref = ref(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)

  def close(a, b, tol=1e-10, what=""):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
      u = multihost_utils.process_allgather(u, tiled=True) if isinstance(u, jax.Array) else u
      err = np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
      if not err <= tol:
        raise AssertionError(f"{what}: max abs difference {err} > {tol}")

  def local_rows(sharding, a):
    """The rows of ``a`` this process's devices hold (a contiguous block)."""
    idx = sharding.addressable_devices_indices_map(a.shape).values()
    lo = min(i[0].start or 0 for i in idx)
    hi = max(a.shape[0] if i[0].stop is None else i[0].stop for i in idx)
    return a[lo:hi]

  def global_array(sharding, a):
    if tuple(sharding.spec)[1:] == ():  # batch split: each process loads its rows
      return jax.make_array_from_process_local_data(sharding, local_rows(sharding, a), a.shape)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  norm = lambda p, x: gnorm.group_norm(p, x, 4, activation="silu")  # noqa: E731

  def check_explicit_mesh_batch_and_spatial_split():
    mesh = jax.make_mesh((4,), ("d",))  # Explicit axes, over jax.devices()
    for spec in (P("d"), P(None, "d"), P(None, None, None, "d")):
      with jax.set_mesh(mesh):
        xs = global_array(NamedSharding(mesh, spec), x)
        y = jax.jit(norm)(params, xs)
        g = jax.jit(jax.grad(loss(norm), argnums=(0, 1)))(params, xs)
      close(y, y_ref, what=f"{spec} forward")
      close(g, g_ref, what=f"{spec} gradients")

  def check_shard_map_axis_name_across_processes():
    # One image split along H over both processes: exact statistics.
    mesh = jax.make_mesh((4,), ("s",), axis_types=(AxisType.Auto,))
    body = lambda p, x: gnorm.group_norm(p, x, 4, activation="silu", axis_name="s")  # noqa: E731
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "s")),
                              out_specs=P(None, "s")))
    xs = global_array(NamedSharding(mesh, P(None, "s")), x)
    close(f(params, xs), y_ref, what="forward")
    close(jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, xs), g_ref, what="gradients")

  def check_shard_map_batch_split_without_axis_name():
    mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,))
    f = jax.jit(jax.shard_map(norm, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d")))
    xs = global_array(NamedSharding(mesh, P("d")), x)
    close(f(params, xs), y_ref, what="forward")
    close(jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, xs), g_ref, what="gradients")

  def check_mnist_example_trains_over_both_processes():
    # The example's float32 data-parallel mode on the global devices, 4
    # steps of 32, against the same steps on one device of this process.
    jax.config.update("jax_enable_x64", False)
    try:
      _, input_pipeline, train = _mnist_example_modules()
      data = input_pipeline.load_embedded()
      pick = np.random.default_rng(1)
      tr = pick.choice(len(data.train_labels), 128, replace=False)
      te = pick.choice(len(data.test_labels), 64, replace=False)
      small = input_pipeline.Dataset(data.train_images[tr], data.train_labels[tr],
                                     data.test_images[te], data.test_labels[te])
      config = train.Config(epochs=1, batch_size=32)
      quiet = dict(progress=False, log=lambda s: None)
      mesh = train.make_mesh()
      if mesh.size != 4:
        raise AssertionError(f"the example's mesh has {mesh.size} devices, expected 4")
      dp, h_dp = train.train(config, small, mesh=mesh, **quiet)
      with jax.default_device(jax.local_devices()[0]):
        one, h_one = train.train(config, small, **quiet)
      np.testing.assert_allclose(h_dp["train_loss"], h_one["train_loss"], rtol=1e-5)
      np.testing.assert_allclose(h_dp["test_loss"], h_one["test_loss"], rtol=1e-5)
      a, b = jax.device_get(dp.params), jax.device_get(one.params)
      scale = max(float(np.max(np.abs(p))) for p in jax.tree_util.tree_leaves(b))
      close(a, b, tol=1e-4 * scale, what="parameters")
    finally:
      jax.config.update("jax_enable_x64", True)

  return {name: fn for name, fn in sorted(locals().items()) if name.startswith("check_")}


def main() -> int:
  process_id, port = int(sys.argv[1]), int(sys.argv[2])
  _start(process_id, port)
  import jax

  results = {}
  for name, fn in _checks().items():
    try:
      fn()
      results[name] = "ok"
    except Exception:  # noqa: BLE001 - reported to the parent test
      results[name] = traceback.format_exc()
  print(json.dumps(results), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
