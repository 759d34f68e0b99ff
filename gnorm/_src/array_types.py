"""The rest of an array's type: its mesh sharding and its varying manual axes.

JAX types an array by more than its shape and dtype: on a mesh with
``Explicit`` axes (``jax.make_mesh``'s default) by how it is sharded, and
inside ``shard_map`` by the manual axes along which its value varies. gnorm's
primitives compute their output types from ``x``'s (``like``), and
``group_norm`` prepares its operands so that those types are right:

* operands that vary along fewer manual axes than others are cast to vary
  along all of them (``lax.pcast``), as JAX's own operations do: a gradient
  then flows back through the cast's transpose, a sum over the devices, to
  an invariant parameter;
* on a mesh with explicit axes the computation runs with those axes made
  ``Auto`` (``jax.sharding.auto_axes``) and the output gets ``x``'s sharding:
  XLA partitions the reductions as it does on any mesh, and reshapes that
  merge a sharded axis need no sharding of their own.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec


def varying_axes(a) -> frozenset:
  """The manual mesh axes along which ``a``'s value varies (inside ``shard_map``)."""
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset() if mat is None else frozenset(mat.varying)


def match_varying(*arrays):
  """``arrays`` (``None`` kept) each made to vary along every manual axis that any varies along."""
  axes = frozenset().union(*(varying_axes(a) for a in arrays if a is not None))
  if not axes:
    return arrays
  return tuple(None if a is None else _vary(a, axes - varying_axes(a)) for a in arrays)


def _vary(a, axes: frozenset):
  if not axes:
    return a
  mesh_order = [n for n in jax.sharding.get_abstract_mesh().axis_names if n in axes]
  return lax.pcast(a, tuple(mesh_order), to="varying")


def _explicit_axes(x) -> bool:
  mesh = jax.typeof(x).sharding.mesh
  return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def on_auto_axes(fn: Callable[..., jax.Array], x) -> Callable[..., jax.Array]:
  """``fn``, run with the mesh's explicit axes made ``Auto`` when ``x`` is on such a mesh;
  its output gets ``x``'s sharding. Elsewhere ``fn`` itself."""
  if not _explicit_axes(x):
    return fn
  return jax.sharding.auto_axes(fn, out_sharding=jax.typeof(x).sharding)


def struct(shape: tuple[int, ...], dtype, like) -> jax.ShapeDtypeStruct:
  """A ``ShapeDtypeStruct`` varying along the manual axes ``like`` varies along (a kernel's
  output type: ``pallas_call`` asks for it under ``shard_map``)."""
  mat = getattr(jax.typeof(like), "manual_axis_type", None)
  if mat is None:
    return jax.ShapeDtypeStruct(shape, dtype)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def like(aval, shape: tuple[int, ...], dtype):
  """An abstract value of ``shape`` and ``dtype`` with ``aval``'s mesh and varying axes,
  replicated over the mesh's (``Auto`` or manual) axes."""
  sharding = aval.sharding.update(spec=PartitionSpec(*([None] * len(shape))))
  return aval.update(shape=tuple(shape), dtype=dtype, weak_type=False, sharding=sharding)
