"""POP3 replies, named once: +OK and -ERR lines (RFC 1939 §3), multi-line responses, and
the extended response codes a client can act on (RFC 2449 §8, RFC 3206).

An -ERR is an `Err` (text and code); `CommandError` carries one out of a command to the
core's single place that answers it. Texts never contain exception messages or paths.
"""

from __future__ import annotations

from dataclasses import dataclass

# Response codes, advertised by CAPA's RESP-CODES and AUTH-RESP-CODE.
IN_USE = "IN-USE"  # RFC 2449 §8.1.1: the maildrop is locked by another session
LOGIN_DELAY = "LOGIN-DELAY"  # RFC 2449 §8.1.2: logged in too soon after the last login
SYS_TEMP = "SYS/TEMP"  # RFC 3206 §4: a passing fault on our side; try again later
AUTH = "AUTH"  # RFC 3206 §5: the credentials, not the system, are the problem


def ok(text: str) -> bytes:
    return f"+OK {text}\r\n".encode()


def err(text: str, code: str | None = None) -> bytes:
    return (f"-ERR [{code}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


def multiline(first: str, lines: list[str]) -> bytes:
    """A multi-line response whose lines never start with "." (capabilities, listings), so
    they need no dot-stuffing (message bodies go through framer.BodyEncoder)."""
    return ("".join([f"+OK {first}\r\n", *(f"{line}\r\n" for line in lines), ".\r\n"])).encode()


@dataclass(frozen=True)
class Err:
    """An -ERR reply: its text and, where one applies, its response code."""

    text: str
    code: str | None = None

    def line(self) -> bytes:
        return err(self.text, self.code)

    def closing(self, why: str) -> bytes:
        """The same reply as the session's last: the reason it ends is added."""
        return err(f"{self.text}; {why}, closing", self.code)


class CommandError(Exception):
    """A command refused: the core answers `err` and the session goes on."""

    def __init__(self, err: Err):
        super().__init__(err.text)
        self.err = err


# -- +OK ------------------------------------------------------------------------------------

SEND_PASS = ok("send PASS")  # whether the user exists is not told (RFC 1939 §13)
AUTH_CONTINUE = b"+ \r\n"  # RFC 5034 §4: an empty challenge, the client sends its response
BEGIN_TLS = ok("begin TLS negotiation")
FORWARDED = ok("client address noted")
NOTHING_TO_DO = ok("nothing to do")
TOP_FOLLOWS = ok("top of message follows")
MECHANISMS = multiline("SASL mechanisms follow", ["PLAIN"])


def greeting(implementation: str, note: str = "") -> bytes:
    return ok(f"{implementation} POP3 server ready{' ' + note if note else ''}")


def maildrop_status(count: int, octets: int) -> bytes:
    """After a login and after RSET."""
    return ok(f"maildrop has {count} messages ({octets} octets)")


def signing_off(implementation: str, removed: int | None = None) -> bytes:
    """QUIT: before login nothing is removed, so nothing is counted."""
    if removed is None:
        return ok(f"{implementation} signing off")
    return ok(f"{implementation} signing off ({removed} messages deleted)")


def capabilities(caps: list[str]) -> bytes:
    return multiline("capability list follows", caps)


# -- -ERR -----------------------------------------------------------------------------------

WRONG_PASSWORD = Err("wrong user name or password", AUTH)
MAILDROP_IN_USE = Err("maildrop already locked by another POP3 session", IN_USE)
# A cluster's: the shard of the maildrop is between two nodes (cluster/follow.py).
MAILDROP_MOVING = Err("your mailbox is moving between servers, try again in a few seconds", SYS_TEMP)
PLAINTEXT_REFUSED = Err("plaintext authentication is not allowed before STLS", AUTH)
IMPERSONATION = Err("acting as another user is not allowed", AUTH)
MALFORMED_PLAIN = Err("malformed AUTH PLAIN response")
AUTH_CANCELLED = Err("authentication cancelled")
USER_FIRST = Err("USER first")
TLS_ACTIVE = Err("TLS is already active")
NO_TLS = Err("STLS is not available: no certificate configured")
APOP_UNSUPPORTED = Err("APOP is not supported: use USER/PASS or AUTH PLAIN (over TLS)")
EMPTY_COMMAND = Err("empty command")
NOT_UTF8 = Err("command is not valid UTF-8")
CONTROL_CHARACTERS = Err("control characters in command")
NOT_REMOVED = Err("some deleted messages were not removed", SYS_TEMP)

# Why a session ends, added to its last -ERR (Err.closing).
TOO_MANY_ERRORS = "too many errors"
TOO_MANY_LOGIN_FAILURES = "too many failed logins"


def wait_between_logins(delay: int) -> Err:
    return Err(f"wait {delay} s between logins", LOGIN_DELAY)


def message_gone(number: int) -> Err:
    """The message was expunged (over IMAP) after this session's snapshot was taken."""
    return Err(f"message {number} was removed by another session")


def internal_error(sid: str) -> Err:
    """An unexpected error: the session id to find it in the log, never its text."""
    return Err(f"internal error, session {sid}", SYS_TEMP)


def usage(syntax: str) -> Err:
    return Err(f"usage: {syntax}")


def not_a_number(what: str, arg: str) -> Err:
    return Err(f"{what} must be a decimal number: {arg[:20]!r}")


def line_too_long(what: str, limit: int) -> Err:
    return Err(f"{what} too long (limit {limit} octets)")


def not_valid(verb: str, logged_in: bool) -> Err:
    return Err(f"{verb} is not valid {'after' if logged_in else 'before'} login")


NOT_A_NODE = Err("XCLIENT is for the nodes of this cluster only")
BAD_XCLIENT = Err("usage: XCLIENT ADDR=address")


def unknown_command(verb: str) -> Err:
    return Err(f"unknown command {verb[:20]!r}")


def unsupported_mechanism(name: str) -> Err:
    return Err(f"unsupported mechanism {name[:20]!r}: PLAIN only")
