"""Sphinx configuration for gnorm's documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(warnings are errors). Notebooks are rendered with their stored outputs
and never executed; code examples on the pages run as doctests under pytest.
"""

import importlib.metadata
import inspect
import pathlib
import re
import sys

import flax.linen

_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "_ext"))

project = "gnorm"
author = "gnorm developers"
copyright = "2026, gnorm developers"  # noqa: A001 (Sphinx's name)
# The version documented: the installed package's (one place: pyproject.toml).
release = importlib.metadata.version("gnorm")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped in the package and copied into _static/mathjax: formulas
    # render with no network (Sphinx's default loads MathJax from a CDN).
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
    "myst_nb",
    "public_api",
    "public_types",
]

# Notebooks: rendered with the outputs stored in them, never executed here.
nb_execution_mode = "off"
# A cell's printed lines in one output box, not one box per write.
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "conftest.py", "_ext", "**.ipynb_checkpoints"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False
# The page's contents list shows "GroupNorm" > "n_groups", not
# "GroupNorm" > "GroupNorm.n_groups": the nesting already says whose it is.
toc_object_entries_show_parents = "hide"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Broken cross-references are errors: every reference to a gnorm name must
# resolve. Names from other packages are not linked (no inventories are
# fetched: the build needs no network), so they are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|numpy|np|jnp|optax|equinox|eqx|haiku|hk|torch|typing"
     r"|collections|builtins|types|numbers|enum)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Hashable|ArrayLike|DTypeLike"
     r"|Array|Shape|Initializer|Activation|PRNGKey|NoneType|optional|default|str|int"
     r"|float|bool|tuple|dict|list|None|object|type)"),
]

html_theme = "sphinx_book_theme"
html_title = f"gnorm {release}"
html_theme_options = {
    "show_toc_level": 2,
}
html_static_path = ["_static"]
# Code blocks wrap instead of being cut at the page's right edge.
html_css_files = ["custom.css"]
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


_SIGNATURE_CLEANUPS = (
    (re.compile(r"<class 'jax\.numpy\.(\w+)'>"), r"jnp.\1"),
    (re.compile(r"<function (\w+)(?: at 0x[0-9a-f]+)?>"), r"\1"),
    (re.compile(r",? parent=<flax\.linen\.module\._Sentinel object>"), ""),
)


def _signature(app, what, name, obj, options, signature, return_annotation):
  """Readable constructor signatures.

  flax.nnx modules are built by a metaclass whose ``__call__`` takes
  ``(*args, **kwargs)``, so autodoc shows that; show ``__init__``'s instead.
  Reprs such as ``<class 'jax.numpy.float32'>`` read as ``jnp.float32``, and
  linen's internal ``parent`` field is left out.
  """
  if what == "class" and signature == "(*args, **kwargs)":
    params = list(inspect.signature(obj.__init__).parameters.values())[1:]
    # Types go in the description, as for every other signature here.
    params = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    signature = str(inspect.Signature(params))
  if signature:
    for pattern, replacement in _SIGNATURE_CLEANUPS:
      signature = pattern.sub(replacement, signature)
  if what == "class" and isinstance(obj, type) and issubclass(obj, flax.linen.Module):
    # Nor in the parameter types that autodoc recorded for the description.
    app.env.current_document.autodoc_annotations.get(name, {}).pop("parent", None)
  return signature, return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _signature)
