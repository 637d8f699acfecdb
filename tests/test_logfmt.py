"""Log lines: one logfmt line per event, context ids carried by bound loggers, secrets
redacted, hostile values unable to forge a second line or a second field."""

from __future__ import annotations

import io
import os

import pytest

from conf.logfmt import EventLogger, setup_logging


@pytest.fixture
def captured():
    stream = io.StringIO()
    setup_logging("debug", stream)
    yield stream
    setup_logging("info")


def test_one_line_per_event_with_bound_context(captured):
    log = EventLogger("mtad.smtp").bind(sid="A1B2")
    log.info("connect", client="192.0.2.7")
    log.bind(user="alice@example.test").info("auth", result="ok")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split(" ")[1:] == [
        "level=info", "logger=mtad.smtp", f"pid={os.getpid()}", "event=connect", "sid=A1B2", "client=192.0.2.7"
    ]
    assert lines[1].endswith("event=auth sid=A1B2 user=alice@example.test result=ok")
    assert lines[0].startswith("ts=") and lines[0].split(" ")[0].endswith("Z")


def test_secrets_are_redacted(captured):
    EventLogger("imapd").info("login", user="alice", password="hunter2", token="abc")
    line = captured.getvalue()
    assert "hunter2" not in line and "abc" not in line
    assert "password=[redacted]" in line and "token=[redacted]" in line


def test_hostile_values_stay_in_their_field(captured):
    EventLogger("mtad").warning("bad_command", line='x\r\nts=forged level=error event="fake"', empty="")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1
    assert r'line="x\r\nts=forged level=error event=\"fake\""' in lines[0]
    assert 'empty=""' in lines[0]


def test_errors_keep_their_traceback_on_the_same_line(captured):
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        EventLogger("storage").error("deliver_failed", exc_info=True, qid="Q1")
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1
    assert "traceback=" in lines[0] and "RuntimeError: disk on fire" in lines[0]


def test_levels_filter(captured):
    setup_logging("warning", captured)
    log = EventLogger("pop3d")
    log.info("hidden")
    log.warning("shown")
    assert "event=hidden" not in captured.getvalue()
    assert "event=shown" in captured.getvalue()


def test_values_are_quoted_only_when_they_must_be(captured):
    EventLogger("mtad").info("values", plain="alice@example.test:250", number=-5, flag=True, none=None,
                             name="Zoë", spaced="a b", equals="a=b", nul="a\x00b", sep="a\u2028b",
                             listed=["x", "y z"])
    line = captured.getvalue().rstrip("\n")
    assert line.endswith(
        'event=values plain=alice@example.test:250 number=-5 flag=true none="" name=Zoë spaced="a b" '
        'equals="a=b" nul="a\\x00b" sep="a\\x2028b" listed="x,y z"')
