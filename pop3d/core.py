"""pop3d's sans-IO core: POP3 (RFC 1939) with CAPA and response codes (RFC 2449, RFC 3206),
STLS (RFC 2595) and AUTH PLAIN (RFC 5034). Bytes go in (`receive_data`), events come out
(`next_event`); no sockets, no store, no clock.

Events and who acts on them:
- `Reply(data)`: write it. `Close(data)`: write it, then close the connection.
- `StartTLS(data)`: write the +OK, then start TLS. What the client sent after STLS in the
  clear is already discarded (pipelined plaintext must not count as sent over TLS).
- `Authenticate(user, password)`, `Retrieve(...)`, `Update(uids)`: work for the adapter
  (password check, lock and snapshot; streaming a message; removing messages). Until it
  reports back (`logged_in`/`login_refused`, `finished`/`retrieve_failed`, `updated`, or
  `failed` for an internal error), `next_event` returns None: commands run one at a time,
  in order, however many the client pipelines.

The commands each state allows are the table COMMANDS. The maildrop is the snapshot taken
at login (`Maildrop`): DELE marks a number, RSET unmarks, and only QUIT in TRANSACTION (the
UPDATE state, RFC 1939 §6) asks for removal; a connection that drops deletes nothing.

Message bodies are streamed through `BodyEncoder`, which dot-stuffs (RFC 1939 §3) and cuts
TOP's output wherever the chunk edges fall, and ends the response with CRLF "." CRLF.
Limits: a line is at most MAX_LINE octets; MAX_ERRORS bad commands or MAX_LOGIN_FAILURES
refused logins end the session.
"""

from __future__ import annotations

import base64
import binascii
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"

# RFC 2449 §4 caps commands at 255 octets, but RFC 5034 §4 lets an AUTH response be longer:
# one generous limit for every line.
MAX_LINE = 8 * 1024
MAX_NUMBER_DIGITS = 10
MAX_ERRORS = 20
MAX_LOGIN_FAILURES = 3

# Response codes (RFC 2449 §8, RFC 3206).
IN_USE = "IN-USE"
LOGIN_DELAY = "LOGIN-DELAY"
SYS_TEMP = "SYS/TEMP"
SYS_PERM = "SYS/PERM"
AUTH = "AUTH"

COMMANDS: dict[str, dict[str, str]] = {
    AUTHORIZATION: {"CAPA": "capa", "USER": "user", "PASS": "pass_", "AUTH": "auth", "STLS": "stls",
                    "QUIT": "quit"},
    TRANSACTION: {"CAPA": "capa", "STAT": "stat", "LIST": "list_", "RETR": "retr", "TOP": "top", "DELE": "dele",
                  "NOOP": "noop", "RSET": "rset", "UIDL": "uidl", "QUIT": "quit"},
    UPDATE: {},
}
KNOWN_VERBS = frozenset(verb for table in COMMANDS.values() for verb in table) | {"APOP"}


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    data: bytes


@dataclass(frozen=True)
class Close:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    data: bytes


@dataclass(frozen=True)
class Authenticate:
    user: str
    password: str = field(repr=False)
    mechanism: str  # "USER" (USER/PASS) or "PLAIN"


@dataclass(frozen=True)
class Retrieve:
    number: int
    uid: int
    size: int
    lines: int | None  # TOP's body line count; None for RETR
    ok: bytes  # the +OK line, to send once the message is open


@dataclass(frozen=True)
class Update:
    uids: tuple[int, ...]  # to remove, ascending


Event = Reply | Close | StartTLS | Authenticate | Retrieve | Update


@dataclass(frozen=True)
class Settings:
    sid: str  # the session id, shown in internal-error replies
    implementation: str  # "Postroom 0.1"
    tls_available: bool  # a certificate is configured, so STLS can be offered
    tls_active: bool  # implicit TLS (port 995)
    plaintext_auth: bool  # passwords allowed without TLS
    login_delay: int = 0  # seconds between logins (RFC 2449 §6.5); 0: not advertised
    expire: str = "NEVER"  # RFC 2449 §6.7: "NEVER", or "0" to remove retrieved messages at QUIT


