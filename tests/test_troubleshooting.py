"""docs/troubleshooting.md names only events the code logs, at the level it logs them, and
names every event logged at warning or error (tests/log_events.py reads them from the code)."""

from __future__ import annotations

import ast
import re

from log_events import PACKAGES, REPO, levels_of, events

PAGE = REPO / "docs" / "troubleshooting.md"
# An entry: "### `event=NAME` (level)".
_ENTRY = re.compile(r"^### `event=([\w.]+)` \((\w+)\)$", re.MULTILINE)
# Any other mention of an event in the text.
_MENTION = re.compile(r"`event=([\w.]+)")


def _entries(text: str) -> list[tuple[str, str]]:
    return _ENTRY.findall(text)


def test_every_event_the_page_names_is_logged_at_that_level():
    text = PAGE.read_text()
    logged = events()
    entries = _entries(text)
    assert len(entries) >= 50, "the page's entries are `### \\`event=NAME\\` (level)` headings"
    headings = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(headings) == len(entries), f"headings not of the form `event=NAME` (level): {headings}"
    wrong = [f"{name} ({level})" for name, level in entries
             if level not in {site.level for site in logged.get(name, [])}]
    assert not wrong, f"docs/troubleshooting.md names events the code does not log (so): {wrong}"
    mentioned = set(_MENTION.findall(text)) - set(logged)
    assert not mentioned, f"docs/troubleshooting.md mentions events the code does not log: {sorted(mentioned)}"


def test_every_warning_and_error_event_has_an_entry():
    documented = {name for name, _ in _entries(PAGE.read_text())}
    problems = sorted({name for name, sites in events().items() for site in sites
                       if site.level in ("warning", "error")} - documented)
    assert not problems, f"events logged at warning or error that docs/troubleshooting.md does not explain: {problems}"


def test_the_collector_sees_each_form_of_log_call():
    logged = events()
    assert {s.level for s in logged["worker_crash_loop"]} == {"error"}  # self.log.error("...", ...)
    assert {s.level for s in logged["service"]} == {"info", "debug"}  # (log.info if ... else log.debug)(...)
    assert "queue_held" in logged and "queue_released" in logged  # log.info("a" if held else "b")
    assert "no_such_event" not in logged
    assert _entries("### `event=x` (info)\n### `event=y.z` (error)\n") == [("x", "info"), ("y.z", "error")]


def test_no_log_call_overwrites_a_field_of_the_line():
    """ts, level, logger and event open every line (conf/logfmt.py): a field of the same name
    makes a second `event=` that logfmt readers take instead of the first. `pid=` too: the
    supervisor's lines name their child's as `worker_pid=`, after serve's own `pid=`."""
    reserved = {"ts", "level", "logger", "event", "pid"}
    clashes = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and levels_of(node.func) and node.args:
                    names = {k.arg for k in node.keywords} & reserved
                    if names:
                        clashes.append(f"{path.relative_to(REPO)}:{node.lineno} {sorted(names)}")
    assert not clashes, f"log calls with a field named like the line's own: {clashes}"

