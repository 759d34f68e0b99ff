"""Checks of the built documentation site, as a reader sees it.

Run after the Sphinx build (``.ci/run``): ``python .ci/check_docs_html.py docs/_build/html``.
It reads the HTML files only: no network, no browser. What it catches, each
seen on the site once (issue 21):

* a page that loads a script or a stylesheet from the network (MathJax from a
  CDN left formulas as raw TeX offline), or names a local one that the build
  does not contain;
* a page with formulas but no local MathJax;
* a type in the API reference that names a private path
  (``jax._src.typing.SupportsDType``, ``jax.jaxlib._jax.Array``) or repeats a
  member of a union (``bool | number | bool``);
* a table cell whose code has unbalanced brackets: the sign of an RST simple
  table cut into rows (``GroupNorm(n_groups, gamma, beta,`` / ``epsilon, name)``);
* two entries of the same name side by side in a page's contents list (four
  identical ``GroupNorm`` under ``gnorm.compat``);
* consecutive output boxes of the same stream in a notebook (one box per
  printed line);
* a page without the stylesheet that wraps long code lines, or whose title does
  not name the version that ``pyproject.toml`` gives.

BeautifulSoup comes with the docs' theme (pydata-sphinx-theme depends on it).
"""

from __future__ import annotations

import itertools
import pathlib
import re
import sys
import urllib.parse

from bs4 import BeautifulSoup

ROOT = pathlib.Path(__file__).resolve().parent.parent
_PRIVATE = re.compile(r"\b(?:jax|jaxlib|numpy|flax|equinox|haiku)(?:\.\w+)*\._\w+")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _version() -> str:
  match = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
  assert match, "no version in pyproject.toml"
  return match.group(1)


def _balanced(text: str) -> bool:
  stack = []
  for char in text:
    if char in _BRACKETS:
      stack.append(_BRACKETS[char])
    elif char in _BRACKETS.values():
      if not stack or stack.pop() != char:
        return False
  return not stack


def _local_assets(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  for tag, attr in (("script", "src"), ("link", "href")):
    for node in soup.find_all(tag):
      url = node.get(attr)
      if not url or (tag == "link" and "stylesheet" not in node.get("rel", [])):
        continue
      parsed = urllib.parse.urlparse(url)
      if parsed.scheme in ("http", "https") or url.startswith("//"):
        problems.append(f"{page.name}: loads {url} from the network")
      elif not parsed.scheme:
        target = (page.parent / urllib.parse.unquote(parsed.path)).resolve()
        if not target.is_file():
          problems.append(f"{page.name}: {url} is not in the build")


def _math(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  if soup.select(".math"):
    scripts = [node.get("src", "") for node in soup.find_all("script")]
    if not any("mathjax" in src.lower() and "://" not in src for src in scripts):
      problems.append(f"{page.name}: has formulas but no local MathJax")


def _union_members(text: str) -> list[str]:
  """The members of a union written ``a | b[c | d] | e``, at the outer level."""
  members, depth, current = [], 0, ""
  for char in text:
    depth += char in "[(" and 1 or char in "])" and -1 or 0
    if char == "|" and depth == 0:
      members.append(current.strip())
      current = ""
    else:
      current += char
  return [*members, current.strip()]


def _type_texts(soup: BeautifulSoup) -> list[str]:
  """Every type the API reference shows: ``name (type) – ...`` of a parameter,
  and the ``Type:`` field of an attribute."""
  texts = []
  for desc in soup.select("dl.py"):
    for field in desc.select("dl.field-list > dt"):
      body = field.find_next_sibling("dd")
      if body is None:
        continue
      if field.get_text(strip=True).startswith("Type"):
        texts.append(body.get_text("", strip=True))
      elif field.get_text(strip=True).startswith("Parameters"):
        items = body.find_all("li") or [body]
        for item in items:
          head = item.get_text("").split(" – ", 1)[0].strip()
          match = re.fullmatch(r"\S+ \((.*)\)", head, flags=re.S)
          if match:
            texts.append(match.group(1))
  return texts


def _types(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  for text in _type_texts(soup):
    for found in _PRIVATE.findall(text):
      problems.append(f"{page.name}: the type {text!r} names the private path {found}")
    members = _union_members(text)
    if len(members) != len(set(members)):
      problems.append(f"{page.name}: the type {text!r} repeats a member")


def _tables(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  for cell in soup.select("table td, table th"):
    for code in cell.find_all("code"):
      text = code.get_text()
      if not _balanced(text):
        problems.append(f"{page.name}: a table cell's code is cut: {text!r}")


def _contents(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  for ul in soup.select("ul.section-nav"):
    names = [li.find("a").get_text(" ", strip=True) for li in ul.find_all("li", recursive=False)
             if li.find("a")]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      problems.append(f"{page.name}: the contents list repeats {repeated} side by side")


def _streams(page: pathlib.Path, soup: BeautifulSoup, problems: list[str]) -> None:
  for output in soup.select("div.cell_output"):
    kinds = [tuple(child.get("class", [])) for child in output.find_all(recursive=False)]
    for a, b in itertools.pairwise(kinds):
      if "stream" in a and a == b:
        problems.append(f"{page.name}: consecutive {' '.join(a)} output boxes (merge them)")


def _page(page: pathlib.Path, soup: BeautifulSoup, version: str, problems: list[str]) -> None:
  css = [node.get("href", "") for node in soup.find_all("link")]
  if not any(href.split("?")[0].endswith("_static/custom.css") for href in css):
    problems.append(f"{page.name}: without _static/custom.css (code would not wrap)")
  title = soup.title.get_text() if soup.title else ""
  if f"gnorm {version}" not in title:
    problems.append(f"{page.name}: the title {title!r} does not name gnorm {version}")


def check(site: pathlib.Path) -> list[str]:
  problems: list[str] = []
  css = site / "_static" / "custom.css"
  if not css.is_file() or "pre-wrap" not in css.read_text():
    problems.append("_static/custom.css does not wrap code blocks")
  version = _version()
  pages = sorted(p for p in site.rglob("*.html")
                 if not {"_modules", "_static", "_sources"} & set(p.relative_to(site).parts)
                 and p.name not in ("genindex.html", "search.html", "py-modindex.html"))
  assert pages, f"no pages in {site}"
  for page in pages:
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    for check_one in (_local_assets, _math, _types, _tables, _contents, _streams):
      check_one(page, soup, problems)
    _page(page, soup, version, problems)
  return problems


def main(argv: list[str]) -> int:
  site = pathlib.Path(argv[1] if len(argv) > 1 else ROOT / "docs" / "_build" / "html")
  problems = check(site)
  for problem in problems:
    print(problem, file=sys.stderr)
  print(f"{site}: {len(problems)} problem(s)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
