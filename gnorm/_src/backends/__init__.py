"""Which platform gets which lowering choices: the tables, and the switch.

Two kinds of choices, both made when a program is lowered, never from
``jax.default_backend()`` (that would put one platform's choices into a
program lowered for another from a host of the first kind):

* ``PER_PLATFORM`` maps a platform to the ``Hints`` whose effect is lowered
  for that platform only; platforms not listed get ``DEFAULT``, the plain
  maths. The CPU's hooks are built on a primitive whose lowering is an
  optimization barrier on the CPU and the identity everywhere else
  (``barrier.py``), so one traced program serves every backend and the maths
  is traced once.
* ``PLAN_PER_PLATFORM`` maps a platform to a reduction plan other than
  ``"xla"`` (``maths.py``'s, steered by the hints above): CUDA and ROCm GPUs
  get ``"xla:gpu"`` (``xla_gpu.py`` for the statistics, ``xla_gpu_vjp.py``
  for the backward pass). The forward and the backward are primitives
  (``primitives.py``) lowered per platform, which trace only the plan of the
  platform being lowered.

``forced_plan`` (private: tests and benchmarks) makes every platform use one
plan, so that the GPU's plan is tested on the CPU and the previous GPU program
can be timed beside the new one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping

from jax import lax

from gnorm._src import maths
from gnorm._src.backends import xla_cpu
from gnorm._src.backends import xla_default
from gnorm._src.backends import xla_gpu
from gnorm._src.backends.hints import Hints

PER_PLATFORM: Mapping[str, Hints] = {
    "cpu": xla_cpu.HINTS,
}
DEFAULT: Hints = xla_default.HINTS

PLANS = ("xla", "xla:gpu")
PLAN_PER_PLATFORM: Mapping[str, str] = {
    "cuda": "xla:gpu",
    "rocm": "xla:gpu",
}
_forced: list[str] = []


def hints() -> Hints:
  """The platforms' hints as one ``Hints``: each is lowered for its own only."""
  entries = list(PER_PLATFORM.values())
  if len(entries) > 1:
    raise NotImplementedError("one platform entry today; chain their hooks to add another")
  return entries[0] if entries else DEFAULT


def per_platform(fn: Callable[..., object], *static) -> Callable[..., object]:
  """``fn(hints, *static, *args)`` -> ``g(*args)``, with each platform's hints.

  Args:
    fn: the maths, taking a ``Hints`` first.
    *static: hashable settings passed on as they are (such as a ``Config``).

  Returns:
    A function of ``args``, pytrees of arrays, that computes ``fn`` with the
    hints of whichever platform it is lowered for.
  """
  return functools.partial(fn, hints(), *static)


@contextlib.contextmanager
def forced_plan(name: str) -> Iterator[None]:
  """While tracing inside it, every platform uses reduction plan ``name``.

  Private, for tests and benchmarks: ``"xla:gpu"`` runs the GPU's plan on the
  CPU; ``"xla"`` gives a GPU the program it had before it got a plan of its
  own. A program traced inside keeps the plan after the block ends.
  """
  if name not in PLANS:
    raise ValueError(f"plan must be one of {PLANS}, got {name!r}")
  _forced.append(name)
  try:
    yield
  finally:
    _forced.pop()


def plan() -> str:
  """The forced plan, or ``"auto"`` (each platform its own)."""
  return _forced[-1] if _forced else "auto"


def forward(cfg: maths.Config) -> Callable:
  """``(x, gamma, beta, mask) -> (y, (count, mean, rstd))`` by each platform's
  plan, in plain JAX: for statistics across devices (``cfg.axis_name``),
  whose collectives a primitive's lowering cannot hold; every other call goes
  through ``primitives.forward_p``, which traces only one plan."""
  plans = {
      "xla": functools.partial(maths.forward, hints(), cfg),
      "xla:gpu": functools.partial(maths.forward, DEFAULT, cfg, plan=xla_gpu.moments),
  }
  if plan() != "auto":
    return plans[plan()]
  per = {platform: plans[name] for platform, name in PLAN_PER_PLATFORM.items()}
  return lambda *args: lax.platform_dependent(*args, **per, default=plans["xla"])
