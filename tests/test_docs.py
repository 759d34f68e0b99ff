"""The documentation site's sources stay consistent with the package.

The full check is the Sphinx build (warnings are errors, see
``docs/development.md``); these tests catch the same mistakes without Sphinx,
in the plain test run.
"""

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))

sys.path.insert(0, str(DOCS / "_ext"))
import public_api  # noqa: E402


def _fences(text):
  """(language, body) of every fenced code block of a Markdown text."""
  return re.findall(r"^```(\S*)\n(.*?)^```", text, flags=re.S | re.M)


def test_every_public_name_has_an_api_entry():
  api = (DOCS / "api.md").read_text()
  documented = set(re.findall(r"^\.\. (?:auto)?(?:function|class|data|module)::\s+(\S+)",
                              api, flags=re.M))
  missing = sorted(set(public_api.public_names()) - documented)
  assert not missing, f"public names without an entry in docs/api.md: {missing}"


def test_public_names_cover_the_package():
  names = public_api.public_names()
  for expected in ("gnorm.group_norm", "gnorm.GroupNorm", "gnorm.nnx.GroupNorm",
                   "gnorm.init.Normal", "gnorm.compat.haiku.GroupNorm"):
    assert expected in names
  assert not [n for n in names if "._" in n], names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_on_the_pages_runs_as_a_doctest(page):
  """Python examples are ``pycon`` blocks, which pytest runs (--doctest-glob)."""
  for language, body in _fences(page.read_text()):
    assert language in ("pycon", "bash", "text", "", "{include}", "{figure}", "{toctree}",
                        "{eval-rst}"), f"{page.name}: a ```{language} block is not run"
    if language == "pycon":
      assert body.lstrip().startswith(">>>"), f"{page.name}: a pycon block without >>>"
      assert body.endswith("\n\n"), (
          f"{page.name}: end each pycon block with a blank line, or doctest reads the "
          f"closing fence as expected output:\n{body}")


# What fits on one line of a code block at 1280 px (sphinx-book-theme's
# content column, its monospace font): measured in Chromium, 77.6 characters.
_CODE_WIDTH = 77


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_text_blocks_fit_the_page(page):
  """Code blocks wrap (docs/_static/custom.css), except ```text blocks, whose
  columns would fall apart: they keep their lines, so each must fit."""
  for language, body in _fences(page.read_text()):
    if language == "text":
      for line in body.splitlines():
        assert len(line) <= _CODE_WIDTH, (
            f"{page.name}: a ```text line of {len(line)} characters is cut at the right of a "
            f"1280-pixel window (at most {_CODE_WIDTH}):\n{line}")


def test_readme_links_to_pages_that_exist():
  readme = (ROOT / "README.md").read_text()
  links = re.findall(r"\]\((docs/[^)#]+)", readme)
  assert len(links) >= 8, links
  for link in links:
    assert (ROOT / link).exists(), link


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  command = 'pip install -e ".[test]" && python -m pytest -n auto'
  assert command in readme
  assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_tour_runs():
  readme = (ROOT / "README.md").read_text()
  tour = [body for language, body in _fences(readme) if language == "python"]
  assert len(tour) == 1, "the README has one Python block, its short tour"
  namespace = {}
  exec(compile(tour[0], "README.md", "exec"), namespace)  # noqa: S102
  assert namespace["y"].shape == (8, 32, 32, 64)
  assert set(namespace["grads"]) == {"gamma", "beta"}


_BORDER = re.compile(r"^(\s*)(=+(?: +=+)+)\s*$")


def _simple_tables(docstring):
  """The rows of each RST simple table in a docstring: a list of rows, each a
  list of cells, each cell the text of its lines joined."""
  lines = docstring.splitlines()
  tables, i = [], 0
  while i < len(lines):
    border = _BORDER.match(lines[i])
    if not border:
      i += 1
      continue
    indent = len(border.group(1))
    spans = [(m.start() + indent, m.end() + indent)
             for m in re.finditer(r"=+", border.group(2))]
    rows, j = [], i + 1
    while j < len(lines) and lines[j].strip():
      line = lines[j]
      if not _BORDER.match(line):
        cells = [line[a:b if k + 1 < len(spans) else None].strip()
                 for k, (a, b) in enumerate(spans)]
        if cells[0] or not rows:  # text in the first column starts a row
          rows.append(cells)
        else:
          rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
      j += 1
    tables.append(rows)
    i = j
  return tables


