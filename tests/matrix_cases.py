"""The cases of the test matrix: every input ``group_norm`` is tested on, written once.

``TABLES`` maps each check of ``tests/matrix.py`` (its test method's name) to its
cases. An implementation's file covers every case but those its ``LEAVE_OUT``
table names, each with its reason (``select``): by check, by tag (``Case.tags``),
by a (check, tag) pair, or by a predicate of the case.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tests.reference import group_norm_ref_full


@dataclasses.dataclass(frozen=True)
class Case:
  """One input: x of ``shape`` (with a leading vmapped axis of ``batch`` when
  non-zero), ``normal * scale + loc`` in ``dtype``, and the options."""

  shape: tuple[int, ...]
  n_groups: int
  channel_axis: int = -1
  dtype: str = "float32"
  loc: float = 0.0
  scale: float = 1.0
  # "channel" (C,), "sample" (N, C), "batched" (B, C) under vmap, "none" (None),
  # "empty" ({}), "gamma"/"beta" (one key), and forms validation normalises:
  # "seed" (x's rank), "rank" (both at x's rank), "mixed" (an array and a list), "scalar".
  affine: str = "channel"
  activation: str | None = None
  mask: str | None = None  # a name of MASKS
  eps: float = 1e-5
  data: str = "normal"  # or a name of DATA: a pattern written over the draws
  seed: int = 0
  bound: float = 1e-5  # absolute, before a half-precision output's rounding
  batch: int = 0

  @property
  def axis(self) -> int:
    return self.channel_axis % len(self.shape)

  @property
  def channels(self) -> int:
    return self.shape[self.axis]

  @property
  def full_shape(self) -> tuple[int, ...]:
    return ((self.batch,) if self.batch else ()) + self.shape

  @property
  def id(self) -> str:
    parts = ["x".join(map(str, self.shape))]
    if self.axis != len(self.shape) - 1:
      parts.append(f"c{self.axis}")
    parts.append(f"G{self.n_groups}")
    if self.dtype != "float32":
      parts.append(self.dtype)
    if self.loc:
      parts.append(f"loc{self.loc:g}")
    if self.scale != 1:
      parts.append(f"sd{self.scale:g}")
    parts += [p for p in (self.activation, self.mask and f"mask={self.mask}") if p]
    if self.affine != "channel":
      parts.append(f"affine={self.affine}")
    if self.eps != 1e-5:
      parts.append(f"eps={self.eps:g}")
    if self.data != "normal":
      parts.append(self.data)
    if self.batch:
      parts.append(f"vmap{self.batch}")
    return "-".join(parts)

  @property
  def program(self) -> Case:
    """The case without its data: what a traced program depends on."""
    return dataclasses.replace(self, loc=0.0, scale=1.0, seed=0, data="normal", bound=0.0)

  @property
  def middle(self) -> bool:
    """Spatial axes on both sides of the channel axis."""
    return math.prod(self.shape[1:self.axis]) > 1 and math.prod(self.shape[self.axis + 1:]) > 1

  @property
  def tags(self) -> frozenset[str]:
    tags = {self.id, self.dtype, f"affine={self.affine}"}
    tags |= {"mask"} if self.mask else set()
    tags |= {"middle"} if self.middle else set()
    tags |= {"x64"} if self.dtype == "float64" else set()
    tags |= {"int"} if not jnp.issubdtype(np_dtype(self.dtype), jnp.floating) else set()
    tags |= {"param_form"} if self.affine in ("seed", "rank", "mixed", "scalar", "empty") else set()
    tags |= {self.activation} if self.activation else set()
    return frozenset(tags)


def np_dtype(name: str):
  return jnp.bfloat16 if name == "bfloat16" else np.dtype(name)


# --- inputs ----------------------------------------------------------------


def _one_constant_group(x, case):
  # Sample 0, group 0 holds 0.1 (not exactly representable: its sum rounds).
  xl = np.moveaxis(x, case.axis, -1)
  xl[0, ..., : case.channels // case.n_groups] = 0.1


def _staircase(x, case):
  # Sample 0 constant at 0.1; sample 1: zeros, then a ramp along axis 1 in the
  # second half of the channels (one constant group next to an ordinary one).
  x[...] = 0
  x[0] = 0.1
  ramp = np.arange(x.shape[1], dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 2)))
  x[1, ..., case.channels // 2:] = ramp


def _nan_inf(x, case):
  x[0, 1, 2] = np.nan  # sample 0, group 1 (channels 2-3 of 8, G = 4)
  x[1, 0, 7] = np.inf  # sample 1, group 3


DATA = {"one_constant_group": _one_constant_group, "staircase": _staircase, "nan_inf": _nan_inf}


def x_of(case: Case, seed_offset: int = 0) -> np.ndarray:
  """x in the case's dtype (the reference reads the same values in float64)."""
  rng = np.random.default_rng(case.seed + seed_offset)
  dtype = np_dtype(case.dtype)
  if "int" in case.tags:
    high = 2 if case.dtype == "bool" else 100
    return rng.integers(0, high, size=case.full_shape).astype(dtype)
  x = rng.normal(size=case.full_shape) * case.scale + case.loc
  if case.data != "normal":
    DATA[case.data](x, case)
  if dtype == jnp.bfloat16:
    return np.asarray(jnp.asarray(x.astype(np.float32), dtype))
  return x.astype(dtype)


