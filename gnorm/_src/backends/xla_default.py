"""XLA on GPU, TPU and any platform without its own entry: the plain maths.

Every hook is the identity, so XLA sees the maths exactly as written and is
free to fuse the statistics and the output as its GPU and TPU pipelines see
fit. The XLA:CPU hints (``xla_cpu.py``) were measured on a CPU only: carrying
them here would pin a schedule that nobody has measured on these platforms.
Replace a hook here only with a measurement on that platform beside it.
"""

from __future__ import annotations

from jax import lax

from gnorm._src.backends.hints import Hints


def _separate(*arrays):
  return arrays


def _fence(t):
  return t


HINTS = Hints(name="xla", separate=_separate, fence=_fence, rsqrt=lax.rsqrt)
