"""pop3d's sans-IO core: the POP3 command state machine (RFC 1939) with CAPA and response
codes (RFC 2449, RFC 3206), STLS (RFC 2595) and AUTH PLAIN (RFC 5034). Bytes go in
(`receive_data`), events come out (`next_event`); no sockets, no store, no clock.

Events and who acts on them:
- `Reply(data)`: write it. `Close(data)`: write it, then close the connection.
- `StartTLS(data)`: write the +OK, then start TLS. What the client sent after STLS in the
  clear is already discarded (pipelined plaintext must not count as sent over TLS).
- `Authenticate(user, password)`, `Retrieve(...)`, `Update(uids)`: work for the adapter
  (password check, lock and snapshot; streaming a message; removing messages). Until it
  reports back (`logged_in`/`login_refused`, `finished`/`retrieve_failed`, `updated`, or
  `failed` for an internal error), `next_event` returns None: commands run one at a time,
  in order, however many the client pipelines.

The commands each state allows are the table COMMANDS at the end; UPDATE allows none (the
core reads nothing more once QUIT asked for removal). Around the state machine: lines come
from framer.LineFramer, message bodies go out through framer.BodyEncoder, the snapshot and
its marks are maildrop.Maildrop, and every reply is named in replies. Limits: a line is at
most framer.MAX_LINE octets; MAX_ERRORS bad commands or MAX_LOGIN_FAILURES refused logins
end the session.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

from pop3d import replies
from pop3d.framer import MAX_LINE, LineFramer, LineTooLong
from pop3d.maildrop import EXPIRE_NEVER, Maildrop
from pop3d.replies import CommandError, Err, err, ok

# The core's face; err is here for pop3d.protocol, which answers refused connections with it.
__all__ = ["AUTHORIZATION", "TRANSACTION", "UPDATE", "COMMANDS", "MAX_LINE", "POP3Core", "Settings", "Event",
           "Reply", "Close", "StartTLS", "Authenticate", "Retrieve", "Update", "err"]

AUTHORIZATION, TRANSACTION, UPDATE = "AUTHORIZATION", "TRANSACTION", "UPDATE"  # RFC 1939 §3

MAX_NUMBER_DIGITS = 10
MAX_ERRORS = 20
MAX_LOGIN_FAILURES = 3


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
    # PLAIN's authorization identity when it is not `user`: a cluster peer's proxy logging in
    # as its client's user, `user` its node's name, `password` its proof (pop3d/session.py).
    authzid: str = ""


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
    # The client is a live node of this cluster (a proxy): it may name the address of the
    # client it relays with XCLIENT ADDR= (Dovecot's and Postfix's command), for logs and
    # the login throttle here. Nobody else is believed.
    cluster_peer: bool = False
    greeting_note: str = ""  # a cluster's: the nonce a node's proxy proves itself for (wire/node_proof.py)
    expire: str = EXPIRE_NEVER  # RFC 2449 §6.7: EXPIRE_NEVER, or EXPIRE_AT_QUIT to remove what RETR sent


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
        self._framer = LineFramer(MAX_LINE)
        self._user_for_pass: str | None = None  # from USER, for the PASS that follows
        self._plain_response_next = False  # AUTH PLAIN without an initial response was answered "+ "
        self._pending: Event | None = None
        self.verb = ""  # the last command's name (OTHER for one not known), for metrics
        self.forwarded_for: str | None = None  # XCLIENT ADDR= from a cluster peer: the client it relays

    def greeting(self) -> bytes:
        return replies.greeting(self.settings.implementation, self.settings.greeting_note)

    def receive_data(self, data: bytes) -> None:
        if not self.closed:
            self._framer.feed(data)

    def buffered(self) -> int:
        return self._framer.buffered()

    def take_unread(self) -> bytes:
        """The bytes not yet read as commands (a cluster's proxy relays them to the owner)."""
        return self._framer.take_unread()

    def next_event(self) -> Event | None:
        if self._pending is not None or self.closed or self.state == UPDATE:
            return None
        line = self._framer.next_line()
        if line is None:
            return None
        event = self._command(line)
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
        return Reply(replies.maildrop_status(maildrop.count(), maildrop.octets()))

    def login_refused(self, refusal: Err, *, counts: bool = True) -> Reply | Close:
        """A failed login; `counts` is False when the password was right (IN-USE, LOGIN-DELAY)."""
        self._pending = None
        if counts:
            self.login_failures += 1
            if self.login_failures >= MAX_LOGIN_FAILURES:
                self.closed = True
                return Close(refusal.closing(replies.TOO_MANY_LOGIN_FAILURES))
        return Reply(refusal.line())

    def finished(self, event: Retrieve) -> None:
        """The message of `event` was sent whole (with its terminator)."""
        self._pending = None
        if event.lines is None and self.maildrop is not None:
            self.maildrop.sent_whole(event.number)

    def retrieve_failed(self, refusal: Err) -> Reply:
        """The message could not be opened (nothing of it was sent)."""
        self._pending = None
        return Reply(refusal.line())

    def updated(self, removed: int | None) -> Close:
        """The end of UPDATE: `removed` messages removed, or None if removing failed."""
        self._pending = None
        self.closed = True
        if removed is None:
            return Close(replies.NOT_REMOVED.line())
        return Close(replies.signing_off(self.settings.implementation, removed))

    def failed(self) -> Reply | Close:
        """An internal error in the adapter's work for the pending event: -ERR with the
        session id, never the error's text."""
        pending, self._pending = self._pending, None
        reply = replies.internal_error(self.settings.sid).line()
        if isinstance(pending, Update):
            self.closed = True
            return Close(reply)
        return Reply(reply)

    # -- commands ------------------------------------------------------------------------------

    def _command(self, line: bytes | LineTooLong) -> Event:
        self.verb = "OTHER"
        if self._plain_response_next:
            self.verb = "AUTH"
            self._plain_response_next = False
            if isinstance(line, LineTooLong):
                return self._refuse(replies.line_too_long("AUTH response", self._framer.max_line))
            return self._plain_response(line)
        if isinstance(line, LineTooLong):
            return self._refuse(replies.line_too_long("line", self._framer.max_line))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse(replies.NOT_UTF8)
        if any(c < " " or c == "\x7f" for c in text):
            return self._refuse(replies.CONTROL_CHARACTERS)
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        if verb in KNOWN_VERBS:
            self.verb = verb
        handler = COMMANDS[self.state].get(verb)
        if handler is None:
            if not verb:
                return self._refuse(replies.EMPTY_COMMAND)
            if verb == "APOP":
                return self._refuse(replies.APOP_UNSUPPORTED)
            if verb in KNOWN_VERBS:
                return self._refuse(replies.not_valid(verb, logged_in=self.state != AUTHORIZATION))
            return self._refuse(replies.unknown_command(verb))
        if verb not in ("USER", "PASS"):
            self._user_for_pass = None  # PASS must follow USER at once (RFC 1939 §7)
        try:
            return handler(self, rest)
        except CommandError as e:
            return self._refuse(e.err)

    def _refuse(self, refusal: Err) -> Reply | Close:
        """The one place a command's -ERR is answered, and bad commands are counted."""
        self._user_for_pass = None  # a refused line between USER and PASS breaks the pair too
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            return Close(refusal.closing(replies.TOO_MANY_ERRORS))
        return Reply(refusal.line())

    @staticmethod
    def _arguments(rest: str, low: int, high: int, syntax: str) -> list[str]:
        args = rest.split()
        if not low <= len(args) <= high:
            raise CommandError(replies.usage(syntax))
        return args

    @staticmethod
    def _number(arg: str, what: str = "message number") -> int:
        if not arg.isascii() or not arg.isdigit() or len(arg) > MAX_NUMBER_DIGITS:
            raise CommandError(replies.not_a_number(what, arg))
        return int(arg)

    def _check_auth_allowed(self) -> None:
        if not (self.tls_active or self.settings.plaintext_auth):
            raise CommandError(replies.PLAINTEXT_REFUSED)

    def capabilities(self) -> list[str]:
        """RFC 2449 §6: what CAPA lists in the current state."""
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

    # AUTHORIZATION, and the commands every state allows

    def _capa(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "CAPA")
        return Reply(replies.capabilities(self.capabilities()))

    def _user(self, rest: str) -> Event:
        self._check_auth_allowed()
        if not rest.strip() or len(rest) > 255:
            raise CommandError(replies.usage("USER name"))
        self._user_for_pass = rest.strip()
        return Reply(replies.SEND_PASS)

    def _pass(self, rest: str) -> Event:
        self._check_auth_allowed()
        user, self._user_for_pass = self._user_for_pass, None
        if user is None:
            raise CommandError(replies.USER_FIRST)
        if not rest:
            raise CommandError(replies.usage("PASS password"))
        return Authenticate(user, rest, "USER")  # the password is the rest of the line, spaces and all

    def _auth(self, rest: str) -> Event:
        args = self._arguments(rest, 0, 2, "AUTH [PLAIN [initial-response]]")
        if not args:  # the mechanism list, as many clients probe for it
            return Reply(replies.MECHANISMS)
        if args[0].upper() != "PLAIN":
            raise CommandError(replies.unsupported_mechanism(args[0]))
        self._check_auth_allowed()
        if len(args) == 1:
            self._plain_response_next = True
            return Reply(replies.AUTH_CONTINUE)
        return self._plain_response(args[1].encode())

    def _plain_response(self, response: bytes) -> Event:
        """RFC 4616: authzid NUL authcid NUL password, in base64 ("=" for empty)."""
        response = response.strip()
        if response == b"*":  # RFC 5034 §4: the client cancels
            return self._refuse(replies.AUTH_CANCELLED)
        try:
            decoded = base64.b64decode(response, validate=True) if response != b"=" else b""
            authzid, authcid, password = decoded.split(b"\0")
            user, secret = authcid.decode(), password.decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return self.login_refused(replies.MALFORMED_PLAIN)
        if authzid and authzid != authcid:
            if self.settings.cluster_peer and self.settings.greeting_note and b"@" not in authcid:
                try:  # a node's proxy, for its client's user: the session checks its proof
                    return Authenticate(user, secret, "PLAIN", authzid=authzid.decode())
                except UnicodeDecodeError:
                    return self.login_refused(replies.MALFORMED_PLAIN)
            return self.login_refused(replies.IMPERSONATION)
        return Authenticate(user, secret, "PLAIN")

    def _xclient(self, rest: str) -> Event:
        """A cluster peer's proxy names the client it relays (and asks this node to serve the
        session itself, never to proxy it on: pop3d/session.py)."""
        if not self.settings.cluster_peer:
            raise CommandError(replies.NOT_A_NODE)
        fields = dict(arg.partition("=")[::2] for arg in rest.split()[:8])
        address = fields.get("ADDR", "")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise CommandError(replies.BAD_XCLIENT) from None
        self.forwarded_for = address
        return Reply(replies.FORWARDED)

    def _stls(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "STLS")
        if self.tls_active:
            raise CommandError(replies.TLS_ACTIVE)
        if not self.settings.tls_available:
            raise CommandError(replies.NO_TLS)
        # RFC 2595 §4 / the CVE-2011-0411 class: nothing sent before the handshake counts.
        self._framer.clear()
        self.tls_active = True
        return StartTLS(replies.BEGIN_TLS)

    def _quit(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "QUIT")
        if self.state == AUTHORIZATION:
            return Close(replies.signing_off(self.settings.implementation))
        self.state = UPDATE  # RFC 1939 §6
        return Update(self._maildrop().to_remove(self.settings.expire))

    # TRANSACTION (the maildrop is there)

    def _maildrop(self) -> Maildrop:
        assert self.maildrop is not None
        return self.maildrop

    def _stat(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "STAT")
        maildrop = self._maildrop()
        return Reply(ok(f"{maildrop.count()} {maildrop.octets()}"))

    def _list(self, rest: str) -> Event:
        args = self._arguments(rest, 0, 1, "LIST [message]")
        maildrop = self._maildrop()
        if args:
            number = self._number(args[0])
            _, size = maildrop.message(number)
            return Reply(ok(f"{number} {size}"))
        lines = [f"{number} {size}" for number, _, size in maildrop.undeleted()]
        return Reply(replies.multiline(f"{maildrop.count()} messages ({maildrop.octets()} octets)", lines))

    def _uidl(self, rest: str) -> Event:
        args = self._arguments(rest, 0, 1, "UIDL [message]")
        maildrop = self._maildrop()
        if args:
            number = self._number(args[0])
            uid, _ = maildrop.message(number)
            return Reply(ok(f"{number} {maildrop.uidl(uid)}"))
        lines = [f"{number} {maildrop.uidl(uid)}" for number, uid, _ in maildrop.undeleted()]
        return Reply(replies.multiline("unique-id listing follows", lines))

    def _retr(self, rest: str) -> Event:
        args = self._arguments(rest, 1, 1, "RETR message")
        number = self._number(args[0])
        uid, size = self._maildrop().message(number)
        return Retrieve(number, uid, size, None, ok(f"{size} octets"))

    def _top(self, rest: str) -> Event:
        args = self._arguments(rest, 2, 2, "TOP message lines")
        number = self._number(args[0])
        lines = self._number(args[1], "line count")
        uid, size = self._maildrop().message(number)
        return Retrieve(number, uid, size, lines, replies.TOP_FOLLOWS)

    def _dele(self, rest: str) -> Event:
        args = self._arguments(rest, 1, 1, "DELE message")
        number = self._number(args[0])
        self._maildrop().delete(number)
        return Reply(ok(f"message {number} deleted"))

    def _noop(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "NOOP")
        return Reply(replies.NOTHING_TO_DO)

    def _rset(self, rest: str) -> Event:
        self._arguments(rest, 0, 0, "RSET")
        maildrop = self._maildrop()
        maildrop.undelete_all()
        return Reply(replies.maildrop_status(maildrop.count(), maildrop.octets()))


# -- the state table ----------------------------------------------------------------------

Handler = Callable[[POP3Core, str], Event]

# RFC 1939 §4-6, RFC 2449 §5 (CAPA in every state but UPDATE), RFC 2595 §4, RFC 5034 §4.
COMMANDS: dict[str, dict[str, Handler]] = {
    AUTHORIZATION: {"CAPA": POP3Core._capa, "USER": POP3Core._user, "PASS": POP3Core._pass,
                    "AUTH": POP3Core._auth, "STLS": POP3Core._stls, "QUIT": POP3Core._quit,
                    "XCLIENT": POP3Core._xclient},
    TRANSACTION: {"CAPA": POP3Core._capa, "STAT": POP3Core._stat, "LIST": POP3Core._list, "RETR": POP3Core._retr,
                  "TOP": POP3Core._top, "DELE": POP3Core._dele, "NOOP": POP3Core._noop, "RSET": POP3Core._rset,
                  "UIDL": POP3Core._uidl, "QUIT": POP3Core._quit},
    UPDATE: {},
}
# Verbs a state refuses as "not valid before/after login" rather than as unknown.
KNOWN_VERBS = frozenset(verb for table in COMMANDS.values() for verb in table)
