"""The docs' shell blocks are each run by a test or by the install check (tests/docs_blocks.py)."""

from __future__ import annotations

import re
from pathlib import Path

from docs_blocks import blocks

TESTS = Path(__file__).resolve().parent


def _asked_for() -> set[tuple[str, str]]:
    """(doc, name) pairs that some file under tests/ runs: commands("doc", "name"...) or
    block("doc", "name")."""
    asked = set()
    call = re.compile(r"\b(?:commands|block)\(\s*\"([\w.-]+\.md)\",\s*\"([\w.-]+)\"")
    for path in TESTS.glob("*.py"):
        if path.name == "docs_blocks.py":  # its docstring's example
            continue
        asked.update(call.findall(path.read_text()))
    return asked


def test_every_shell_block_is_named_and_run():
    asked = _asked_for()
    shell = [b for b in blocks() if b.lang in ("sh", "bash", "shell")]
    not_run = [f"{b.doc}:{b.name}" for b in shell if (b.doc, b.name) not in asked]
    unnamed = [b.doc for b in shell if not b.name]
    assert not unnamed, f"```sh blocks without <!-- block: NAME --> in docs/: {unnamed}"
    assert not not_run, f"docs blocks that no test runs: {not_run}"


def test_every_block_a_test_asks_for_exists():
    present = {(b.doc, b.name) for b in blocks()}
    missing = sorted(f"{doc}:{name}" for doc, name in _asked_for() - present)
    assert not missing, f"tests ask for docs blocks that are not there: {missing}"


def test_block_names_are_unique_per_doc():
    seen: dict[tuple[str, str], int] = {}
    for b in blocks():
        if b.name:
            seen[(b.doc, b.name)] = seen.get((b.doc, b.name), 0) + 1
    assert not [k for k, n in seen.items() if n > 1]