class CommandError(Exception):
    def __init__(self, text: str, code: str | None = None):
        super().__init__(text)
        self.text, self.code = text, code


def ok(text: str) -> bytes:
    return f"+OK {text}\r\n".encode()


def err(text: str, code: str | None = None) -> bytes:
    return (f"-ERR [{code}] {text}\r\n" if code else f"-ERR {text}\r\n").encode()


def multiline(first: str, lines: list[str]) -> bytes:
    """A multi-line response whose lines never start with "." (capabilities, listings)."""
    return ("".join([f"+OK {first}\r\n", *(f"{line}\r\n" for line in lines), ".\r\n"])).encode()


# -- framing ------------------------------------------------------------------------------


class LineTooLong:
    """A line over the limit: its bytes are discarded up to its end."""


TOO_LONG = LineTooLong()


class LineFramer:
    """Bytes into lines (CRLF, or a bare LF, ends one); memory stays bounded by `max_line`
    plus whatever complete lines wait unread (the adapter stops reading when that grows)."""

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # no LF in _buffer[:_scanned]: a line fed byte by byte is scanned once
        self._skipping = False  # inside an over-long line, already reported

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def buffered(self) -> int:
        return len(self._buffer)

    def clear(self) -> None:
        self._buffer.clear()
        self._scanned = 0
        self._skipping = False

    def next_line(self) -> bytes | LineTooLong | None:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if self._skipping:
                if end < 0:
                    self._buffer.clear()
                    return None
                del self._buffer[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self._buffer) > self.max_line:
                    self._buffer.clear()
                    self._scanned = 0
                    self._skipping = True
                    return TOO_LONG
                self._scanned = len(self._buffer)
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) + 2 > self.max_line:
                return TOO_LONG
            return line


# -- message bodies -----------------------------------------------------------------------


