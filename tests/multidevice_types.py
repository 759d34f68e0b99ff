"""Sharding in types: gnorm on meshes with Explicit axes and in ``shard_map``
without ``axis_name``, on 8 simulated CPU devices (run by ``test_array_types.py``
in a subprocess, float64).

JAX types an array by its sharding on a mesh with Explicit axes
(``jax.make_mesh``'s default) and by its varying manual axes inside
``shard_map``; its checks must see in gnorm's outputs and cotangents the types
plain ``jnp`` code would have. Each ``check_*`` raises on failure; every
implementation that runs on the CPU is checked where it applies (the GPU plan
forced on the CPU, the Pallas kernels in Pallas's interpreter), values and
gradients against plain float64 autodiff (``reference.naive_jnp``).
"""

from __future__ import annotations

import contextlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm
from gnorm._src import dispatch
from gnorm.compat import linen as compat_linen
from tests import multidevice_checks
from tests.reference import naive_jnp

COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all",
               "reduce-scatter")
# x is (8, 8, 4, 16): each layout splits one axis (or two, on the 2-D mesh) evenly.
LAYOUTS = {
    "batch": P("d"),
    "H": P(None, "d"),
    "W": P(None, None, "d"),
    "C": P(None, None, None, "d"),
}
SHAPE = (8, 8, 4, 16)


@contextlib.contextmanager
def _implementation(name):
  """``implementation="auto"`` running ``name`` (``dispatch.forced``)."""
  with dispatch.forced(name):
    yield "auto"


def _data(shape=SHAPE, seed=0, per_sample=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 2 + 3
  pshape = (shape[0], shape[-1]) if per_sample else (shape[-1],)
  params = {"gamma": rng.normal(size=pshape) + 1, "beta": rng.normal(size=pshape)}
  return x, params


def _close(a, b, tol=1e-10, what=""):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    err = np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))
    if not err <= tol:
      raise AssertionError(f"{what}: max abs difference {err} > {tol}")


def _spec_of(a):
  return tuple(jax.typeof(a).sharding.spec)


def _loss(norm):
  w = np.sin(np.arange(np.prod(SHAPE))).reshape(SHAPE)
  return lambda p, x, *m: jnp.sum(jnp.sin(norm(p, x, *m)) * w)


def _explicit_mesh(shape=(4,), names=("d",)):
  return jax.make_mesh(shape, names)  # JAX's default: every axis Explicit


def _auto_mesh(shape=(4,), names=("d",)):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _layouts_case(mesh, layouts, explicit: bool):
  x, params = _data()
  ref = lambda p, x: naive_jnp(p, x, 4, activation="silu")  # noqa: E731
  g_ref = jax.grad(_loss(ref), argnums=(0, 1))(params, x)
  for impl_name in ("xla", "xla_gpu", "pallas"):
    for layout, spec in layouts.items():
      what = f"{impl_name}, {layout} split"
      with _implementation(impl_name) as impl, jax.set_mesh(mesh):
        f = lambda p, x, impl=impl: gnorm.group_norm(p, x, 4, activation="silu",  # noqa: E731
                                                     implementation=impl)
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        y = jax.jit(f)(params, xs)
        g = jax.jit(jax.grad(_loss(f), argnums=(0, 1)))(params, xs)
      _close(y, ref(params, x), what=what + " forward")
      _close(g, g_ref, what=what + " gradients")
      if explicit:  # the output and x's cotangent typed as x is
        for name, a in (("y", y), ("dx", g[1])):
          if _spec_of(a) != _spec_of(xs):
            raise AssertionError(f"{what}: {name} typed {jax.typeof(a)}, x {jax.typeof(xs)}")


def check_explicit_mesh_every_layout_and_implementation():
  _layouts_case(_explicit_mesh(), LAYOUTS, explicit=True)


def check_explicit_2d_mesh_batch_and_spatial():
  mesh = _explicit_mesh((2, 4), ("b", "d"))
  _layouts_case(mesh, {"batch+H": P("b", "d"), "H+C": P(None, "b", None, "d")}, explicit=True)


def check_auto_mesh_every_layout_and_implementation():
  _layouts_case(_auto_mesh(), LAYOUTS, explicit=False)


