"""The documentation holds together: every relative link and image of every page resolves, an
``#anchor`` included (GitHub's heading slugs), and the README stays a README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])


def _prose(text: str) -> str:
    """``text`` without code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def _anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(
        r"^#+\s+(.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target) or target.startswith("<"):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return broken


def test_every_link_of_the_docs_resolves() -> None:
    assert broken_links(PAGES) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    """The check above finds a missing file and a missing heading, so it cannot pass by
    missing them."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](gone.md) [b](#title) [c](#nowhere) `[d](gone.md)`\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert broken_links([page]) == [
            "page.md: gone.md (no such file)",
            "page.md: #nowhere (no such heading)",
        ]
    finally:
        ROOT = root


def test_the_readme_is_short() -> None:
    """The README is what lastseen is, two commands, a curl and a map of the docs; the rest
    lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_cli_reference_has_every_command() -> None:
    """Each command `lastseen --help` offers has its section in the CLI reference, and the
    reference names no command that is gone."""
    import argparse

    from lastseen.cli.main import build_parser

    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    offered = {c.dest for c in commands._choices_actions}
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert set(re.findall(r"^## `lastseen ([a-z-]+)`", page, re.MULTILINE)) == offered
