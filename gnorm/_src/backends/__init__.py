"""Which platform gets which lowering choices: the table, and the switch.

``PER_PLATFORM`` maps a JAX platform name to the ``Hints`` used when a program
is lowered for it; platforms not listed get ``DEFAULT``. ``per_platform``
makes one function of the maths into a program that carries every entry and
keeps, at lowering time, only the one for the platform it is compiled for
(``jax.lax.platform_dependent``). One jitted function therefore serves every
backend, and a module exported for several platforms keeps each its own
choices. The choice is never made from ``jax.default_backend()``: that would
put the CPU's hints into a program lowered for a GPU from a CPU host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping

from jax import lax

from gnorm._src.backends import xla_cpu
from gnorm._src.backends import xla_default
from gnorm._src.backends.hints import Hints

PER_PLATFORM: Mapping[str, Hints] = {
    "cpu": xla_cpu.HINTS,
}
DEFAULT: Hints = xla_default.HINTS


def per_platform(fn: Callable[..., object], *static) -> Callable[..., object]:
  """``fn(hints, *static, *args)`` -> ``g(*args)``, with each platform's hints.

  Args:
    fn: the maths, taking a ``Hints`` first.
    *static: hashable settings passed on as they are (such as a ``Config``).

  Returns:
    A function of ``args``, pytrees of arrays, that computes ``fn`` with the
    hints of whichever platform it is lowered for.
  """

  def call(*args):
    branches = {p: functools.partial(fn, h, *static) for p, h in PER_PLATFORM.items()}
    return lax.platform_dependent(
        *args, **branches, default=functools.partial(fn, DEFAULT, *static))

  return call
