"""A Sphinx check: every public name of gnorm has an entry in the API reference.

A public name is a public module of the package (one whose dotted name has
no part starting with ``_``) or a name listed in its ``__all__``; its entry
is the Python-domain object of the same dotted name (for example
``gnorm.group_norm`` or ``gnorm.compat.haiku.GroupNorm``). A public module without ``__all__``, or a
name without an entry, is a warning, so the ``-W`` build fails on it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def public_modules() -> list[str]:
  """Every module of the package whose dotted name has no ``_`` part."""
  import gnorm  # noqa: PLC0415

  found = ["gnorm"]
  for info in pkgutil.walk_packages(gnorm.__path__, "gnorm."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      found.append(info.name)
  return sorted(found)


def public_names() -> list[str]:
  """The dotted names that the API reference must document: the public
  modules, and every name in their ``__all__``."""
  names = []
  for module_name in public_modules():
    names.append(module_name)
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
      value = getattr(module, name)
      if getattr(value, "__name__", None) == f"{module_name}.{name}":
        continue  # a public submodule: checked as a module of its own
      names.append(f"{module_name}.{name}")
  return names


def _check(app: Any, env: Any) -> None:
  from sphinx.util import logging  # noqa: PLC0415 (tests import this file without sphinx)

  _logger = logging.getLogger(__name__)
  documented = set(env.get_domain("py").objects)
  for module_name in public_modules():
    module = importlib.import_module(module_name)
    if module_name != "gnorm.compat" and not hasattr(module, "__all__"):
      # gnorm.compat only holds the drop-ins' submodules, each imported on demand.
      _logger.warning("public module %s has no __all__", module_name, type="gnorm")
  for name in public_names():
    if name not in documented:
      _logger.warning("public name %s has no entry in the API reference", name, type="gnorm")


def setup(app: Any) -> dict[str, Any]:
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
