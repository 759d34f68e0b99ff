"""Which platform gets which lowering choices: the table, and the switch.

``PER_PLATFORM`` maps a JAX platform name to the ``Hints`` whose effect is
lowered for that platform only; platforms not listed get ``DEFAULT``, the
plain maths. The choice is made when a program is lowered, never from
``jax.default_backend()`` (that would put the CPU's hints into a program
lowered for a GPU from a CPU host): the CPU's hooks are built on a primitive
whose lowering is an optimization barrier on the CPU and the identity
everywhere else (``xla_cpu.cpu_barrier_p``). One jitted function therefore
serves every backend, a module exported for several platforms keeps each its
own choices, and the maths is traced once.

An entry for another platform must be built the same way (its hooks lowered
as the identity elsewhere), and ``_hints`` must then chain the entries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping

from gnorm._src.backends import xla_cpu
from gnorm._src.backends import xla_default
from gnorm._src.backends.hints import Hints

PER_PLATFORM: Mapping[str, Hints] = {
    "cpu": xla_cpu.HINTS,
}
DEFAULT: Hints = xla_default.HINTS


def _hints() -> Hints:
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
  return functools.partial(fn, _hints(), *static)
