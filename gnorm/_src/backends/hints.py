"""The interface between gnorm's maths and one platform's compiler.

The maths (``maths.py``) and its derivative (``derivative.py``) are written
once. Where a compiler needs steering to turn that maths into fast code, they
call one of the three hooks below instead of a JAX primitive; each platform
supplies its own ``Hints`` (``xla_cpu.py``, ``xla_default.py``), and
``backends/__init__.py`` picks one when the program is lowered. Every hook is
the identity on values: a platform's hints may change the speed, the memory
and the compile time of the compiled program, never its numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax


class Hints(NamedTuple):
  """How the maths is steered on one platform (all hooks are value-identities).

  Attributes:
    name: a short label for the platform's choices, such as ``"xla:cpu"``.
    separate: ``separate(*arrays) -> arrays``, called where one full-size pass
      (a reduction or the elementwise output) starts from ``x`` or the
      cotangent: it may give that pass a handle on its operands that no other
      pass shares.
    fence: ``fence(array) -> array``, called on small partial results (the
      ``(N, C)`` sums) and at the cotangent's entry: it may stop the compiler
      from rewriting the computation across that point.
    rsqrt: the reciprocal square root of the small ``(N, G)`` variance array.
  """

  name: str
  separate: Callable[..., tuple[jax.Array, ...]]
  fence: Callable[[jax.Array], jax.Array]
  rsqrt: Callable[[jax.Array], jax.Array]
