"""The documentation site's sources stay consistent with the package.

The full check is the Sphinx build (warnings are errors, see
``docs/development.md``); these tests catch the same mistakes without Sphinx,
in the plain test run.
"""

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


def test_readme_links_to_pages_that_exist():
  readme = (ROOT / "README.md").read_text()
  links = re.findall(r"\]\((docs/[^)#]+)", readme)
  assert len(links) >= 8, links
  for link in links:
    assert (ROOT / link).exists(), link


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  command = 'pip install -e ".[test]" && python -m pytest'
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
