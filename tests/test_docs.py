"""README.md and docs/: the runnable snippets run and every relative link resolves.

The README's "lifting a module" examples import layers by name, so a refactor that renames or
re-signatures one of them fails here instead of leaving the front page wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _python_snippets(page: Path) -> list[str]:
    """Self-contained snippets: python blocks that import what they use (others need a model)."""
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == "python" and code.startswith("import ")]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#{1,6} (.*)$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return out


@pytest.mark.parametrize("index", range(len(_python_snippets(ROOT / "README.md"))))
def test_readme_snippet_runs(index):
    torch.manual_seed(0)
    exec(compile(_python_snippets(ROOT / "README.md")[index], f"README.md snippet {index}", "exec"), {})


def test_readme_has_lifting_snippets():
    assert len(_python_snippets(ROOT / "README.md")) >= 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(link)
        elif anchor and (path.suffix != ".md" or anchor not in _anchors(path)):
            broken.append(link)
    assert not broken, f"{page.name}: broken links {broken}"
