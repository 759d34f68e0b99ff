"""Argument checks for ``group_norm``, all at trace time, all in Python.

Nothing here touches array values, so the checks cost nothing under ``jit``
and never force a host sync. Every message names the offending value and the
input shape so that the error can be acted on without a debugger.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PARAM_KEYS = ("gamma", "beta")


def _short(value: Any, limit: int = 80) -> str:
  """``repr(value)``, cut to ``limit`` characters: an error names the value
  it refuses without printing a whole array."""
  r = repr(value)
  return r if len(r) <= limit else r[: limit - 3] + "..."


def check_n_groups(n_groups: Any, shape: tuple[int, ...] | None = None, *,
                   what: str = "n_groups") -> int:
  """Returns a group count (or, with ``what="group_size"``, a group size) as
  an ``int``, or raises ``TypeError``/``ValueError``."""
  where = f"; input shape {shape}" if shape is not None else ""
  # bool is an int subclass, but GroupNorm(True) is a bug, not one group.
  if isinstance(n_groups, (bool, np.bool_)) or not isinstance(
      n_groups, (numbers.Integral, np.integer)):
    raise TypeError(
        f"{what} must be a positive int, got {n_groups!r} "
        f"(type {type(n_groups).__name__}){where}.")
  if n_groups <= 0:
    raise ValueError(f"{what} must be a positive int, got {n_groups!r}{where}.")
  return int(n_groups)


def check_eps(eps: Any, shape: tuple[int, ...] | None = None) -> float:
  """Returns ``eps`` as a Python float or raises."""
  where = f"; input shape {shape}" if shape is not None else ""
  if isinstance(eps, jax.core.Tracer):
    raise TypeError(
        "eps must be a concrete real number known at trace time, got a traced "
        f"value {eps!r}; pass it as a Python float (or mark it static){where}.")
  if isinstance(eps, (bool, np.bool_)) or not isinstance(
      eps, (numbers.Real, np.floating, np.integer)):
    if isinstance(eps, (np.ndarray, jax.Array)) and np.ndim(eps) == 0 and \
        np.issubdtype(np.asarray(eps).dtype, np.floating):
      eps = float(eps)
    else:
      raise TypeError(
          f"eps must be a real number, got {eps!r} (type {type(eps).__name__})"
          f"{where}.")
  eps = float(eps)
  if math.isnan(eps) or eps < 0 or math.isinf(eps):
    raise ValueError(f"eps must be a finite number >= 0, got {eps!r}{where}.")
  return eps


def as_input_array(x: Any) -> jax.Array:
  """Converts ``x`` to an array and checks its rank and dtype."""
  if not isinstance(x, jax.Array):
    try:
      x = jnp.asarray(x)
    except TypeError as e:
      dtype = getattr(x, "dtype", type(x).__name__)
      raise TypeError(
          f"x must be a numeric array, got {dtype} (shape "
          f"{np.shape(x)}): {e}") from None
  check_input(x)
  return x


def check_input(x: jax.Array) -> None:
  """Checks the rank and dtype of ``x`` (already converted to an array)."""
  if x.ndim < 2:
    raise ValueError(
        f"x must have rank >= 2 (batch axis first, then channels and any "
        f"spatial axes), got shape {x.shape} (rank {x.ndim}).")
  dt = x.dtype
  if jnp.issubdtype(dt, jnp.complexfloating):
    raise TypeError(
        f"x must be real; complex dtype {dt} is not supported (input shape "
        f"{x.shape}).")
  if not (jnp.issubdtype(dt, jnp.number) or dt == jnp.bool_):
    raise TypeError(f"x must be numeric, got dtype {dt} (input shape {x.shape}).")


def check_channel_axis(channel_axis: Any, shape: tuple[int | None, ...]) -> int:
  """Returns the channel axis as a positive int, never the batch axis 0."""
  ndim = len(shape)
  if isinstance(channel_axis, (bool, np.bool_)) or not isinstance(
      channel_axis, (numbers.Integral, np.integer)):
    raise TypeError(
        f"channel_axis must be an int, got {channel_axis!r} "
        f"(type {type(channel_axis).__name__}); input shape {shape}.")
  if not -ndim <= int(channel_axis) < ndim:
    raise ValueError(
        f"channel_axis {channel_axis} is out of range for an input of rank "
        f"{ndim} (shape {shape}); it must be in [{-ndim}, {ndim - 1}].")
  axis = int(channel_axis) % ndim
  if axis == 0:
    raise ValueError(
        f"channel_axis {channel_axis} is the batch axis 0 of the input of shape "
        f"{shape}; statistics are per sample, so the channels must be on "
        "another axis.")
  return axis


def check_groups_divide(n_groups: int, channels: int, shape) -> None:
  if channels % n_groups:
    raise ValueError(
        f"n_groups ({n_groups}) must divide the number of channels "
        f"({channels}); input shape {shape}.")


def split_params(params: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
  """Returns ``(gamma, beta)`` from ``params`` (each may be ``None``)."""
  if params is None:
    return None, None
  if not isinstance(params, Mapping):
    raise TypeError(
        "params must be a mapping such as {'gamma': ..., 'beta': ...} or None, "
        f"got {_short(params)} (type {type(params).__name__}); input shape {shape}.")
  unknown = sorted(str(k) for k in params if k not in PARAM_KEYS)
  if unknown:
    raise ValueError(
        f"params has unknown key(s) {unknown}; the accepted keys are "
        f"{list(PARAM_KEYS)} (neupy's names), either of which may be absent; "
        f"input shape {shape}.")
  return params.get("gamma"), params.get("beta")


def check_affine(name: str, value: Any, shape: tuple[int, ...],
                 channel_axis: int) -> jax.Array | None:
  """Converts gamma or beta to an array of shape ``(1, C)`` or ``(N, C)``.

  Accepted shapes: ``()`` (one value for every channel); ``(C,)`` (always
  read as per-channel, whatever the layout); ``(N, C)`` (per sample and
  channel, for conditioning such as AdaGN or FiLM) or ``(1, C)``, whatever
  the layout; or any shape that
  broadcasts against ``x`` with ``C`` or 1 on the channel axis, ``N`` or 1 on
  the batch axis and 1 elsewhere, such as neupy's ``(1, 1, 1, C)`` for NHWC
  input.
  """
  if value is None:
    return None
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(
        f"{name} must be an array or a number, got {_short(value)} (type "
        f"{type(value).__name__}: {e}); input shape {shape}.") from None
  if jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise TypeError(
        f"{name} must be real; got complex dtype {arr.dtype} ({name} shape "
        f"{arr.shape}, input shape {shape}).")
  if not (jnp.issubdtype(arr.dtype, jnp.number) or arr.dtype == jnp.bool_):
    raise TypeError(
        f"{name} must be numeric, got dtype {arr.dtype} ({name} shape {arr.shape}, "
        f"input shape {shape}).")
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    arr = arr.astype(jnp.float32)
  n, c = shape[0], shape[channel_axis]
  ndim = len(shape)
  if arr.ndim == 0:
    return jnp.broadcast_to(arr, (1, c))
  if arr.shape == (c,):
    return arr.reshape(1, c)
  if arr.ndim == 2 and arr.shape in ((n, c), (1, c)):
    return arr
  if arr.ndim <= ndim:
    # Right-align against x, as broadcasting does.
    full = (1,) * (ndim - arr.ndim) + arr.shape
    if all(d in ((1, c) if a == channel_axis else (1, n) if a == 0 else (1,))
           for a, d in enumerate(full)):
      rows, cols = full[0], full[channel_axis]
      t = jnp.moveaxis(arr.reshape(full), channel_axis, 1).reshape(rows, cols)
      return jnp.broadcast_to(t, (rows, c))
  raise ValueError(
      f"{name} has shape {arr.shape}, but the input of shape {shape} has {c} "
      f"channels on axis {channel_axis} and batch size {n}: {name} must be a "
      f"scalar, have shape ({c},) or ({n}, {c}) (per sample), or broadcast "
      f"against the input with {c} (or 1) on the channel axis, {n} (or 1) on "
      "the batch axis and 1 elsewhere.")


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """Checks that ``mask`` is boolean and broadcasts to ``shape``.

  Returns the mask with leading unit axes added to ``shape``'s rank, but not
  broadcast: a ``(N, L, 1)`` mask stays that small, and so does what the
  backward pass keeps of it.
  """
  if mask is None:
    return None
  try:
    m = jnp.asarray(mask)
  except TypeError as e:
    raise TypeError(
        f"mask must be a boolean array, got {type(mask).__name__} ({e}); "
        f"input shape {shape}.") from None
  if m.dtype != jnp.bool_:
    raise TypeError(
        f"mask must be a boolean array (True = counted in the statistics), got "
        f"dtype {m.dtype} (mask shape {m.shape}, input shape {shape}); use "
        "mask.astype(bool) if that is what you mean.")
  try:
    ok = jnp.broadcast_shapes(m.shape, shape) == tuple(shape)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"mask of shape {m.shape} does not broadcast to the input shape {shape}.")
  return m.reshape((1,) * (len(shape) - m.ndim) + m.shape)


def check_groups(n_groups: Any, group_size: Any, shape: tuple[int, ...],
                 channel_axis: int) -> int:
  """Resolves ``n_groups`` / ``group_size`` (exactly one given) to n_groups."""
  c = shape[channel_axis]
  if (n_groups is None) == (group_size is None):
    raise ValueError(
        "give exactly one of n_groups and group_size, got n_groups="
        f"{n_groups!r} and group_size={group_size!r}; input shape {shape}.")
  if group_size is not None:
    group_size = check_n_groups(group_size, shape, what="group_size")
    if c % group_size:
      raise ValueError(
          f"group_size ({group_size}) must divide the number of channels ({c}); "
          f"input shape {shape}.")
    return c // int(group_size)
  n_groups = check_n_groups(n_groups, shape)
  check_groups_divide(n_groups, c, shape)
  return n_groups


def check_activation(activation: Any,
                     activations: Mapping[str, Callable[[jax.Array], jax.Array]],
                     shape: tuple[int, ...] | None = None
                     ) -> Callable[[jax.Array], jax.Array] | None:
  """Resolves ``activation`` (None, a known name or a callable)."""
  where = f"; input shape {shape}" if shape is not None else ""
  if activation is None or callable(activation):
    return activation
  if isinstance(activation, str):
    try:
      return activations[activation.lower()]
    except KeyError:
      raise ValueError(
          f"unknown activation {activation!r}; use one of "
          f"{sorted(activations)} or a callable{where}.") from None
  raise TypeError(
      f"activation must be None, a name such as 'silu', or a callable, got "
      f"{_short(activation)} (type {type(activation).__name__}){where}.")


def check_axis_name(axis_name: Any, shape: tuple[int, ...] | None = None):
  """``axis_name`` is None, a hashable name, or a tuple of them."""
  where = f"; input shape {shape}" if shape is not None else ""
  if axis_name is None:
    return None
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  try:
    hash(axis_name)
  except TypeError:
    raise TypeError(
        f"axis_name must be a mesh axis name or a tuple of them, got "
        f"{_short(axis_name)}{where}.") from None
  return axis_name


def check_axis_index_groups(groups: Any, axis_name: Any,
                            shape: tuple[int, ...] | None = None
                            ) -> tuple[tuple[int, ...], ...] | None:
  """``axis_index_groups`` as a tuple of tuples of ints (hashable), or None.

  As in ``lax.psum``: groups of indices along ``axis_name``, each index in
  exactly one group, all groups of one size (``lax.all_gather`` needs that).
  Only meaningful with ``axis_name``.
  """
  where = f"; input shape {shape}" if shape is not None else ""
  if groups is None:
    return None
  if axis_name is None:
    raise ValueError(
        f"axis_index_groups={_short(groups)} needs axis_name: the groups are indices "
        f"along that mesh axis{where}.")

  def ints(g: Any) -> bool:
    return (isinstance(g, (Sequence, np.ndarray)) and not isinstance(g, (str, bytes))
            and all(isinstance(i, (numbers.Integral, np.integer))
                    and not isinstance(i, (bool, np.bool_)) for i in g))

  if (not isinstance(groups, (Sequence, np.ndarray)) or isinstance(groups, (str, bytes))
      or not all(ints(g) for g in groups)):
    raise TypeError(
        "axis_index_groups must be a sequence of sequences of ints, such as "
        f"((0, 1), (2, 3)), got {_short(groups)}{where}.")
  out = tuple(tuple(int(i) for i in g) for g in groups)
  flat = sorted(i for g in out for i in g)
  if not out or not out[0] or len({len(g) for g in out}) != 1 or flat != list(range(len(flat))):
    raise ValueError(
        f"axis_index_groups={_short(groups)} must be non-empty groups of one size that "
        f"hold each index 0, 1, ..., n-1 of axis {axis_name!r} exactly once{where}.")
  return out


def check_groups_cover_axis(groups: tuple[tuple[int, ...], ...] | None, axis_name: Any,
                            shape: tuple[int, ...]) -> None:
  """The groups name every index of ``axis_name``, whose size is known while
  tracing inside ``shard_map``/``pmap`` (XLA would fail with an internal error)."""
  if groups is None:
    return
  size = jax.lax.axis_size(axis_name)
  n = sum(len(g) for g in groups)
  if n != size:
    raise ValueError(
        f"axis_index_groups={_short(groups)} hold {n} indices, but axis {axis_name!r} "
        f"has {size}: the groups must hold each of its indices exactly once; input "
        f"shape {shape}.")


IMPLEMENTATIONS = ("auto", "xla", "pallas")


def check_implementation_name(implementation: Any, shape: tuple[int, ...] | None = None) -> None:
  """``implementation`` is one of ``IMPLEMENTATIONS``."""
  if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
    where = f"; input shape {shape}" if shape is not None else ""
    raise ValueError(
        f"implementation must be one of {list(IMPLEMENTATIONS)}, got "
        f"{_short(implementation)}{where}.")


def check_implementation(implementation: Any, cfg, shape: tuple[int, ...],
                         has_mask: bool) -> str:
  """``implementation``, checked: ``"pallas"`` raises, naming the reason,
  where the kernels cannot run; ``"auto"`` and ``"xla"`` run everywhere."""
  check_implementation_name(implementation, shape)
  if implementation == "pallas":
    check_pallas(cfg, shape, has_mask)
  return implementation


def check_pallas(cfg, shape: tuple[int, ...], has_mask: bool) -> None:
  """Raises a ``ValueError`` naming why the Pallas kernels cannot run this call."""
  from gnorm._src.backends import pallas_support  # noqa: PLC0415 - probes Pallas on first use

  missing = pallas_support.why_unavailable()
  if missing is not None:
    raise ValueError(f"{pallas_support.unavailable_message(missing)} Input shape {shape}.")
  why = pallas_support.unsupported(cfg, shape, has_mask)
  if why is not None:
    raise ValueError(
        f"implementation='pallas' does not support {why}; input shape {shape}. "
        "Use implementation='auto' or 'xla' (the XLA path covers every option).")
  pallas_support.check_index_range(shape, "x")
