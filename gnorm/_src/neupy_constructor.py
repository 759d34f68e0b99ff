"""neupy's constructor and name patterns, fitted onto a ``flax.linen`` module.

neupy's ``GroupNorm(n_groups, gamma, beta, epsilon, name)`` takes ``name``
fifth and accepts format patterns such as ``"gn{}"``; Flax makes ``name``
keyword-only and registers it as given. ``gnorm.GroupNorm`` (modules.py)
uses the two functions here to bridge that: ``fill_name_pattern`` from its
``__post_init__``, ``positional_name_init`` once on the class.
"""

import dataclasses
import inspect

import flax.linen as nn
from flax.linen import module as _linen_module

from gnorm._src import naming

# The key under which a parent module counts the uses of one name pattern. It
# lives in Flax's own per-call autonaming state (``_state.autoname_cursor``),
# so pattern names follow exactly the rules of Flax's ``GroupNorm_0`` names:
# reset on every call of the parent, carried across lifted transforms, and so
# identical between ``init`` and every ``apply``. A class name never contains
# braces, so these keys cannot collide with Flax's.
_CURSOR_PREFIX = "gnorm name pattern "


def fill_name_pattern(module: nn.Module, pattern: str) -> None:
  """Replaces a name pattern by its filled name, before Flax registers it.

  A plain function, not a method: Flax wraps a module's methods and pushes the
  module on its context stack, which would hide the parent.
  """
  parent = module.parent
  if parent is _linen_module._unspecified_parent:
    # As Flax does next: the module whose method is running is the parent.
    parent = _linen_module._context.module_stack[-1]
    object.__setattr__(module, "parent", parent)
  if isinstance(parent, nn.Module):
    cursor = parent._state.autoname_cursor
    key = _CURSOR_PREFIX + pattern
    index = cursor.get(key, 0) + 1
    cursor[key] = index
  else:
    # Built outside any parent (or bound to a bare scope): number it
    # process-wide, as neupy numbers its layers. ``init`` and ``apply``
    # clone the module with the filled name, which is no longer a pattern.
    index = naming.GLOBAL.next(pattern)
  object.__setattr__(module, "name", naming.fill(pattern, index))


def positional_name_init(cls: type[nn.Module]) -> None:
  """Gives ``cls`` neupy's constructor: ``name`` fifth, options keyword-only.

  Flax makes ``name`` keyword-only. This wraps Flax's generated ``__init__``;
  the signature is built from the dataclass fields, so a new keyword option
  needs only its field.
  """
  dataclass_init = cls.__init__
  positional = ("n_groups", "gamma", "beta", "epsilon", "name")

  def __init__(self, *args, **kwargs):
    if len(args) > len(positional):
      raise TypeError(
          f"{cls.__name__} takes at most {len(positional)} positional arguments "
          f"{positional}, got {len(args)}; pass the other options by keyword.")
    for arg_name, value in zip(positional, args, strict=False):
      if arg_name in kwargs:
        raise TypeError(
            f"{cls.__name__} got multiple values for argument {arg_name!r}.")
      kwargs[arg_name] = value
    dataclass_init(self, **kwargs)

  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  P = inspect.Parameter
  params = [P("self", P.POSITIONAL_OR_KEYWORD)]
  for field_name in positional:
    f = fields[field_name]
    default = P.empty if f.default is dataclasses.MISSING else f.default
    params.append(P(field_name, P.POSITIONAL_OR_KEYWORD, default=default,
                    annotation=f.type))
  for field_name, f in fields.items():
    if field_name not in positional:
      params.append(P(field_name, P.KEYWORD_ONLY, default=f.default,
                      annotation=f.type))
  # Functions have no declared ``__signature__``; inspect.signature reads it.
  __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
      params, return_annotation=None)
  __init__.__qualname__ = f"{cls.__qualname__}.__init__"
  __init__.__doc__ = dataclass_init.__doc__
  cls.__init__ = __init__  # type: ignore[method-assign]  # replaces the dataclass __init__
