"""An IMAP session's state (RFC 3501 §3) and the primitives every command handler uses:
writing response lines, opening and closing the selected mailbox's view, being told when it
changes, and store calls run in a worker thread within the account's fair share with their
errors turned into answers (imapd.answers).

The handlers (imapd.session for login and any state, imapd.mailboxes, imapd.selected) take
a SessionState; imapd.session's Session adds the dispatch over the table of commands each
state allows. This module sits below all of them, so none imports another in a circle.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from conf import Config
from conf.logfmt import EventLogger
from imapd import utf7
from imapd.appending import AppendSinks
from imapd.answers import STORE_ERRORS, store_answer, tagged_line, unavailable, untagged_line
from imapd.recent import RecentClaims
from imapd.syntax import ParseError
from imapd.view import Snapshots, View
from policy.logins import LoginThrottle
from policy.shares import FairShare
from storage import Accounts, Store, StoreError, Watcher
from wire import node_proof as proof
from wire.connections import ConnectionLimit

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = "not authenticated", "authenticated", "selected", "logout"
PROXIED = "proxied"  # a cluster's: the owner node serves the session, bytes relayed (imapd/proxy.py)
MAX_LITERAL_BEFORE_LOGIN = 8 * 1024
MAX_LITERAL_COMMAND = 64 * 1024  # any literal but APPEND's message
MAX_BAD_COMMANDS = 20  # in a row, then BYE


class Connection(Protocol):
    """What the session needs from the transport side."""

    peer: str  # the client's IP address
    tls: bool  # TLS is active

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def writable(self) -> bool: ...  # False while the transport's buffer is full (the client does not read)

    async def start_tls(self) -> None: ...

    def next_line(self) -> asyncio.Future: ...  # resolves to the next raw client line (IDLE's DONE, SASL)

    compressing: bool  # COMPRESS=DEFLATE is active (RFC 4978)

    def start_compression(self) -> None: ...  # both ways DEFLATE from the next byte on

    def relay_to(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...  # a cluster's proxy

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
    tls: Any  # conf.tls.ServerTLS for STARTTLS and port 993, or None without a certificate
    version: str
    connections: ConnectionLimit = field(kw_only=True)  # shared by the 143 and 993 listeners
    # Password checks in threads of their own (postroom/daemons.py), and each account's
    # share of the store threads: neither a login flood nor one user's slow SEARCHes in many
    # sessions can keep other users waiting.
    run_login: Callable[..., Awaitable[Any]] | None = field(default=None, kw_only=True)
    shares: FairShare = field(default_factory=lambda: FairShare(4), kw_only=True)
    # A cluster's: where a user whose shard another node owns is served (imapd/proxy.py).
    # owner(account) -> None (here) or that node's IMAP (host, port); NoOwnerError between owners.
    owner: Callable[[str], tuple[str, int] | None] | None = field(default=None, kw_only=True)
    # is_peer(ip) -> whether ip is a live node's address: a proxy whose ID naming its client
    # is believed.
    is_peer: Callable[[str], bool] | None = field(default=None, kw_only=True)
    # The cluster's secret (wire/node_proof.py): a live node's proxy proves itself with it and
    # logs in as its client's user without the password, which it has checked already.
    secret: Callable[[], bytes | None] | None = field(default=None, kw_only=True)
    node: Callable[[], str] | None = field(default=None, kw_only=True)  # this node's name
    proxy_tls: Any = field(default=None, kw_only=True)  # ssl.SSLContext to check the owner with


class SessionState:
    """What a session knows and the primitives its command handlers use: writing answers,
    the selected mailbox, store calls. The dispatch over the state table is imapd.session's."""

    def __init__(self, context: IMAPContext, connection: Connection, sid: str):
        self.context = context
        self.conn = connection
        self.sid = sid
        self.state = NOT_AUTHENTICATED
        self.status = ""  # the status of the last tagged response: OK, NO, BAD
        self.user: str | None = None
        # A cluster proxy's client (its ID's x-originating-ip, believed from a live node only):
        # logged and throttled by, and the session is served here, never proxied on.
        self.forwarded_for: str | None = None
        # A cluster's: the nonce in the greeting, which a node's proxy proves itself for.
        self.nonce: str | None = proof.nonce() if context.secret is not None else None
        self.view: View | None = None
        self.condstore = False  # enabled by ENABLE CONDSTORE or a CONDSTORE-aware command
        self.qresync = False  # ENABLE QRESYNC (RFC 7162 §3.2.3): VANISHED instead of EXPUNGE
        self.utf8 = False  # ENABLE UTF8=ACCEPT (RFC 6855): mailbox names in UTF-8 (imapd.utf7)
        self.rev2 = False  # ENABLE IMAP4rev2 (RFC 9051 Appendix A): no \Recent, ESEARCH for SEARCH
        self.errors = 0  # BAD answers in a row
        self.log = EventLogger("imapd.session").bind(sid=sid)
        self._watch = None
        # The watcher says the selected mailbox changed: a flag, and a future IDLE waits on.
        # (Futures, not tasks: a thousand idle sessions should cost little.)
        self.changed = False
        self.change_waiter: asyncio.Future | None = None
        self.ended = False
        # APPEND's messages, streaming in (imapd/appending.py)
        self.appending = AppendSinks(context.store, lambda: self.user, self.max_message_size)
        # Held while a command runs: NOTIFY's pushes (imapd.notify) wait for it, so their
        # responses never land inside a command's own.
        self.running = asyncio.Lock()
        self.notifier: Any = None  # imapd.notify.Notifier, while NOTIFY SET is in effect

    # -- capabilities ---------------------------------------------------------------------

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        caps += ["IMAP4rev2"]  # RFC 9051, alongside IMAP4rev1 (Appendix A): ENABLE IMAP4rev2 switches
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
            caps += ["ESEARCH", "SEARCHRES"]  # RFC 4731, RFC 5182
            caps += ["SORT", "SORT=DISPLAY", "THREAD=REFERENCES", "THREAD=ORDEREDSUBJECT"]  # RFC 5256, RFC 5957
            caps += ["ESORT", "CONTEXT=SEARCH", "CONTEXT=SORT"]  # RFC 5267
            caps += ["METADATA"]  # RFC 5464
            caps += ["NOTIFY"]  # RFC 5465
            caps += ["QRESYNC"]  # RFC 7162
            caps += ["OBJECTID"]  # RFC 8474
            caps += ["SAVEDATE"]  # RFC 8514
            caps += ["PREVIEW"]  # RFC 8970
            caps += ["MULTIAPPEND"]  # RFC 3502
            caps += ["BINARY"]  # RFC 3516
            caps += ["CATENATE"]  # RFC 4469
            caps += ["UTF8=ACCEPT"]  # RFC 6855
            caps += ["URLAUTH", "URLAUTH=BINARY"]  # RFC 4467, RFC 5524
            if not self.conn.compressing:
                caps += ["COMPRESS=DEFLATE"]  # RFC 4978
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

    def literal_sink(self, command: str, parts: list, size: int):
        """The framer asks, as a literal begins: APPEND's messages, once logged in, go into
        the store as they arrive (imapd/appending.py) instead of being held whole. Only the
        literals of messages: the mailbox name may be a literal too (an astring, RFC 3501
        §6.3.11), and is held like any literal, within the framer's bounds."""
        if command != "APPEND" or self.state == NOT_AUTHENTICATED or _names_the_mailbox(parts):
            return None
        with utf7.utf8_names(self.utf8):
            return self.appending.sink(parts, size)

    def drop_literal(self) -> None:
        self.appending.close()

    def greeting(self) -> bytes:
        note = f" {proof.greeting_note(self.nonce, self.context.config.server.hostname)}" if self.nonce else ""
        return f"* OK [CAPABILITY {self.capabilities()}] Postroom ready{note}\r\n".encode()

    # -- writing --------------------------------------------------------------------------

    def untagged(self, line: bytes | str) -> None:
        self.conn.write(untagged_line(line))

    def tagged(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        self.status = status  # the last command's, for its metrics
        self.conn.write(tagged_line(tag, status, text, code))

    def say_bye(self, text: str) -> None:
        """`* BYE text`, and the session is over (RFC 3501 §7.1.5)."""
        self.untagged(f"BYE {text}")
        self.state = LOGOUT
        self.conn.close()

    # -- dispatch -------------------------------------------------------------------------

    def parse_failed(self, error: ParseError) -> None:
        self.drop_literal()  # an APPEND whose whole command did not parse: nothing stored
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

        def changed(state) -> None:  # from the watcher's thread
            loop.call_soon_threadsafe(self._mailbox_changed, state)

        if self._watch is not None:
            self._watch.cancel()
        self._watch = self.context.watcher.watch(self.user, name, changed)

    def _mailbox_changed(self, state=None) -> None:
        self.changed = True
        if self.change_waiter is not None and not self.change_waiter.done():
            self.change_waiter.set_result(None)
        if self.notifier is not None:
            self.notifier.selected_changed(state)

    def enable_condstore(self) -> None:
        """A CONDSTORE-enabling command (RFC 7162 §3.1) ran: from the first one on, with a
        mailbox selected, the client is told its HIGHESTMODSEQ (imaptest esearch-condstore)."""
        if not self.condstore and self.view is not None:
            self.untagged(f"OK [HIGHESTMODSEQ {self.view.modseq}] CONDSTORE enabled")
        self.condstore = True

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
        self.drop_literal()  # cut off in the middle of an APPEND: nothing of it stays
        if self.notifier is not None:
            self.notifier.cancel()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


def _names_the_mailbox(parts: list) -> bool:
    """Whether the literal beginning after `parts` is APPEND's first argument, the mailbox:
    the command's first line holds only the tag, APPEND and the literal's {n} marker."""
    if len(parts) != 1:
        return False
    words = bytes(parts[0]).split(None, 2)
    return len(words) == 3 and words[2].startswith(b"{")
