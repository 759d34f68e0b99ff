"""The shape of the code: one way from ``group_norm`` to the maths.

Imports run one way (no circle, lazy imports included); a CPU forward call
crosses five of gnorm's functions from ``group_norm`` to ``maths.forward``;
an implementation is one entry of ``dispatch.IMPLEMENTATIONS``; every file
stays small enough for one person to hold in mind.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm
from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src import primitives
from gnorm._src import tangent

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gnorm"
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """The gnorm modules ``path`` imports, anywhere in it (lazy imports too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("gnorm")}


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {name: {m for m in _imports(path) if m in modules and m != name}
          for name, path in modules.items()}


def test_no_import_circle():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(name, path):
    state[name] = 1
    for dep in sorted(graph[name]):
      if state.get(dep) == 1:
        cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
        raise AssertionError("import circle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, [*path, dep])
    state[name] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_the_maths_imports_no_dispatch():
  # The maths and the backends sit below the dispatch and the primitives.
  graph = _graph()
  above = {"gnorm._src.dispatch", "gnorm._src.primitives", "gnorm._src.derivative",
           "gnorm._src.functional"}
  for name in ("gnorm._src.maths", "gnorm._src.tangent", *[
      n for n in graph if n.startswith("gnorm._src.backends")]):
    assert not graph[name] & above, (name, graph[name] & above)


def test_a_cpu_forward_call_crosses_five_functions():
  # The gnorm frames on the stack when the primitive is bound (tracing) and
  # when the maths runs (lowering the primitive for the CPU, under jit).
  seen = {}
  targets = {primitives.forward.__code__: "bind", maths.forward.__code__: "maths"}

  def profile(frame, event, arg):
    if event == "call" and frame.f_code in targets:
      stack, f = [], frame
      while f is not None:
        if pathlib.Path(f.f_code.co_filename).is_relative_to(PACKAGE):
          stack.append(f.f_code.co_qualname)
        f = f.f_back
      seen.setdefault(targets[frame.f_code], stack[::-1])

  x = jnp.ones((2, 4, 4, 8))
  f = jax.jit(lambda x: gnorm.group_norm(None, x, 2))  # a fresh function: traced anew
  sys.setprofile(profile)
  try:
    f.lower(x)
  finally:
    sys.setprofile(None)
  assert seen["bind"] == ["group_norm", "group_norm_core", "forward"], seen
  assert seen["maths"] == ["_lowering.<locals>.fn", "forward"], seen
  assert len(seen["bind"]) + len(seen["maths"]) - 1 <= 5  # primitives.forward to fn: the bind


def test_an_implementation_is_one_table_entry(monkeypatch):
  # A new entry (here: the XLA maths, counting its calls) runs forward and
  # backward with nothing else registered.
  calls = []

  def forward(*args, **kwargs):
    calls.append("forward")
    return maths.forward(*args, **kwargs)

  def cotangent(*args, **kwargs):
    calls.append("cotangent")
    return tangent.cotangent(*args, **kwargs)

  monkeypatch.setitem(dispatch.IMPLEMENTATIONS, "counted",
                      dispatch.Implementation(forward, cotangent))
  x = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)
  params = {"gamma": np.full(6, 2.0, np.float32), "beta": np.zeros(6, np.float32)}

  def loss(p, x):
    return jnp.sum(jnp.sin(gnorm.group_norm(p, x, 3)))

  with dispatch.forced("counted"):
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert calls == ["forward", "cotangent"], calls
  want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_forced_names_are_checked():
  with pytest.raises(ValueError, match="implementation must be one of"):
    with dispatch.forced("cuda"):
      pass


@functools.cache
def _source_files():
  dirs = ("gnorm", "tests", "benchmarks", "examples", "docs", ".ci")
  return [p for d in dirs for p in (ROOT / d).rglob("*")
          if p.suffix in (".py", ".md", ".sh", ".ipynb") and "_build" not in p.parts]


@pytest.mark.parametrize("path", sorted((PACKAGE.rglob("*.py"))),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_library_files_stay_small(path):
  n = len(path.read_text().splitlines())
  assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def test_no_file_points_outside_the_repository():
  # Notes kept beside the repository are not the project's: nothing may
  # send a reader to them.
  outside = "GPU" + "_NOTES"
  hits = [str(p.relative_to(ROOT)) for p in _source_files() if outside in p.read_text()]
  assert not hits, hits