def _balanced(text):
  stack = []
  for char in text:
    if char in "([{":
      stack.append(")]}"["([{".index(char)])
    elif char in ")]}" and (not stack or stack.pop() != char):
      return False
  return not stack and text.count("``") % 2 == 0


def _docstrings():
  """(where, docstring) of every module, class and function in gnorm/."""
  for path in sorted((ROOT / "gnorm").rglob("*.py")):
    tree = ast.parse(path.read_text())
    for node in [tree, *ast.walk(tree)]:
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node)
        if docstring:
          yield f"{path.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}", docstring


def test_docstring_tables_keep_each_cell_in_one_row():
  """An RST simple table cannot wrap a cell: a cell's second line with text in
  the first column starts a new row (``GroupNorm(n_groups, gamma, beta,`` /
  ``epsilon, name)`` rendered as two rows). A cell cut that way leaves its
  brackets or its ``literal`` open."""
  found = 0
  for where, docstring in _docstrings():
    for rows in _simple_tables(docstring):
      found += 1
      for row in rows:
        for cell in row:
          assert _balanced(cell), f"{where}: a table cell is cut across rows: {cell!r}"
  assert found >= 1  # the GroupNorm docstring's table of neupy's API


def test_docstring_table_reader_sees_a_cut_cell():
  cut = """
  ====================================  ======
  ``GroupNorm(n_groups, gamma, beta,``  same
  ``epsilon, name)``                    positions
  ====================================  ======
  """
  rows = _simple_tables(cut)[0]
  assert rows == [["``GroupNorm(n_groups, gamma, beta,``", "same"],
                  ["``epsilon, name)``", "positions"]]
  assert not _balanced(rows[0][0]) and not _balanced(rows[1][0])
  whole = """
  ===========  ======
  ``f(a, b)``  same
               positions
  ===========  ======
  """
  assert _simple_tables(whole)[0] == [["``f(a, b)``", "same positions"]]


def test_private_type_paths_are_found():
  """docs/_ext/public_types.py finds private paths of jax's types. Its mapping
  to public names needs Sphinx, so the docs build (warnings are errors) checks
  every type of the API reference with it, and .ci/check_docs_html.py checks
  the built pages for private paths."""
  import public_types  # noqa: PLC0415

  assert public_types.private_paths("str | jax._src.typing.SupportsDType") == [
      "jax._src.typing.SupportsDType"]
  assert public_types.private_paths("jax.jaxlib._jax.Array | None") == ["jax.jaxlib._jax.Array"]
  assert public_types.private_paths("dict[str, jax.Array] | jax.typing.DTypeLike") == []


def test_committed_benchmark_reports_name_their_code():
  """Each committed report says which gnorm produced it: version and commit."""
  reports = sorted((ROOT / "benchmarks" / "results").rglob("latest.md"))
  assert len(reports) >= 3, reports
  for report in reports:
    head = "\n".join(report.read_text().splitlines()[:6])
    assert re.search(r"gnorm \S+ at commit [0-9a-f]{7}", head), (
        f"{report.relative_to(ROOT)} does not name the version and commit that produced it")


def test_site_explains_the_seed_where_it_first_appears():
  """The pages say "the seed" everywhere; the home page, read first, says what it is."""
  index = (DOCS / "index.md").read_text()
  first = index.lower().find("the seed")
  assert first != -1, "index.md does not explain 'the seed'"
  paragraph = index[index.rfind("\n\n", 0, first):index.find("\n\n", first)]
  assert "neupy.layers.GroupNorm" in paragraph, paragraph


def test_site_configuration_for_readers_offline():
  """The build's settings behind what a reader sees (checked in the built HTML
  by .ci/check_docs_html.py after the CI build)."""
  text = (DOCS / "conf.py").read_text()
  assert '"sphinx-mathjax-offline"' in text  # formulas with no network
  assert "nb_merge_streams = True" in text  # one output box per cell's stream
  assert 'html_title = f"gnorm {release}"' in text  # the version in every page's title
  assert "pre-wrap" in (DOCS / "_static" / "custom.css").read_text()  # code blocks wrap
