"""Which implementation computes Group Normalization, on which platform.

Every implementation is an entry of ``IMPLEMENTATIONS``: a forward function
``(cfg, x, gamma, beta, mask) -> (y, (count, mean, rstd))`` and a cotangent
function ``(cfg, x, gamma, beta, mask, count, mean, rstd, ct) -> (dx, dgamma,
dbeta)``, ``None`` standing for an absent parameter, mask or count. Each
platform runs its ``DEFAULT`` for ``implementation="auto"`` (and ``"xla"``)
when a program is lowered for it (``primitives.py``), so one traced program
serves every backend. Adding an implementation is one entry here, its own
files under ``backends/`` and an entry of the test matrix.

``forced`` (private: tests and benchmarks) names the implementation that
``"auto"`` runs on every platform, such as the GPU plan on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Iterator
from typing import NamedTuple

from jax import lax

from gnorm._src import maths
from gnorm._src import tangent
from gnorm._src.backends import xla_gpu
from gnorm._src.backends import xla_gpu_vjp


class Implementation(NamedTuple):
  forward: Callable[..., tuple]
  cotangent: Callable[..., tuple]
  # Platforms it compiles for; elsewhere it runs with interpret=True (the
  # Pallas kernels in Pallas's interpreter). None: every platform.
  compiled_on: tuple[str, ...] | None = None


def _pallas(name: str) -> Callable[..., tuple]:
  def call(*args, **kwargs):
    from gnorm._src.backends import pallas  # noqa: PLC0415 - Triton loads on demand

    return getattr(pallas, name)(*args, **kwargs)

  return call


IMPLEMENTATIONS: dict[str, Implementation] = {
    # maths.py, steered for XLA:CPU; JAX's transpose of the tangent map.
    "xla": Implementation(maths.forward, tangent.cotangent),
    # Split reductions and a closed-form backward for XLA:GPU.
    "xla_gpu": Implementation(xla_gpu.forward, xla_gpu_vjp.cotangent),
    # Pallas kernels, compiled by Triton on CUDA.
    "pallas": Implementation(_pallas("forward"), _pallas("cotangent"), ("cuda",)),
}
# "auto" and "xla" on each platform (XLA's own plan there; everything else: "xla").
DEFAULT: dict[str, str] = {"cuda": "xla_gpu", "rocm": "xla_gpu"}

_forced: list[str] = []


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
  """While tracing inside it, ``implementation="auto"`` (and ``"xla"``) runs
  ``name`` on every platform. A program traced inside keeps it."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {name!r}")
  _forced.append(name)
  try:
    yield
  finally:
    _forced.pop()


def requested(implementation: str) -> str:
  """``implementation`` as validated, with a forced name in place of "auto"/"xla"."""
  return _forced[-1] if _forced and implementation in ("auto", "xla") else implementation


def choose(implementation: str, platform: str) -> str:
  """The entry of ``IMPLEMENTATIONS`` that runs ``implementation`` on ``platform``."""
  if implementation in ("auto", "xla"):
    return DEFAULT.get(platform, "xla")
  return implementation


def lowered(implementation: str, platform: str, which: str) -> Callable[..., tuple]:
  """The ``which`` ("forward" or "cotangent") function that ``platform`` lowers."""
  impl = IMPLEMENTATIONS[choose(implementation, platform)]
  fn = getattr(impl, which)
  if impl.compiled_on is not None:
    fn = functools.partial(fn, interpret=platform not in impl.compiled_on)
  return fn


def forward_across_devices(cfg: maths.Config, *args):
  """The forward with statistics across devices (``cfg.axis_name``), in plain
  JAX: a primitive's lowering cannot hold the collectives. Each platform's
  XLA implementation, through ``lax.platform_dependent``."""
  def run(name):
    return functools.partial(IMPLEMENTATIONS[name].forward, cfg)

  if cfg.implementation not in ("auto", "xla"):
    return run(cfg.implementation)(*args)
  per_platform = {platform: run(name) for platform, name in DEFAULT.items()}
  return lax.platform_dependent(*args, **per_platform, default=run("xla"))
