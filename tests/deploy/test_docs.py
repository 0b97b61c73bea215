"""Every relative link in the project's Markdown leads somewhere: the file exists and, for a
``#fragment``, one of its headings makes that anchor (GitHub's rule). The README sends readers to
``docs/`` and back, and a section renamed or moved would otherwise leave dead links silently."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in listed]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a ``# comment`` in a shell block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def dead_links(path: Path) -> list[str]:
    dead = []
    for line in prose_lines(path.read_text()):
        # inline code is not a link: `a](b)` inside backticks
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            name, _, fragment = target.partition("#")
            linked = (path.parent / name).resolve() if name else path
            if not linked.exists():
                dead.append(f"{target}: no file {shown(linked)}")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                dead.append(f"{target}: no heading in {shown(linked)} makes #{fragment}")
    return dead


def test_slug_follows_github() -> None:
    assert slug("Model quality (`make cv`)") == "model-quality-make-cv"
    assert slug("Export, evaluation and the model registry") == (
        "export-evaluation-and-the-model-registry"
    )
    assert slug("Training on a GPU (`make check-cuda`)") == "training-on-a-gpu-make-check-cuda"


def test_relative_links_resolve(tmp_path: Path) -> None:
    # the checker itself finds a dead file, a dead anchor, and passes a live one
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere)\n")
    assert len(dead_links(doc)) == 2
    files = markdown_files()
    assert ROOT / "README.md" in files
    assert ROOT / "docs" / "serving-internals.md" in files
    dead = {str(p.relative_to(ROOT)): d for p in files if (d := dead_links(p))}
    assert not dead, dead