class BodyEncoder:
    """A stored message (CRLF lines) as the body of a multi-line response: each line that
    starts with "." gets one more (RFC 1939 §3), for RETR the whole message, for TOP the
    header, the blank line and `lines` body lines. Chunks may be cut anywhere; `done` says
    TOP needs no more input; `end()` is the terminator (after a CRLF if the message did not
    end with one)."""

    def __init__(self, lines: int | None = None):
        self._lines_left = lines
        self._in_header = lines is not None
        self._line_start = True  # the next byte starts a line
        self._line_head = b""  # the first (up to two) bytes of the current line, for TOP
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._lines_left is not None:
            cut = self._cut(chunk)
            if cut is not None:
                chunk = chunk[:cut]
                self.done = True
        return self._stuff(chunk)

    def end(self) -> bytes:
        return b".\r\n" if self._line_start else b"\r\n.\r\n"

    def _stuff(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = data.replace(b"\n.", b"\n..")
        if self._line_start and data[:1] == b".":
            out = b"." + out
        self._line_start = data[-1:] == b"\n"
        return out

    def _cut(self, chunk: bytes) -> int | None:
        """Where TOP's output ends within `chunk` (just after a line's LF), or None."""
        pos = 0
        while True:
            end = chunk.find(b"\n", pos)
            if end < 0:
                self._line_head = (self._line_head + chunk[pos : pos + 2])[:2]
                return None
            head = (self._line_head + chunk[pos : min(end, pos + 2)])[:2]
            self._line_head = b""
            pos = end + 1
            if self._in_header:
                if head in (b"", b"\r"):  # the blank line that ends the header
                    self._in_header = False
                    if self._lines_left == 0:
                        return pos
            else:
                assert self._lines_left is not None
                self._lines_left -= 1
                if self._lines_left <= 0:
                    return pos


# -- the maildrop snapshot ----------------------------------------------------------------


class Maildrop:
    """The messages of the maildrop as they were at login, numbered from 1, with the
    session's deletion marks. UIDLs are "<UIDVALIDITY>.<UID>": stable, never reused.
    Compact (12 bytes a message) and with its octet total kept as marks change: STAT and
    LIST on a big maildrop cost no walk over it."""

    def __init__(self, uidvalidity: int, messages: Iterable[tuple[int, int]]):
        self.uidvalidity = uidvalidity
        self.uids = array("I")  # ascending
        self.sizes = array("Q")
        for uid, size in messages:
            self.uids.append(uid)
            self.sizes.append(size)
        self.deleted: set[int] = set()  # message numbers
        self.retrieved: set[int] = set()  # message numbers fully sent by RETR
        self._octets = sum(self.sizes)

    def count(self) -> int:
        return len(self.uids) - len(self.deleted)

    def octets(self) -> int:
        return self._octets

    def message(self, number: int) -> tuple[int, int]:
        if not 1 <= number <= len(self.uids):
            raise CommandError(f"no such message, only {len(self.uids)} in maildrop")
        if number in self.deleted:
            raise CommandError(f"message {number} already deleted")
        return self.uids[number - 1], self.sizes[number - 1]

    def delete(self, number: int) -> None:
        """Mark a message (checked with `message` first)."""
        if number not in self.deleted:
            self.deleted.add(number)
            self._octets -= self.sizes[number - 1]

    def undelete_all(self) -> None:
        self.deleted.clear()
        self._octets = sum(self.sizes)

    def live(self):
        """(number, uid, size) of every message not marked deleted."""
        for index, uid in enumerate(self.uids):
            if index + 1 not in self.deleted:
                yield index + 1, uid, self.sizes[index]

    def uidl(self, uid: int) -> str:
        return f"{self.uidvalidity}.{uid}"


# -- the state machine --------------------------------------------------------------------


class POP3Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = AUTHORIZATION
        self.tls_active = settings.tls_active
        self.maildrop: Maildrop | None = None
        self.errors = 0
        self.login_failures = 0
        self.closed = False
        self._framer = LineFramer()
        self._user: str | None = None  # from USER, for the PASS that follows
        self._sasl = False  # the next line is an AUTH PLAIN response
        self._pending: Event | None = None

    def greeting(self) -> bytes:
        return ok(f"{self.settings.implementation} POP3 server ready")

    def receive_data(self, data: bytes) -> None:
        if not self.closed:
            self._framer.feed(data)

    def buffered(self) -> int:
        return self._framer.buffered()

    def next_event(self) -> Event | None:
        if self._pending is not None or self.closed or self.state == UPDATE:
            return None
        line = self._framer.next_line()
        if line is None:
            return None
        event = self._line(line)
        if isinstance(event, (Authenticate, Retrieve, Update)):
            self._pending = event
        elif isinstance(event, Close):
            self.closed = True
        return event

    # -- outcomes the adapter reports ----------------------------------------------------------

    def logged_in(self, maildrop: Maildrop) -> Reply:
        self._pending = None
        self.maildrop = maildrop
        self.state = TRANSACTION
        return Reply(ok(f"maildrop has {maildrop.count()} messages ({maildrop.octets()} octets)"))

    def login_refused(self, text: str, code: str | None = AUTH, *, counts: bool = True) -> Reply | Close:
        """A failed login; `counts` is False when the password was right (IN-USE, LOGIN-DELAY)."""
        self._pending = None
        if counts:
            self.login_failures += 1
            if self.login_failures >= MAX_LOGIN_FAILURES:
                self.closed = True
                return Close(err(f"{text}; too many failed logins, closing", code))
        return Reply(err(text, code))

    def finished(self, event: Retrieve) -> None:
        """The message of `event` was sent whole (with its terminator)."""
        self._pending = None
        if event.lines is None and self.maildrop is not None:
            self.maildrop.retrieved.add(event.number)

    def retrieve_failed(self, text: str, code: str | None = SYS_TEMP) -> Reply:
        """The message could not be opened (nothing of it was sent)."""
        self._pending = None
        return Reply(err(text, code))

    def updated(self, removed: int | None) -> Close:
        """The end of UPDATE: `removed` messages removed, or None if removing failed."""
        self._pending = None
        self.closed = True
        if removed is None:
            return Close(err("some deleted messages were not removed", SYS_TEMP))
        return Close(ok(f"{self.settings.implementation} signing off ({removed} messages deleted)"))

    def failed(self) -> Reply | Close:
        """An internal error in the adapter's work for the pending event: -ERR with the
        session id, never the error's text."""
        pending, self._pending = self._pending, None
        text = f"internal error, session {self.settings.sid}"
        if isinstance(pending, Update):
            self.closed = True
            return Close(err(text, SYS_TEMP))
        return Reply(err(text, SYS_TEMP))

    # -- commands ------------------------------------------------------------------------------

    def _line(self, line: bytes | LineTooLong) -> Event:
        if self._sasl:
            self._sasl = False
            if isinstance(line, LineTooLong):
                return self._error(f"AUTH response too long (limit {MAX_LINE} octets)")
            return self._plain_response(line)
        if isinstance(line, LineTooLong):
            return self._error(f"line too long (limit {MAX_LINE} octets)")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error("command is not valid UTF-8")
        if any(c < " " or c == "\x7f" for c in text):
            return self._error("control characters in command")
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        handler = COMMANDS[self.state].get(verb)
        if handler is None:
            if not verb:
                return self._error("empty command")
            if verb == "APOP":
                return self._error("APOP is not supported: use USER/PASS or AUTH PLAIN (over TLS)")
            if verb in KNOWN_VERBS:
                where = "before login" if self.state == AUTHORIZATION else "after login"
                return self._error(f"{verb} is not valid {where}")
            return self._error(f"unknown command {verb[:20]!r}")
        if verb not in ("USER", "PASS"):
            self._user = None  # PASS must follow USER at once (RFC 1939 §7)
        try:
            return getattr(self, f"_cmd_{handler}")(rest)
        except CommandError as e:
            return self._error(e.text, e.code)

    def _error(self, text: str, code: str | None = None) -> Reply | Close:
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return Close(err(f"{text}; too many errors, closing", code))
        return Reply(err(text, code))

    @staticmethod
    def _args(rest: str, low: int, high: int, usage: str) -> list[str]:
        args = rest.split()
        if not low <= len(args) <= high:
            raise CommandError(f"usage: {usage}")
        return args

    @staticmethod
    def _number(arg: str, what: str = "message number") -> int:
        if not arg.isascii() or not arg.isdigit() or len(arg) > MAX_NUMBER_DIGITS:
            raise CommandError(f"{what} must be a decimal number: {arg[:20]!r}")
        return int(arg)

    def _auth_allowed(self) -> None:
        if not (self.tls_active or self.settings.plaintext_auth):
            raise CommandError("plaintext authentication is not allowed before STLS", AUTH)

    def capabilities(self) -> list[str]:
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == AUTHORIZATION:
            if self.tls_active or self.settings.plaintext_auth:
                caps += ["USER", "SASL PLAIN"]
            if self.settings.tls_available and not self.tls_active:
                caps.append("STLS")
        caps.append(f"EXPIRE {self.settings.expire}")
        if self.settings.login_delay:
            caps.append(f"LOGIN-DELAY {self.settings.login_delay}")
        caps.append(f"IMPLEMENTATION {self.settings.implementation}")
        return caps

    def _cmd_capa(self, rest: str) -> Event:
        self._args(rest, 0, 0, "CAPA")
        return Reply(multiline("capability list follows", self.capabilities()))

    def _cmd_user(self, rest: str) -> Event:
        self._auth_allowed()
        if not rest.strip() or len(rest) > 255:
            raise CommandError("usage: USER name")
        self._user = rest.strip()
        return Reply(ok("send PASS"))  # whether the user exists is not told (RFC 1939 §13)

    def _cmd_pass_(self, rest: str) -> Event:
        self._auth_allowed()
        user, self._user = self._user, None
        if user is None:
            raise CommandError("USER first")
        if not rest:
            raise CommandError("usage: PASS password")
        return Authenticate(user, rest, "USER")  # the password is the rest of the line, spaces and all

    def _cmd_auth(self, rest: str) -> Event:
        args = self._args(rest, 0, 2, "AUTH [PLAIN [initial-response]]")
        if not args:  # the mechanism list, as many clients probe for it
            return Reply(multiline("SASL mechanisms follow", ["PLAIN"]))
        if args[0].upper() != "PLAIN":
            raise CommandError(f"unsupported mechanism {args[0][:20]!r}: PLAIN only")
        self._auth_allowed()
        if len(args) == 1:
            self._sasl = True
            return Reply(b"+ \r\n")
        return self._plain_response(args[1].encode())

    def _plain_response(self, response: bytes) -> Event:
        response = response.strip()
        if response == b"*":
            return self._error("authentication cancelled")
        try:
            decoded = base64.b64decode(response, validate=True) if response != b"=" else b""
            authzid, authcid, password = decoded.split(b"\0")
            user, secret = authcid.decode(), password.decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return self.login_refused("malformed AUTH PLAIN response", None)
        if authzid and authzid != authcid:
            return self.login_refused("acting as another user is not allowed")
        return Authenticate(user, secret, "PLAIN")

    def _cmd_stls(self, rest: str) -> Event:
        self._args(rest, 0, 0, "STLS")
        if self.tls_active:
            raise CommandError("TLS is already active")
        if not self.settings.tls_available:
            raise CommandError("STLS is not available: no certificate configured")
        # RFC 2595 §4 / the CVE-2011-0411 class: nothing sent before the handshake counts.
        self._framer.clear()
        self.tls_active = True
        return StartTLS(ok("begin TLS negotiation"))

    def _cmd_quit(self, rest: str) -> Event:
        self._args(rest, 0, 0, "QUIT")
        if self.state == AUTHORIZATION:
            return Close(ok(f"{self.settings.implementation} signing off"))
        assert self.maildrop is not None
        self.state = UPDATE
        doomed = set(self.maildrop.deleted)
        if self.settings.expire == "0":  # RFC 2449 §6.7: an implicit DELE of what RETR sent
            doomed |= self.maildrop.retrieved
        return Update(tuple(sorted(self.maildrop.uids[n - 1] for n in doomed)))

    # TRANSACTION (the maildrop is there)

    def _drop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    def _cmd_stat(self, rest: str) -> Event:
        self._args(rest, 0, 0, "STAT")
        drop = self._drop()
        return Reply(ok(f"{drop.count()} {drop.octets()}"))

    def _cmd_list_(self, rest: str) -> Event:
        args = self._args(rest, 0, 1, "LIST [message]")
        drop = self._drop()
        if args:
            number = self._number(args[0])
            _, size = drop.message(number)
            return Reply(ok(f"{number} {size}"))
        lines = [f"{number} {size}" for number, _, size in drop.live()]
        return Reply(multiline(f"{drop.count()} messages ({drop.octets()} octets)", lines))

    def _cmd_uidl(self, rest: str) -> Event:
        args = self._args(rest, 0, 1, "UIDL [message]")
        drop = self._drop()
        if args:
            number = self._number(args[0])
            uid, _ = drop.message(number)
            return Reply(ok(f"{number} {drop.uidl(uid)}"))
        lines = [f"{number} {drop.uidl(uid)}" for number, uid, _ in drop.live()]
        return Reply(multiline("unique-id listing follows", lines))

    def _cmd_retr(self, rest: str) -> Event:
        args = self._args(rest, 1, 1, "RETR message")
        number = self._number(args[0])
        uid, size = self._drop().message(number)
        return Retrieve(number, uid, size, None, ok(f"{size} octets"))

    def _cmd_top(self, rest: str) -> Event:
        args = self._args(rest, 2, 2, "TOP message lines")
        number = self._number(args[0])
        lines = self._number(args[1], "line count")
        uid, size = self._drop().message(number)
        return Retrieve(number, uid, size, lines, ok("top of message follows"))

    def _cmd_dele(self, rest: str) -> Event:
        args = self._args(rest, 1, 1, "DELE message")
        number = self._number(args[0])
        drop = self._drop()
        drop.message(number)
        drop.delete(number)
        return Reply(ok(f"message {number} deleted"))

    def _cmd_noop(self, rest: str) -> Event:
        self._args(rest, 0, 0, "NOOP")
        return Reply(ok("nothing to do"))

    def _cmd_rset(self, rest: str) -> Event:
        self._args(rest, 0, 0, "RSET")
        drop = self._drop()
        drop.undelete_all()
        return Reply(ok(f"maildrop has {drop.count()} messages ({drop.octets()} octets)"))