def params_of(case: Case):
  """``(params as passed, gamma, beta)``: gamma and beta in float64 as the
  reference takes them (``(C,)``, ``(N, C)``, ``(B, C)`` or None)."""
  rng = np.random.default_rng(case.seed + 1)
  c, n = case.channels, case.shape[0]
  pshape = {"sample": (n, c), "batched": (case.batch, c)}.get(case.affine, (c,))
  pdt = np.float64 if case.dtype == "float64" else np.float32
  gamma = rng.uniform(0.5, 1.5, size=pshape).astype(pdt)
  beta = rng.uniform(-1.0, 1.0, size=pshape).astype(pdt)
  seed_shape = [1] * len(case.shape)
  seed_shape[case.axis] = c
  forms = {  # built on demand: the reshapes hold for (C,) parameters only
      "none": lambda: (None, None, None),
      "empty": lambda: ({}, None, None),
      "gamma": lambda: ({"gamma": gamma}, gamma, None),
      "beta": lambda: ({"beta": beta}, None, beta),
      # beta without the leading 1: neupy's (C, 1, 1) for channels-first input
      "seed": lambda: ({"gamma": gamma.reshape(seed_shape), "beta": beta.reshape(seed_shape[1:])},
                       gamma, beta),
      "rank": lambda: ({"gamma": gamma.reshape(seed_shape), "beta": beta.reshape(seed_shape)},
                       gamma, beta),
      "mixed": lambda: ({"gamma": jnp.asarray(gamma), "beta": list(beta)}, gamma, beta),
      "scalar": lambda: ({"gamma": 2.0, "beta": -1.0}, np.full(c, 2.0), np.full(c, -1.0)),
  }
  params, g, b = forms.get(case.affine, lambda: ({"gamma": gamma, "beta": beta}, gamma, beta))()
  as64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
  return params, as64(g), as64(b)


