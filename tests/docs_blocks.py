"""The shell blocks of docs/*.md, so that a test runs the commands a sysadmin reads.

A block the docs want run is a fenced ```sh block preceded by its name in an HTML comment:

    <!-- block: restore -->
    ```sh
    postroom --config /etc/postroom/postroom.toml backup /var/backups/postroom/today
    ```

`commands("backup.md", "restore")` returns its command lines (comments and blank lines
dropped, `\\` continuations joined), with `replace` applied: the docs say production paths
(/etc/postroom/postroom.toml, /var/lib/postroom), a test swaps in its own. tests/test_docs.py
fails when a ```sh block has no name, or when no test or install check asks for a block by its
name: a command in the docs is either run or an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"

_BLOCK = re.compile(r"(?:<!--\s*block:\s*(?P<name>[\w.-]+)\s*-->\s*\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```",
                    re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    doc: str  # file name under docs/
    name: str  # "" when unnamed
    lang: str
    body: str

    def commands(self, replace: dict[str, str] | None = None) -> list[str]:
        text = self.body.replace("\\\n", " ")
        for old, new in (replace or {}).items():
            text = text.replace(old, new)
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def blocks(doc: str | None = None) -> list[Block]:
    """Every fenced block of one doc (or of all of docs/), in order."""
    paths = [DOCS / doc] if doc else sorted(DOCS.glob("*.md"))
    found = []
    for path in paths:
        for m in _BLOCK.finditer(path.read_text()):
            found.append(Block(path.name, m["name"] or "", m["lang"], m["body"]))
    return found


def block(doc: str, name: str) -> Block:
    named = [b for b in blocks(doc) if b.name == name]
    if len(named) != 1:
        raise LookupError(f"docs/{doc}: {len(named)} blocks named {name!r}")
    return named[0]


def commands(doc: str, name: str, replace: dict[str, str] | None = None) -> list[str]:
    return block(doc, name).commands(replace)