def check_explicit_mesh_mask_and_per_sample_affine():
  # AdaGN conditioning sharded with the batch, padded rows sharded like x.
  mesh = _explicit_mesh()
  x, params = _data(per_sample=True, seed=1)
  mask = np.broadcast_to(np.arange(8)[None, :, None, None] < np.array([8, 3, 5, 1, 8, 2, 7, 4])
                         [:, None, None, None], (8, 8, 4, 1)).copy()
  ref = lambda p, x, m: naive_jnp(p, x, 4, activation="gelu", mask=m)  # noqa: E731
  g_ref = jax.grad(_loss(ref), argnums=(0, 1))(params, x, mask)
  for impl_name in ("xla", "xla_gpu"):  # the kernels take no mask
    for layout in ("batch", "H"):
      spec = LAYOUTS[layout]
      with _implementation(impl_name), jax.set_mesh(mesh):
        f = lambda p, x, m: gnorm.group_norm(p, x, 4, activation="gelu", mask=m)  # noqa: E731
        args = (jax.device_put(params, NamedSharding(mesh, P("d"))),
                jax.device_put(x, NamedSharding(mesh, spec)),
                jax.device_put(mask, NamedSharding(mesh, spec)))
        y = jax.jit(f)(*args)
        g = jax.jit(jax.grad(_loss(f), argnums=(0, 1)))(*args)
      what = f"{impl_name}, {layout} split, mask"
      _close(y, ref(params, x, mask), what=what + " forward")
      _close(g, g_ref, what=what + " gradients")


def check_explicit_mesh_forward_mode_and_second_order():
  mesh = _explicit_mesh()
  x, params = _data(seed=2)
  t = np.cos(np.arange(x.size)).reshape(x.shape)
  for impl_name in ("xla", "xla_gpu"):
    with _implementation(impl_name), jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P("d")))
      ts = jax.device_put(t, NamedSharding(mesh, P("d")))
      f = lambda x: gnorm.group_norm(params, x, 4, activation="silu")  # noqa: E731
      _, ty = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(xs, ts)
      hvp = jax.jit(lambda x, t: jax.jvp(jax.grad(_loss(lambda p, x: f(x))), (params, x),
                                         (jax.tree.map(jnp.zeros_like, params), t))[1])(xs, ts)
    ref = lambda x: naive_jnp(params, x, 4, activation="silu")  # noqa: E731
    _close(ty, jax.jvp(ref, (x,), (t,))[1], what=f"{impl_name} jvp")
    hvp_ref = jax.jvp(jax.grad(_loss(lambda p, x: ref(x))), (params, x),
                      (jax.tree.map(jnp.zeros_like, params), t))[1]
    _close(hvp, hvp_ref, tol=1e-9, what=f"{impl_name} Hessian-vector product")


def check_explicit_batch_sharding_needs_no_collectives():
  # As on an Auto mesh: the forward and x's gradient are per sample; the
  # parameter gradient sums over the batch with (C,)-sized all-reduces only.
  mesh = _explicit_mesh()
  x, params = _data()
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    f = lambda p, x: gnorm.group_norm(p, x, 4)  # noqa: E731
    loss = lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
    fwd = jax.jit(f).lower(params, xs).compile().as_text()
    dx = jax.jit(jax.grad(loss, argnums=1)).lower(params, xs).compile().as_text()
    dp = jax.jit(jax.grad(loss, argnums=0)).lower(params, xs).compile().as_text()
  for name, hlo in (("forward", fwd), ("x's gradient", dx)):
    found = [c for c in COLLECTIVES if c in hlo]
    if found:
      raise AssertionError(f"{name} has collectives {found}")
  if {c for c in COLLECTIVES if c in dp} != {"all-reduce"}:
    raise AssertionError(f"parameter gradient: {[c for c in COLLECTIVES if c in dp]}")


def _shard_map_case(impl_name, check_vma=True, per_sample=False):
  mesh = _auto_mesh()
  x, params = _data(per_sample=per_sample, seed=3)
  pspec = P("d") if per_sample else P()
  with _implementation(impl_name) as impl:
    body = lambda p, x: gnorm.group_norm(p, x, 4, activation="silu",  # noqa: E731
                                         implementation=impl)
    f = jax.shard_map(body, mesh=mesh, in_specs=(pspec, P("d")), out_specs=P("d"),
                      check_vma=check_vma)
    y = jax.jit(f)(params, x)
    g = jax.jit(jax.grad(_loss(f), argnums=(0, 1)))(params, x)
  ref = lambda p, x: naive_jnp(p, x, 4, activation="silu")  # noqa: E731
  what = f"{impl_name}, check_vma={check_vma}, per_sample={per_sample}"
  _close(y, ref(params, x), what=what + " forward")
  # Shared parameters: their gradient sums every device's part (a 4x error
  # if the sum were lost, 1/4 if counted per device).
  _close(g, jax.grad(_loss(ref), argnums=(0, 1))(params, x), what=what + " gradients")


