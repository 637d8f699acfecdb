"""One IMAP session: its state (RFC 3501 §3), the table of commands each state allows, the
commands of login and of any state, and the dispatch that runs a command to its tagged
answer. The mailbox commands are in imapd.mailboxes, those on the selected mailbox in
imapd.selected, response lines and the store-error table in imapd.answers.

The session knows no sockets and no Twisted: it takes parsed commands (imapd.parser) and
writes response bytes through its `Connection` (imapd.protocol is the Twisted one; the
in-process test tier has another). It is not sans-IO, though: commands are coroutines on
the asyncio loop, one at a time, in order, and anything that touches the disk or takes a
CPU burst (store calls, FETCH rendering, password checks) runs in a thread via
`context.run`, within the account's fair share.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from conf import Config
from conf.logfmt import EventLogger
from imapd import mailboxes, selected
from imapd import responses as r
from imapd.answers import (
    STORE_ERRORS,
    Answer,
    AnsweredItself,
    bad,
    no,
    store_answer,
    tagged_line,
    unavailable,
    untagged_line,
)
from imapd.recent import RecentClaims
from imapd.syntax import Authenticate, Command, Enable, Id, Login, ParseError
from imapd.view import Snapshots, View
from policy.connections import ConnectionLimit
from policy.logins import LoginThrottle
from policy.shares import FairShare
from storage import Accounts, Store, StoreError, Watcher

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = "not authenticated", "authenticated", "selected", "logout"
MAX_LITERAL_BEFORE_LOGIN = 8 * 1024
MAX_LITERAL_COMMAND = 64 * 1024  # any literal but APPEND's message
MAX_BAD_COMMANDS = 20  # in a row, then BYE


class Connection(Protocol):
    """What the session needs from the transport side."""

    peer: str  # the client's IP address
    tls: bool  # TLS is active

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    async def start_tls(self) -> None: ...

    def next_line(self) -> asyncio.Future: ...  # resolves to the next raw client line (IDLE's DONE, SASL)

    def close(self) -> None: ...


@dataclass
class IMAPContext:
    config: Config
    accounts: Accounts
    store: Store
    watcher: Watcher
    throttle: LoginThrottle
    recent: RecentClaims
    snapshots: Snapshots  # UID lists shared by sessions on the same mailbox state
    run: Callable[..., Awaitable[Any]]  # run(function, *args) in a worker thread
    tls: Any  # conf.reactor.ServerTLS for STARTTLS and port 993, or None without a certificate
    version: str
    connections: ConnectionLimit = field(kw_only=True)  # shared by the 143 and 993 listeners
    # Password checks in threads of their own (postroom/daemons.py), and each account's
    # share of the store threads: neither a login flood nor one user's slow SEARCHes in many
    # sessions can keep other users waiting.
    run_login: Callable[..., Awaitable[Any]] | None = field(default=None, kw_only=True)
    shares: FairShare = field(default_factory=lambda: FairShare(4), kw_only=True)


class Session:
    def __init__(self, context: IMAPContext, connection: Connection, sid: str):
        self.context = context
        self.conn = connection
        self.sid = sid
        self.state = NOT_AUTHENTICATED
        self.user: str | None = None
        self.view: View | None = None
        self.condstore = False  # enabled by ENABLE CONDSTORE or a CONDSTORE-aware command
        self.errors = 0  # BAD answers in a row
        self.log = EventLogger("imapd.session").bind(sid=sid)
        self._watch = None
        # The watcher says the selected mailbox changed: a flag, and a future IDLE waits on.
        # (Futures, not tasks: a thousand idle sessions should cost little.)
        self.changed = False
        self.change_waiter: asyncio.Future | None = None
        self.ended = False

    # -- capabilities ---------------------------------------------------------------------

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state == NOT_AUTHENTICATED:
            if self.context.tls is not None and not self.conn.tls:
                caps.append("STARTTLS")
            if self.plaintext_ok():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += ["NAMESPACE", "UIDPLUS", "MOVE", "UNSELECT", "CHILDREN", "SPECIAL-USE", "CREATE-SPECIAL-USE",
                     "LIST-EXTENDED", "LIST-STATUS", "QUOTA",
                     "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE", "CONDSTORE", "STATUS=SIZE",
                     f"APPENDLIMIT={self.max_message_size()}"]
        return " ".join(caps)

    def plaintext_ok(self) -> bool:
        return self.conn.tls or self.context.config.imap.plaintext_auth

    def max_message_size(self) -> int:
        return int(self.context.config.smtp.max_message_size)

    def max_literal(self, command: str) -> int:
        """What the framer accepts as one literal for `command` (RFC 7888 §4: refuse early)."""
        if self.state == NOT_AUTHENTICATED:
            return MAX_LITERAL_BEFORE_LOGIN
        return self.max_message_size() if command == "APPEND" else MAX_LITERAL_COMMAND

    def greeting(self) -> bytes:
        return f"* OK [CAPABILITY {self.capabilities()}] Postroom ready\r\n".encode()

    # -- writing --------------------------------------------------------------------------

    def untagged(self, line: bytes | str) -> None:
        self.conn.write(untagged_line(line))

    def tagged(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        self.conn.write(tagged_line(tag, status, text, code))

    def say_bye(self, text: str) -> None:
        """`* BYE text`, and the session is over (RFC 3501 §7.1.5)."""
        self.untagged(f"BYE {text}")
        self.state = LOGOUT
        self.conn.close()

    # -- dispatch -------------------------------------------------------------------------

    async def handle(self, command: Command) -> None:
        """Run one command to its tagged response."""
        handler = STATES[self.state].get(command.name)
        try:
            if handler is None:
                if command.name not in KNOWN:
                    raise bad("unknown command")
                raise bad(f"{command.name} is not allowed {_STATE_PHRASES[self.state]}")
            result = await handler(self, command)
            code, text = result if isinstance(result, tuple) else (None, result or f"{command.name} completed")
            if self.view is not None and command.name not in ("LOGOUT",):
                await selected.sync(self, expunges=command.name not in selected.NO_EXPUNGE_DURING)
            self.tagged(command.tag, "OK", text, code)
            self.errors = 0
        except AnsweredItself:
            return
        except Answer as answer:
            try:
                if self.view is not None and answer.status == "NO":
                    await selected.sync(self, expunges=command.name not in selected.NO_EXPUNGE_DURING)
            except Answer:
                pass  # the store failed again: the command's own answer is what matters
            self.tagged(command.tag, answer.status, answer.text, answer.code)
            self.note_error(answer.status)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one command, not the session
            self.log.error("command_failed", command=command.name, exc_info=True)
            self.tagged(command.tag, "NO", "internal error (logged on the server)", "SERVERBUG")

    def parse_failed(self, error: ParseError) -> None:
        if error.tag:
            self.tagged(error.tag, error.status, str(error), error.code)
        else:
            self.tagged("*", "BAD", str(error), error.code)
        self.note_error(error.status)

    def note_error(self, status: str) -> None:
        if status != "BAD":
            return
        self.errors += 1
        if self.errors >= MAX_BAD_COMMANDS:
            self.log.warning("closed", reason="bad_commands")
            self.say_bye("too many bad commands")

    # -- the selected mailbox -------------------------------------------------------------

    def open_view(self, view: View) -> None:
        self.view = view
        self.state = SELECTED

    def close_view(self) -> None:
        self.view = None
        self.state = AUTHENTICATED
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def watch(self, name: str) -> None:
        """Be told (`changed`, `change_waiter`) when mailbox `name` changes in the store."""
        if self.ended:
            return  # the client left while SELECT was reading the store
        loop = asyncio.get_running_loop()

        def changed(_state) -> None:  # from the watcher's thread
            loop.call_soon_threadsafe(self._mailbox_changed)

        if self._watch is not None:
            self._watch.cancel()
        self._watch = self.context.watcher.watch(self.user, name, changed)

    def _mailbox_changed(self) -> None:
        self.changed = True
        if self.change_waiter is not None and not self.change_waiter.done():
            self.change_waiter.set_result(None)

    # -- store calls ----------------------------------------------------------------------

    async def run_store(self, operation: Callable, *args, **kwargs):
        """A store operation in a worker thread (within the account's share), its errors
        turned into IMAP answers (imapd.answers.STORE_ANSWERS)."""
        try:
            async with self.context.shares.slot(self.user or self.sid):
                return await self.context.run(functools.partial(operation, **kwargs) if kwargs else operation, *args)
        except STORE_ERRORS as e:
            raise store_answer(e) from None
        except StoreError as e:
            self.log.error("store_failed", error=str(e))
            raise unavailable() from None

    def end(self) -> None:
        """The connection is gone."""
        self.ended = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


# -- any state (RFC 3501 §6.1) --------------------------------------------------------------------

async def capability(session: Session, command: Command):
    session.untagged(f"CAPABILITY {session.capabilities()}")


async def noop(session: Session, command: Command):
    return None


async def logout(session: Session, command: Command):
    session.untagged("BYE logging out")
    session.state = LOGOUT
    session.log.info("logout", user=session.user)
    return None


async def id_(session: Session, command: Id):
    """RFC 2971: the client's ID is logged (bounded), ours is name and version."""
    params = command.params
    if params:
        shown = " ".join(f"{k}={v}" for k, v in list(params.items())[:8])
        session.log.info("client_id", user=session.user, client=shown[:300])
    session.untagged(b"ID " + r.plist([r.string(b"name"), r.string(b"Postroom"), r.string(b"version"),
                                        r.string(session.context.version.encode())]))


async def enable(session: Session, command: Enable):
    """RFC 5161; CONDSTORE is the only extension that needs enabling here."""
    enabled = [c for c in command.capabilities if c == "CONDSTORE"]
    if enabled:
        session.condstore = True
    session.untagged("ENABLED" + "".join(" " + c for c in enabled))


# -- not authenticated (RFC 3501 §6.2) ------------------------------------------------------------

async def starttls(session: Session, command: Command):
    if session.conn.tls:
        raise bad("TLS is already active")
    if session.context.tls is None:
        raise no("TLS is not configured")
    session.tagged(command.tag, "OK", "begin TLS negotiation now")
    await session.conn.start_tls()
    raise AnsweredItself()


async def login(session: Session, command: Login):
    if not session.plaintext_ok():
        raise no("use STARTTLS before LOGIN", "PRIVACYREQUIRED")
    return await log_in(session, command.user, command.password)


async def authenticate(session: Session, command: Authenticate):
    """AUTHENTICATE PLAIN (RFC 4616), with SASL-IR's initial response (RFC 4959)."""
    if command.mechanism != "PLAIN":
        raise no("only AUTHENTICATE PLAIN is supported", "CANNOT")
    if not session.plaintext_ok():
        raise no("use STARTTLS before AUTHENTICATE", "PRIVACYREQUIRED")
    response = command.initial
    if response is None:
        session.conn.write(b"+ \r\n")
        line = (await session.conn.next_line()).strip()
        if line == b"*":
            raise bad("authentication cancelled")
        response = line.decode("ascii", "replace")
    try:
        decoded = base64.b64decode(response, validate=True) if response else b""
        authzid, authcid, password = decoded.split(b"\0")
        user, secret = authcid.decode(), password.decode()
        if authzid and authzid != authcid:
            raise no("acting as another user is not allowed", "AUTHORIZATIONFAILED")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad("malformed PLAIN response") from None
    return await log_in(session, user, secret)


async def log_in(session: Session, user: str, password: str):
    """Check the password (throttled per IP on failure) and enter the authenticated state."""
    context = session.context
    throttle = context.throttle
    async with throttle.checks:
        account = await (context.run_login or context.run)(context.accounts.authenticate, user, password)
    if account is None:
        delay = throttle.failed(session.conn.peer)
        session.log.warning("login_failed", user=user[:100], ip=session.conn.peer, delay=delay)
        await asyncio.sleep(delay)
        raise no("wrong user name or password", "AUTHENTICATIONFAILED")
    throttle.succeeded(session.conn.peer)
    name = str(account.address)  # the store's account name: local@a-label
    await session.run_store(context.store.ensure_account, name)
    session.user = name
    session.state = AUTHENTICATED
    session.log = session.log.bind(user=session.user)
    session.log.info("login", ip=session.conn.peer, tls=session.conn.tls)
    return "CAPABILITY " + session.capabilities(), "logged in"


# -- the state table (RFC 3501 §3): which commands each state allows, and their handlers ---------

Handler = Callable[[Session, Command], Awaitable[Any]]

_ANY: dict[str, Handler] = {"CAPABILITY": capability, "NOOP": noop, "LOGOUT": logout, "ID": id_}
_AUTHENTICATED: dict[str, Handler] = {
    **_ANY,
    "ENABLE": enable,
    "SELECT": mailboxes.select,
    "EXAMINE": mailboxes.select,
    "CREATE": mailboxes.create,
    "DELETE": mailboxes.delete,
    "RENAME": mailboxes.rename,
    "SUBSCRIBE": mailboxes.subscribe,
    "UNSUBSCRIBE": mailboxes.unsubscribe,
    "LIST": mailboxes.list_,
    "LSUB": mailboxes.lsub,
    "NAMESPACE": mailboxes.namespace,
    "STATUS": mailboxes.status,
    "APPEND": mailboxes.append,
    "IDLE": selected.idle,
    "GETQUOTAROOT": mailboxes.getquotaroot,
    "GETQUOTA": mailboxes.getquota,
    "SETQUOTA": mailboxes.setquota,
}
STATES: dict[str, dict[str, Handler]] = {
    NOT_AUTHENTICATED: {**_ANY, "STARTTLS": starttls, "LOGIN": login, "AUTHENTICATE": authenticate},
    AUTHENTICATED: _AUTHENTICATED,
    SELECTED: {
        **_AUTHENTICATED,
        "CHECK": selected.check,
        "CLOSE": selected.close,
        "UNSELECT": selected.unselect,
        "EXPUNGE": selected.expunge,
        "UID EXPUNGE": selected.expunge,
        "SEARCH": selected.search,
        "UID SEARCH": selected.search,
        "FETCH": selected.fetch,
        "UID FETCH": selected.fetch,
        "STORE": selected.store,
        "UID STORE": selected.store,
        "COPY": selected.copy,
        "UID COPY": selected.copy,
        "MOVE": selected.copy,
        "UID MOVE": selected.copy,
    },
    LOGOUT: {},
}
KNOWN = frozenset(name for table in STATES.values() for name in table)
_STATE_PHRASES = {NOT_AUTHENTICATED: "before login", AUTHENTICATED: "without a selected mailbox",
                  SELECTED: "here", LOGOUT: "after LOGOUT"}
