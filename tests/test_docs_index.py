"""docs/README.md, the index, lists every page of docs/ and only pages that are there."""

from __future__ import annotations

import re

from docs_blocks import DOCS


def test_the_index_lists_every_page_and_only_those():
    index = (DOCS / "README.md").read_text()
    linked = re.findall(r"^\| \[([\w.-]+\.md)\]\(\1\) \| .+ \|$", index, re.MULTILINE)
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert sorted(set(linked) - set(pages)) == [], "docs/README.md links pages that do not exist"
    assert sorted(set(pages) - set(linked)) == [], "pages of docs/ that docs/README.md does not list"
    assert len(linked) == len(set(linked))
