"""The API reference names types as a user writes them, not by private paths.

Annotations such as ``jax.typing.ArrayLike`` are evaluated unions by the time
autodoc sees them, so Sphinx prints their members by their private paths
(``jax.jaxlib._jax.Array | numpy.ndarray | numpy.bool | ... | bool | int``,
``jax._src.typing.SupportsDType``). This extension puts the public names back,
``jax.typing.ArrayLike``, ``jax.typing.DTypeLike`` and ``jax.Array``, in the
parameter types (recorded by ``sphinx.ext.autodoc.typehints``) and in the
attribute types (written by napoleon as ``:type:`` lines).

A type that still names a private path afterwards (a dotted name with a part
starting with ``_``) is a warning, so the ``-W`` build fails on it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

# Public name and the object it names, longest expansion first: ArrayLike's
# expansion contains jax.Array's.
_PUBLIC = (
  ("jax.typing.ArrayLike", "jax.typing", "ArrayLike"),
  ("jax.typing.DTypeLike", "jax.typing", "DTypeLike"),
  ("jax.Array", "jax", "Array"),
  ("equinox.nn.State", "equinox.nn", "State"),
)
# How each of Sphinx's stringify modes writes them (autodoc's typehints use
# "smart" or "fully-qualified", napoleon "fully-qualified-except-typing").
_MODES = ("smart", "fully-qualified", "fully-qualified-except-typing")
_PRIVATE = re.compile(r"\b[A-Za-z]\w*(?:\.\w+)*\._\w+(?:\.\w+)*")
_TYPE_LINE = re.compile(r"^(\s*:(?:type|vartype|rtype)[^:]*:\s*)(.*)$")


@functools.cache
def _replacements() -> tuple[tuple[str, str], ...]:
  import importlib  # noqa: PLC0415

  from sphinx.util.typing import stringify_annotation  # noqa: PLC0415

  pairs = []
  for public, module, name in _PUBLIC:
    obj = getattr(importlib.import_module(module), name)
    for mode in _MODES:
      written = stringify_annotation(obj, mode)
      if written != public:
        pairs.append((written, public))
  # Longest first, so a union is replaced before the names inside it.
  pairs.sort(key=lambda pair: -len(pair[0]))
  # "collections.abc.Callable" reads as "Callable", as in the parameter types.
  pairs.append(("collections.abc.", "~collections.abc."))
  pairs.append(("~~", "~"))
  return tuple(pairs)


def public_type(text: str) -> str:
  """``text``, a type as Sphinx wrote it, with the public names put back."""
  for written, public in _replacements():
    text = text.replace(written, public)
  return text


def private_paths(text: str) -> list[str]:
  """The dotted names in ``text`` that go through a private module."""
  return _PRIVATE.findall(text)


def _warn(name: str, text: str) -> None:
  from sphinx.util import logging  # noqa: PLC0415 (tests import this file without sphinx)

  found = private_paths(text)
  if found:
    logging.getLogger(__name__).warning(
      "the API reference shows a private path in the type of %s: %s (%s); add its public"
      " name to docs/_ext/public_types.py", name, ", ".join(found), text, type="gnorm")


def _parameter_types(app: Any, what: str, name: str, obj: Any, options: Any,
                     signature: str, return_annotation: str) -> None:
  annotations = app.env.current_document.autodoc_annotations.get(name, {})
  for key, text in annotations.items():
    annotations[key] = public_type(text)


def _check_parameter_types(app: Any, domain: str, objtype: str, contentnode: Any) -> None:
  """Warn about the parameter types that autodoc is about to write into a description."""
  if domain != "py":
    return
  signature = contentnode.parent[0]
  if not signature.get("fullname"):
    return
  fullname = ".".join(filter(None, (signature.get("module"), signature["fullname"])))
  for key, text in app.env.current_document.autodoc_annotations.get(fullname, {}).items():
    _warn(f"{fullname} ({key})", text)


def _attribute_types(app: Any, what: str, name: str, obj: Any, options: Any,
                     lines: list[str]) -> None:
  for i, line in enumerate(lines):
    match = _TYPE_LINE.match(line)
    if match:
      lines[i] = match.group(1) + public_type(match.group(2))
      _warn(name, lines[i])


def setup(app: Any) -> dict[str, Any]:
  # autodoc records the parameter types before it emits the event; the event
  # stops at the first handler that returns something (conf.py's does), so
  # this one, which returns nothing, runs first. The docstring's handler runs
  # after napoleon's (priority 500), which writes "Attributes:" as ":type:" lines.
  app.connect("autodoc-process-signature", _parameter_types, priority=400)
  # Checked once every handler of that event has run (conf.py's leaves out
  # linen's internal "parent"), before autodoc writes the types (priority 500).
  app.connect("object-description-transform", _check_parameter_types, priority=400)
  app.connect("autodoc-process-docstring", _attribute_types, priority=600)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
