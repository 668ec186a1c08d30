"""Writes the real-prose fillers of ``hcmemory eval`` (``hcmemory/data/prose-*.txt``) from the text that
ships with CPython (PSF License; sources and license: ``hcmemory/data/PROSE-SOURCES.md``).

The files are copied once, not read from the interpreter at run time: each Python release rewrites
these texts, and a haystack (hence every eval cell's key) must not change with the interpreter.

    python benchmarks/prose_fillers.py   # with CPython 3.11.7: the shipped files are its output

Each file holds one paragraph per line block (paragraphs separated by a blank line, hard-wrapped
lines joined); literal blocks (code, grammar, tables) and heading rules are dropped: the fillers are
the prose around them.
"""

from __future__ import annotations

import html
import re
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

import pydoc_data.topics

DATA = Path(__file__).resolve().parents[1] / "hcmemory" / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
LIMIT = 160_000
"""Characters kept per file (about 35K SmolLM2 tokens: several 7.5K haystacks start apart in each)."""


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a plain-text document: unindented blocks, lines joined, rules dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t")):  # literal blocks: code, grammar, tables
            continue
        lines = [line for line in lines if not re.fullmatch(r"\s*[*=~^-]{3,}\s*", line)]
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph.split()) >= 4:
            out.append(re.sub(r"\s+", " ", paragraph))
    return out


def _bounded(paragraphs: list[str]) -> str:
    kept, size = [], 0
    for paragraph in paragraphs:
        if size + len(paragraph) > LIMIT:
            break
        kept.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(kept) + "\n"


class _Text(HTMLParser):
    """Paragraph text of Sphinx HTML: ``<p>``, ``<dd>``/``<li>`` bodies and headings; ``<pre>`` dropped."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "dt", "li"}

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self.current: list[str] | None = None
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("pre", "script", "style"):
            self.skip += 1
        elif tag in self.BLOCKS and not self.skip:
            self._close()
            self.current = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "script", "style"):
            self.skip -= 1
        elif tag in self.BLOCKS:
            self._close()

    def handle_data(self, data: str) -> None:
        if self.current is not None and not self.skip:
            self.current.append(data)

    def _close(self) -> None:
        if self.current is not None:
            text = re.sub(r"\s+", " ", html.unescape("".join(self.current))).strip().rstrip("¶").strip()
            if len(text.split()) >= 4:
                self.paragraphs.append(text)
        self.current = None


def main() -> None:
    reference = [p for name in sorted(pydoc_data.topics.topics) for p in _paragraphs(pydoc_data.topics.topics[name])]
    changelog = _paragraphs((STDLIB / "idlelib" / "NEWS.txt").read_text(encoding="utf-8"))
    parser = _Text()
    parser.feed((STDLIB / "idlelib" / "help.html").read_text(encoding="utf-8"))
    # the page's body: from its first sentence to its last, without the navigation around it
    start = next(i for i, p in enumerate(parser.paragraphs) if p.startswith("IDLE is Python"))
    end = next(i for i, p in enumerate(parser.paragraphs) if p.startswith("The files in idlelib are described"))
    manual = parser.paragraphs[start:end + 1]
    for kind, paragraphs in (("reference", reference), ("changelog", changelog), ("manual", manual)):
        (DATA / f"prose-{kind}.txt").write_text(_bounded(paragraphs), encoding="utf-8")
        print(kind, len(paragraphs), "paragraphs")


if __name__ == "__main__":
    main()
