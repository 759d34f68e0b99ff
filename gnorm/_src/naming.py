"""Layer-name patterns, as neupy's ``name`` argument.

A name is a literal (``"gn"``), a format pattern with exactly one replacement
field filled with a counter starting at 1 (``"gn{}"`` -> ``gn1``, ``gn2``;
``"fc-{:>03d}"`` -> ``fc-001``), or ``None`` (automatic naming).

This module only parses and fills patterns; *which* counter fills them
(per parent module, or process-wide for a module built outside any parent)
is the Flax module's business.
"""

from __future__ import annotations

import itertools
import string
import threading
from typing import Any
from typing import TypeGuard

_FORMATTER = string.Formatter()


def is_pattern(name: Any) -> TypeGuard[str]:
  """Whether ``name`` is a format pattern with one replacement field.

  Raises:
    TypeError: ``name`` is neither a ``str`` nor ``None``.
    ValueError: ``name`` is not a valid pattern, has more than one replacement
      field, a named field (``"{x}"``), a nested or converted field, or
      literal braces (``"{{"``), which cannot appear in a Flax name.

  Examples:
    >>> from gnorm._src import naming
    >>> naming.is_pattern("gn{}"), naming.is_pattern("gn"), naming.is_pattern(None)
    (True, False, False)
  """
  if name is None:
    return False
  if not isinstance(name, str):
    raise TypeError(
        f"name must be a str or None, got {name!r} (type {type(name).__name__}).")
  try:
    parts = list(_FORMATTER.parse(name))
  except ValueError as e:
    raise ValueError(f"name {name!r} is not a valid format pattern: {e}.") from None
  fields = [p for p in parts if p[1] is not None]
  # ``parse`` turns an escaped "{{" into a literal "{" in the literal text.
  if any("{" in literal or "}" in literal for literal, *_ in parts):
    raise ValueError(
        f"name {name!r} contains literal braces; a layer name may only use "
        "braces for one replacement field such as 'gn{}'.")
  if len(fields) > 1:
    raise ValueError(
        f"name {name!r} has {len(fields)} replacement fields; a name pattern "
        "may have at most one, which is filled with the layer's index "
        "(e.g. 'gn{}' or 'fc-{:>03d}').")
  if not fields:
    return False
  _, field_name, spec, conversion = fields[0]
  assert spec is not None  # parse gives a replacement field a str spec ('' if none)
  if field_name not in ("", "0") or conversion is not None or "{" in spec:
    raise ValueError(
        f"name {name!r} has the replacement field "
        f"{{{field_name}{'!' + conversion if conversion else ''}"
        f"{':' + spec if spec else ''}}}; only a positional field with an "
        "optional format spec, such as '{}' or '{:>03d}', is allowed.")
  try:
    name.format(1)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"name {name!r} cannot be filled with an integer index: {e}.") from None
  return True


def fill(pattern: str, index: int) -> str:
  """Fills a pattern with ``index``.

  Python's formatting rules apply, so neupy's own example ``"fc-{:<03d}"``
  (left-aligned) gives ``fc-100``; use ``"fc-{:>03d}"`` or ``"fc-{:03d}"``
  for ``fc-001``.

  Examples:
    >>> from gnorm._src import naming
    >>> naming.fill("gn{}", 2), naming.fill("fc-{:>03d}", 1)
    ('gn2', 'fc-001')
    >>> naming.fill("fc-{:<03d}", 1)  # fill on the right: Python, not neupy
    'fc-100'
  """
  return pattern.format(index)


class GlobalCounters:
  """Process-wide counters, one per pattern, each starting at 1.

  Used for modules built outside any parent, as neupy numbers its layers.
  Thread-safe, so that two threads never get the same name.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._counters: dict[str, itertools.count] = {}

  def next(self, pattern: str) -> int:
    with self._lock:
      counter = self._counters.setdefault(pattern, itertools.count(1))
      return next(counter)

  def reset(self) -> None:
    """Forgets all counts (for tests and notebooks)."""
    with self._lock:
      self._counters.clear()


GLOBAL = GlobalCounters()
