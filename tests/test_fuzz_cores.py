"""Property tests of the three sans-IO protocol cores, and a plain regression test for
each defect they found."""

from __future__ import annotations

import pytest

from core_drivers import SMTPDriver
from imapd.parser import Frame, parse_command
from imapd.syntax import ParseError
from mtad.session import SessionConfig

SMTP_CONFIG = SessionConfig("mx.example.test", max_message_size=10_000, max_recipients=5, tls_available=True)


def smtp_replies(data: bytes, config: SessionConfig = SMTP_CONFIG) -> list[str]:
    driver = SMTPDriver(config)
    driver.feed([data])
    return driver.wire.decode().splitlines()


def parse_failure(line: bytes) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_command(Frame([line]))
    return info.value


# -- regression tests -------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["BDAT ²", "BDAT 1²", "MAIL FROM:<a@b.example> SIZE=²"])
def test_smtp_numbers_are_ascii_digits(command):
    """str.isdigit() takes "²", which int() refuses: a ValueError out of the session."""
    lines = smtp_replies(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test>\r\nRSET\r\n"
                         + command.encode() + b"\r\nNOOP\r\n")
    assert lines[-2:] == ["501 5.5.4 Syntax error in parameters or arguments", "250 2.0.0 OK"]


def test_imap_part_numbers_longer_than_int_allows():
    """int() of over 4300 digits raises ValueError (and is slow below that)."""
    error = parse_failure(b"a FETCH 1 BODY[" + b"1" * 5000 + b"]")
    assert str(error) == "invalid part number" and error.tag == "a"


def test_imap_search_nesting_counts_parentheses():
    """Parentheses restarted the NOT/OR depth count, so 16 groups of 256 NOTs overflowed
    Python's stack (RecursionError) instead of answering LIMIT."""
    error = parse_failure(b"a SEARCH " + (b"NOT " * 256 + b"(") * 15 + b"ALL" + b")" * 15)
    assert error.code == "LIMIT" and error.tag == "a"
    assert parse_command(Frame([b"a SEARCH " + (b"NOT " * 16 + b"(") * 15 + b"ALL" + b")" * 15]))