def check_shard_map_batch_split_without_axis_name():
  for impl_name in ("xla", "xla_gpu"):
    for per_sample in (False, True):
      _shard_map_case(impl_name, per_sample=per_sample)
  # Pallas's interpreter pads its blocks with a value that does not vary
  # along the manual axes, which JAX's check_vma rejects (jax 0.10: "Primitive
  # pad requires varying manual axes to match"); its values are checked with
  # check_vma off, and the CUDA lowering with it on.
  _shard_map_case("pallas", check_vma=False)


def check_shard_map_pallas_lowers_for_cuda_with_check_vma():
  mesh = _auto_mesh()
  params = {"gamma": jax.ShapeDtypeStruct((64,), jnp.float32),
            "beta": jax.ShapeDtypeStruct((64,), jnp.float32)}
  x = jax.ShapeDtypeStruct((8, 16, 16, 64), jnp.bfloat16)
  body = lambda p, x: gnorm.group_norm(p, x, 32, activation="silu",  # noqa: E731
                                       implementation="pallas")
  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))
  step = jax.grad(lambda p, x: jnp.sum(f(p, x).astype(jnp.float32)), argnums=(0, 1))
  text = jax.jit(step).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
  kernels = text.count("xla.gpu.triton")
  if kernels != 6:  # forward 3, backward 3
    raise AssertionError(f"{kernels} Triton kernels in the training step, expected 6")
  if text.count("all_reduce") != 2:  # the shared gamma's and beta's gradients
    raise AssertionError(f"{text.count('all_reduce')} all-reduces, expected 2")


def check_shard_map_replicated_output_rejected_as_for_jnp():
  # A per-device output declared replicated: JAX rejects it for plain jnp
  # code, and must for gnorm's output too (it varies along "d").
  mesh = _auto_mesh()
  x, params = _data()
  errors = []
  for body in (lambda p, x: x * jnp.reshape(p["gamma"], (1, 1, 1, -1)), lambda p, x: gnorm.group_norm(p, x, 4)):
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
    try:
      jax.jit(f)(params, x)
    except ValueError as e:
      errors.append(str(e))
    else:
      errors.append(None)
  if errors[0] is None or "require replication" not in errors[0]:
    raise AssertionError(f"jnp code was not rejected as expected: {errors[0]}")
  if errors[1] is None or "require replication" not in errors[1]:
    raise AssertionError(f"gnorm's per-device output was accepted as replicated: {errors[1]}")


class _CNN(nn.Module):
  norm: type

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (3, 3), param_dtype=jnp.float64)(x)
    x = nn.silu(self.norm(num_groups=4, param_dtype=jnp.float64)(x))
    return nn.Dense(10, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


def check_explicit_mesh_data_parallel_optax_steps_equal_flax():
  # The same network with flax's GroupNorm and with gnorm's drop-in (same
  # parameter names): three adam steps on a batch-sharded Explicit mesh.
  mesh = _explicit_mesh()
  rng = np.random.default_rng(4)
  images = rng.normal(size=(8, 8, 8, 3)) + 1
  labels = rng.integers(0, 10, size=8)
  results = {}
  for name, norm in (("flax", nn.GroupNorm), ("gnorm", compat_linen.GroupNorm)):
    model = _CNN(norm)
    params = model.init(jax.random.key(0), images[:1])["params"]
    opt = optax.adam(1e-2)

    def step(params, opt_state, x, y, model=model, opt=opt):
      def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = opt.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state, value

    with jax.set_mesh(mesh):
      params = jax.device_put(params, NamedSharding(mesh, P()))
      opt_state = opt.init(params)
      x = jax.device_put(images, NamedSharding(mesh, P("d")))
      y = jax.device_put(labels, NamedSharding(mesh, P("d")))
      losses = []
      for _ in range(3):
        params, opt_state, value = jax.jit(step)(params, opt_state, x, y)
        losses.append(float(value))
    results[name] = (params, losses)
  _close(results["gnorm"][1], results["flax"][1], tol=1e-10, what="losses")
  _close(results["gnorm"][0], results["flax"][0], tol=1e-9, what="parameters")


CHECKS = {name: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


def main() -> int:
  return multidevice_checks.run_in_child(CHECKS)


if __name__ == "__main__":
  sys.exit(main())