def _sequence(case):
  n, length = case.shape[0], case.shape[1]
  lengths = np.linspace(length // 3, length, n).astype(int)
  return np.arange(length)[None, :, None] < lengths[:, None, None]


def _random(case, p=0.7):
  return np.random.default_rng(case.seed + 2).random(case.shape) < p


def _random_spatial(case):
  shape = list(case.shape)
  shape[case.axis] = 1
  return np.random.default_rng(case.seed + 2).random(shape) < 0.8


def _empty_sample(case):
  mask = np.ones(case.shape[:-1] + (1,), bool)
  mask[1] = False  # sample 1: nothing counted in any group
  return mask


def _rows4(case):
  shape = [1] * len(case.shape)
  shape[1] = case.shape[1]
  return (np.arange(case.shape[1]) < 4).reshape(shape)


MASKS = {"sequence": _sequence, "random": _random, "random_spatial": _random_spatial,
         "empty_sample": _empty_sample, "rows4": _rows4}


def mask_of(case: Case) -> np.ndarray | None:
  return None if case.mask is None else MASKS[case.mask](case)


def reference(case: Case, x, gamma, beta, mask=None):
  """The float64 NumPy reference of ``case`` on ``x`` (no vmapped axis)."""
  return group_norm_ref_full(np.asarray(x, np.float64), case.n_groups, gamma, beta, case.eps,
                             case.axis, mask=mask, activation=case.activation)


def group_view(a, case: Case) -> np.ndarray:
  """An x-shaped array as ``(N, S, G, C // G)`` in float64."""
  al = np.moveaxis(np.asarray(a, np.float64), case.axis, -1)
  return al.reshape(al.shape[0], -1, case.n_groups, case.channels // case.n_groups)


# --- the tables ----------------------------------------------------------------

# (shape, channel_axis, n_groups): ranks 2 to 5, channels last, first and in the
# middle, one group, C groups and between; then shapes whose GPU-plan partials
# hold R_MAX elements, or whose axis cannot be split (a prime length).
LAYOUTS = [
    ((4, 12), -1, 3), ((4, 12), 1, 12), ((3, 7, 16), -1, 4), ((3, 16, 7), 1, 8),
    ((2, 5, 6, 8), -1, 1), ((2, 5, 6, 8), -1, 4), ((2, 5, 6, 8), -1, 8), ((2, 8, 5, 6), 1, 2),
    ((2, 5, 8, 6), 2, 4), ((2, 3, 4, 5, 16), -1, 4), ((2, 16, 3, 4, 5), 1, 16),
    ((2, 64, 64, 32), -1, 8), ((1, 32, 48, 48), 1, 4), ((2, 40, 16, 96), 2, 4),
    ((2, 1031, 16), -1, 4),
]
SMALL_LAYOUTS = LAYOUTS[:11]


def _layouts(layouts, **kw):
  return [Case(shape, g, axis, **kw) for shape, axis, g in layouts]


# The Pallas kernels' tails: several row blocks with a partial last one
# (S > 512), several channel blocks (C > 128), odd C, G = 1 and G = C.
KERNEL_CASES = [
    Case((2, 7, 12), 3),
    Case((2, 12, 5, 3), 4, 1, activation="silu"),
    Case((3, 10), 10, activation="relu"),
    Case((2, 5, 5, 6), 1, activation="gelu"),
    Case((1, 600, 12), 4, activation="gelu_tanh"),
    Case((2, 3, 200), 8, affine="sample"),
    Case((1, 6, 700), 3, 1, activation="silu"),
    Case((2, 9, 9, 40), 8, dtype="bfloat16", activation="silu", affine="sample"),
    Case((2, 8, 4, 4), 2, 1, dtype="float16"),
]

VALUES = [
    *_layouts(LAYOUTS),
    *_layouts(LAYOUTS, loc=100.0, scale=3.0, seed=1, bound=1e-4),
    *_layouts(SMALL_LAYOUTS, dtype="float64", loc=50.0, seed=5, bound=1e-12),
    *_layouts(SMALL_LAYOUTS[::2], dtype="bfloat16", seed=4),
    *_layouts(SMALL_LAYOUTS[::2], dtype="float16", seed=4),
    Case((2, 32, 32, 64), 8, dtype="bfloat16", seed=2),
    Case((2, 32, 32, 64), 8, dtype="float16", seed=2),
    # x^2 ~ 9e4 overflows float16 (max 65504): the statistics must be float32.
    Case((2, 6, 6, 16), 4, dtype="float16", loc=300.0, scale=2.0, seed=3, bound=1e-4),
    *[Case((2, 5, 8), 2, dtype=d, affine="none", seed=6)
      for d in ("int32", "int8", "uint8", "bool")],
    # docs/accuracy.md's third row: zero one-pass variance in float32; gnorm is limited by the
    # rounding of the mean, about ulp(100) / std = 7.6e-6 / 0.01.
    Case((4, 16, 16, 32), 8, loc=100.0, scale=0.01, affine="none", seed=2, bound=2e-3),
    *KERNEL_CASES,
    Case((3, 50, 32), 4, loc=5.0, mask="sequence", seed=6),
    Case((2, 16, 16, 32), 8, loc=5.0, mask="random", activation="silu", seed=6),
    Case((2, 32, 10, 10), 4, 1, loc=5.0, mask="random_spatial", activation="gelu", seed=6),
    Case((2, 16, 16, 32), 8, loc=5.0, activation="relu", seed=6),
    Case((3, 8, 8, 16), 4, loc=5.0, activation="gelu_tanh", affine="sample", seed=6),
    *[Case((2, 4, 4, 8), 2, affine=a, seed=7, bound=2e-5 if a == "scalar" else 1e-5)
      for a in ("seed", "rank", "mixed", "gamma", "beta", "empty", "none", "scalar")],
    Case((2, 8, 3, 5), 4, 1, affine="seed", seed=8),
]

# Exact outputs where a group's variance is 0 (act(beta)) or nothing is counted (0).
CONSTANT_GROUPS = [
    Case((3, 6), 6, seed=9),  # every group is one number
    *[Case((2, 3, 3, 8), 4, loc=v, scale=0.0, seed=10) for v in (0.0, 7.25, -1e4)],
    Case((2, 6, 6, 8), 2, eps=0.0, affine="none", data="one_constant_group", seed=7),
    Case((2, 6, 6, 8), 2, eps=0.0, affine="none", data="one_constant_group", seed=7,
         mask="empty_sample"),
    Case((2, 5, 4), 2, eps=0.0, data="staircase"),
]

NAN_INF = [Case((2, 3, 8), 4, affine="none", data="nan_inf", seed=11)]

# G = 1 is flax's LayerNorm over all but the batch, G = C its InstanceNorm.
FLAX = [Case((3, 5, 6, 8), 1, loc=2.0, affine="none", seed=12),
        Case((3, 5, 6, 8), 8, loc=-3.0, affine="none", seed=13),
        Case((2, 5, 6, 16), 4, seed=14), Case((3, 7, 32), 8, seed=14)]

JIT = [Case((2, 4, 4, 16), 4, seed=15), Case((2, 8, 3, 3), 2, 1, seed=17)]

VMAP = [Case((2, 4, 4, 8), 4, seed=18, batch=5),
        Case((2, 6, 8), 2, affine="batched", seed=19, batch=3),
        Case((2, 5, 6), 3, activation="silu", seed=3, batch=2)]

# Per-example gradients: the primitives fold the vmapped axis into the samples.
FOLD = [Case((n, 6, 6, 16), 4, activation=act, affine=affine, mask=mask, seed=10, batch=4)
        for n in (1, 3) for mask in (None, "rows4") for affine in ("channel", "sample")
        for act in (None, "silu")] + [Case((2, 5, 6), 3, activation="silu", seed=3, batch=2)]

BATCHED_PARAMS = [Case((2, 5, 16), 4, activation=a, affine="batched", seed=13, batch=3)
                  for a in (None, "silu")]

JACOBIANS = [Case((2, 3, 8), 4, activation="silu", seed=11)]

# Float64, against plain autodiff of the formula.
DERIVATIVES = [
    Case((2, 3, 8), 4, loc=-2.0, seed=21), Case((2, 4, 3, 2), 2, 1, loc=-2.0, seed=21),
    Case((2, 4, 3, 2), 2, 1, loc=-2.0, activation="silu", seed=9),
    Case((3, 8), 2, loc=-2.0, affine="sample", seed=9),
    Case((2, 5, 6, 4), 3, 2, loc=-2.0, activation="gelu", affine="sample", seed=9),
    Case((1, 2, 6), 3, activation="silu", seed=3),
]
DERIVATIVES = [dataclasses.replace(c, dtype="float64") for c in DERIVATIVES]

CHECK_GRADS = [dataclasses.replace(c, dtype="float64") for c in [
    Case((2, 3, 8), 4, loc=1.0, seed=20), Case((2, 4, 3, 2), 2, 1, loc=1.0, seed=20),
    Case((3, 8), 2, loc=1.0, seed=20),
    Case((2, 4, 3, 2), 2, 1, loc=1.0, activation="silu", seed=8),
    Case((2, 5, 6, 4), 3, 2, loc=1.0, activation="gelu", affine="sample", seed=8),
    Case((2, 4, 6), 2, loc=2.0, activation="gelu", affine="sample", seed=5),
]]

# Reverse mode in the input's dtype against float64 autodiff.
VJP = [*KERNEL_CASES, Case((2, 6, 6, 16), 4, loc=100.0, scale=3.0, seed=23),
       Case((2, 32, 32, 32), 8, loc=100.0, scale=3.0, seed=12)]

RESIDUALS = [Case((2, 8, 8, 32), 8, dtype="bfloat16", activation=a, seed=24)
             for a in (None, "silu")]

TABLES = {
    "test_values": VALUES, "test_constant_groups": CONSTANT_GROUPS,
    "test_nan_and_inf_stay_in_their_group": NAN_INF, "test_equals_flax": FLAX,
    "test_jit": JIT, "test_vmap": VMAP, "test_vmap_of_grad_folds_the_batch": FOLD,
    "test_vmap_with_batched_parameters": BATCHED_PARAMS,
    "test_jacobians_batch_tangents_or_cotangents_only": JACOBIANS,
    "test_derivatives_match_plain_autodiff": DERIVATIVES,
    "test_check_grads_to_second_order": CHECK_GRADS, "test_vjp_in_the_input_dtype": VJP,
    "test_backward_keeps_only_x_and_statistics": RESIDUALS,
}
ALL_TAGS = frozenset().union(*(c.tags for cases in TABLES.values() for c in cases))
for _check, _cases in TABLES.items():
  assert len({c.id for c in _cases}) == len(_cases), f"{_check}: two cases share an id"


def left_out(check: str, case: Case, leave_out: dict) -> str | None:
  """The reason ``leave_out`` gives for leaving ``case`` of ``check`` out, or None."""
  for key, reason in leave_out.items():
    if callable(key):
      hit = key(case)
    elif isinstance(key, tuple):
      hit = key[0] == check and (key[1](case) if callable(key[1]) else key[1] in case.tags)
    else:
      hit = key == check or key in case.tags
    if hit:
      return reason
  return None


def check_leave_out(leave_out: dict, checks) -> None:
  """Every key names a check or a tag that exists (a typo leaves nothing out)."""
  for key in leave_out:
    names = key if isinstance(key, tuple) else (key,)
    for name in names:
      if isinstance(name, str):
        assert name in checks or name in ALL_TAGS, f"LEAVE_OUT names nothing: {name!r}"


def keep_only(check: str, *ids: str):
  """A ``LEAVE_OUT`` key: every case of ``check`` but those of ``ids``."""
  known = {c.id for c in TABLES[check]}
  assert set(ids) <= known, f"no such case of {check}: {set(ids) - known}"
  return (check, lambda case: case.id not in ids)


def select(check: str, leave_out: dict) -> dict[str, Case]:
  """The cases of ``check`` that an implementation covers, by id."""
  return {c.id: c for c in TABLES[check] if left_out(check, c, leave_out) is None}


def parametrize(check: str, leave_out: dict):
  """``pytest.mark.parametrize`` over the cases of ``check`` not left out."""
  chosen = select(check, leave_out)
  assert chosen, f"every case of {check} is left out: leave the check out instead"
  return pytest.mark.parametrize("case", list(chosen.values()), ids=list(chosen))
