"""The SMTP session's state table (mtad/states.py), as data and as the session applies it.

EXPECTED is the table written out cell by cell (RFC 5321 §4.1.4, §3.3: a mail transaction
needs a greeting first; RFC 3207 §4.2: so again after STARTTLS). The session is then driven
into each state that reads commands and given every verb: a verb its state does not take is
answered 503 5.5.1 "Bad sequence of commands", any other is not.
"""

from __future__ import annotations

import pytest

from core_drivers import SMTPDriver
from mtad import replies
from mtad.session import COMMANDS, SessionConfig
from mtad.states import ALLOWED, VERBS, State

C, R = State.CONNECTED, State.READY
EXPECTED = {
    #            CONNECTED  READY
    "EHLO":     (True,      True),
    "HELO":     (True,      True),
    "MAIL":     (False,     True),
    "RCPT":     (False,     True),
    "DATA":     (False,     True),
    "BDAT":     (False,     True),
    "RSET":     (True,      True),
    "NOOP":     (True,      True),
    "QUIT":     (True,      True),
    "VRFY":     (True,      True),
    "STARTTLS": (True,      True),
    "AUTH":     (False,     True),
}
# A well-formed line for each verb, so that only the sequence can be wrong.
LINES = {
    "EHLO": b"EHLO client.example.org", "HELO": b"HELO client.example.org",
    "MAIL": b"MAIL FROM:<a@b.example>", "RCPT": b"RCPT TO:<c@example.test>", "DATA": b"DATA",
    "BDAT": b"BDAT 0 LAST", "RSET": b"RSET", "NOOP": b"NOOP", "QUIT": b"QUIT", "VRFY": b"VRFY c",
    "STARTTLS": b"STARTTLS", "AUTH": b"AUTH PLAIN",
}
CONFIG = SessionConfig("mx.example.test", max_message_size=10_000, max_recipients=5, tls_available=True)
BAD_SEQUENCE = replies.BAD_SEQUENCE.lines()


def test_the_table_is_as_written():
    assert set(EXPECTED) == VERBS == set(COMMANDS) == set(LINES)
    assert set(ALLOWED) == set(State)
    for verb, (connected, ready) in EXPECTED.items():
        assert (verb in ALLOWED[C], verb in ALLOWED[R]) == (connected, ready), verb
    # No command is read inside a message or once closed.
    assert ALLOWED[State.DATA] == ALLOWED[State.BDAT] == ALLOWED[State.CLOSED] == frozenset()


def _in_state(state: State) -> SMTPDriver:
    driver = SMTPDriver(CONFIG)
    if state is R:
        driver.feed([b"EHLO client.example.org\r\n"])
    assert driver.session.state is state
    return driver


@pytest.mark.parametrize("state", [C, R])
@pytest.mark.parametrize("verb", sorted(EXPECTED))
def test_the_session_applies_the_table(state, verb):
    driver = _in_state(state)
    before = len(driver.wire)
    driver.feed([LINES[verb] + b"\r\n"])
    reply = bytes(driver.wire[before:])
    allowed = EXPECTED[verb][0 if state is C else 1]
    assert reply, verb
    assert (reply != BAD_SEQUENCE) == allowed, (state, verb, reply)
    if not allowed:
        assert driver.session.state is state


@pytest.mark.parametrize("state", [C, R])
def test_an_unknown_verb_is_500_in_every_state(state):
    driver = _in_state(state)
    before = len(driver.wire)
    driver.feed([b"EXPN staff\r\n", b"HELP\r\n"])
    assert bytes(driver.wire[before:]) == replies.UNKNOWN_COMMAND.lines() * 2


def test_inside_a_message_commands_are_message_bytes():
    driver = _in_state(R)
    driver.feed([b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n"])
    assert driver.session.state is State.DATA and driver.session.receiving
    before = len(driver.wire)
    driver.feed([b"QUIT\r\nRSET\r\n"])
    assert bytes(driver.wire[before:]) == b"" and driver.session.state is State.DATA
    driver.feed([b".\r\n"])
    assert driver.session.state is R and driver.messages == [b"QUIT\r\nRSET\r\n"]
    driver.feed([b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\nBDAT 6\r\nQUIT\r\n"])
    assert driver.session.state is R and driver.wire.endswith(b"250 2.0.0 6 octets received\r\n")
    driver.feed([b"QUIT\r\n"])
    assert driver.session.state is State.CLOSED and driver.closed


def test_starttls_goes_back_to_connected():
    driver = _in_state(R)
    driver.feed([b"STARTTLS\r\n"])
    assert driver.session.state is C
    before = len(driver.wire)
    driver.feed([b"MAIL FROM:<a@b.example>\r\n"])
    assert bytes(driver.wire[before:]) == BAD_SEQUENCE
