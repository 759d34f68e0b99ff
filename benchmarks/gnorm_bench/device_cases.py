"""The GPU case set, the implementations, and the order in which a run measures them.

A run measures work items ``(case, implementation, direction)`` in a fixed order, the most
important comparisons first, so that a run stopped by its time budget has measured what
matters most (``plan``):

1. gnorm's default against ``flax.linen.GroupNorm``, every case: plain (bfloat16, then
   float32), then GroupNorm + SiLU;
2. ``gnorm_prev``, gnorm's previous GPU program (the plain-maths plan, ``"xla"``);
3. torch eager (contiguous NCHW and channels-last), gnorm's Pallas kernels, equinox, haiku;
4. ``torch.compile`` (Inductor), bfloat16 plain only, the cases of >= 8M elements first (the
   ones issue 20's target compares with).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .cases import Case

GROUPS = 32
# Stable Diffusion UNet and VAE GroupNorm shapes (NHWC), small to large; the last three
# are beyond an H200's L2 (50 MiB) in float32 and the ones issue 20's bandwidth targets
# (>= 16M elements) are about.
GPU_SHAPES = (
  (2, 64, 64, 320),
  (2, 32, 32, 640),
  (2, 16, 16, 1280),
  (8, 56, 56, 256),
  (16, 64, 64, 320),
  (32, 32, 32, 640),
  (1, 512, 512, 128),
)
QUICK_SHAPES = ((2, 8, 8, 64),)
DTYPES = ("bfloat16", "float32")
QUICK_DTYPES = ("bfloat16",)
ACTIVATIONS = (None, "silu")
DIRECTIONS = ("fwd", "fwdbwd")
# torch.compile is compared on these (issue 20: "faster than torch.compile on every case of
# >= 8M elements"); issue 20's bandwidth targets hold on tensors of >= 16M elements.
COMPILE_MIN_ELEMENTS = 8 * 2**20
BANDWIDTH_MIN_ELEMENTS = 16 * 2**20

JAX_IMPLS = ("gnorm", "gnorm_pallas", "gnorm_prev", "flax", "equinox", "haiku")
TORCH_IMPLS = ("torch_nchw", "torch_cl", "torch_compile")
ALL_IMPLS = JAX_IMPLS + TORCH_IMPLS
# The table columns' titles.
TITLES = {
  "gnorm": "gnorm",
  "gnorm_pallas": "gnorm pallas",
  "gnorm_prev": "gnorm prev",
  "flax": "flax",
  "equinox": "equinox",
  "haiku": "haiku",
  "torch_nchw": "torch NCHW",
  "torch_cl": "torch CL",
  "torch_compile": "torch.compile NCHW",
}
# Phases of a run, in order: (implementations, which cases).
PHASES = (
  (("gnorm", "flax"), "all"),
  (("gnorm_prev",), "all"),
  (("torch_nchw", "torch_cl"), "all"),
  (("gnorm_pallas",), "all"),
  (("equinox",), "all"),
  (("haiku",), "all"),
  (("torch_compile",), "compile"),
)


@dataclasses.dataclass(frozen=True)
class DeviceCase:
  """One shape, dtype and activation (None: plain GroupNorm; "silu": GroupNorm then SiLU)."""

  shape: tuple[int, ...]  # NHWC
  dtype: str
  activation: str | None = None
  groups: int = GROUPS

  @property
  def label(self) -> str:
    dt = {"bfloat16": "bf16", "float32": "f32"}.get(self.dtype, self.dtype)
    return "x".join(map(str, self.shape)) + f" {dt}" + (f" +{self.activation}" if
                                                        self.activation else "")

  @property
  def data_key(self) -> tuple:
    """Cases that share their data (the activation does not change the inputs)."""
    return (self.shape, self.dtype)

  @property
  def elements(self) -> int:
    return math.prod(self.shape)

  @property
  def x_bytes(self) -> int:
    return self.elements * np.dtype(_np_dtype(self.dtype)).itemsize

  def bench_case(self) -> Case:
    """The same shape as ``gnorm_bench.cases`` describes it (its data and reference)."""
    return Case(self.shape, self.groups, self.dtype)


def _np_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes

    return ml_dtypes.bfloat16
  return np.dtype(dtype)


def case_set(quick: bool) -> list[DeviceCase]:
  """Every case: plain before SiLU, bfloat16 before float32, small shapes first."""
  shapes, dtypes = (QUICK_SHAPES, QUICK_DTYPES) if quick else (GPU_SHAPES, DTYPES)
  return [DeviceCase(s, d, a) for a in ACTIVATIONS for d in dtypes for s in shapes]


def _phase_cases(cases: list[DeviceCase], which: str, quick: bool) -> list[DeviceCase]:
  if which == "all":
    return cases
  # torch.compile: bfloat16 plain; the large cases first (issue 20's comparison).
  bf16 = [c for c in cases if c.dtype == "bfloat16" and c.activation is None]
  if quick:
    return bf16
  big = [c for c in bf16 if c.elements >= COMPILE_MIN_ELEMENTS]
  return big + [c for c in bf16 if c.elements < COMPILE_MIN_ELEMENTS]


def plan(impls: list[str], quick: bool) -> list[tuple[DeviceCase, str, str]]:
  """The work items ``(case, implementation, direction)`` of ``impls``, in measuring order."""
  cases = case_set(quick)
  items = []
  for names, which in PHASES:
    for case in _phase_cases(cases, which, quick):
      for name in names:
        if name in impls:
          items += [(case, name, d) for d in DIRECTIONS]
  return items


def moves(direction: str) -> int:
  """x-sizes a pass must move at least: forward read x, write y; forward+backward also
  read x and dy, write dx (gamma, beta and the statistics are small)."""
  return {"fwd": 2, "fwdbwd": 5}[direction]
