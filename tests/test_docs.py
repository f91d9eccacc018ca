"""The documentation stays true: the generated flag reference matches the commands' `--help`,
and every relative link (and #anchor) in README.md and docs/*.md resolves."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO
from tools.flag_reference import render

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for a page's headings (lowercase, punctuation dropped,
    spaces as hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", markdown), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link on ``page`` whose file or anchor does not exist."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif (
            anchor
            and file.suffix == ".md"
            and anchor not in anchors(file.read_text(encoding="utf-8"))
        ):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_resolves() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = [problem for page in pages for problem in broken_links(page)]
    assert not broken, broken


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading) [gone](missing.md) [bad](there.md#nope) <https://x.org>\n"
        "```\n[in code](ignored.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#nope (no such heading)",
    ]


def test_the_flag_reference_matches_help() -> None:
    written = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    assert written == render(), (
        "docs/reference.md differs from the commands' --help; regenerate it with "
        "`python -m tools.flag_reference > docs/reference.md`"
    )
