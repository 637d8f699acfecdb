"""One IMAP session: the state table, each command's semantics, and the untagged updates
that keep the client in step with the store (RFC 3501, with the extensions in CAPABILITIES).

The session knows no sockets: it reads parsed `Command`s and writes response bytes through
its `Connection` (the Twisted adapter in imapd.protocol). Commands run one at a time, in
order, as coroutines on the event loop; anything that touches the disk or takes a CPU
burst (store calls, FETCH rendering, password checks) runs in a thread via `context.run`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import functools
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from conf import Config
from conf.logfmt import EventLogger
from imapd import fetch as fetching
from imapd.append import AppendLiteral, DroppedLiteral, LiteralStandIn
from imapd import responses as r
from imapd.listing import list_mailboxes
from imapd.recent import RecentClaims
from imapd.parser import Frame, parse_command
from imapd.syntax import Command, FetchItem, ParseError, SequenceSet
from imapd.view import Snapshots, View
from policy.connections import ConnectionLimit
from policy.shares import FairShare
from policy.logins import LoginThrottle
from storage import (
    SEEN,
    Accounts,
    DiskFullError,
    FlagError,
    MailboxError,
    MailboxExistsError,
    MailboxLimitError,
    MailboxNameError,
    MailboxNotFoundError,
    QuotaExceededError,
    SearchError,
    Store,
    StoreError,
    Watcher,
)

FETCH_BATCH = 256  # messages per store read while answering FETCH
FLAGS_BATCH = 8192  # the same when only UID, FLAGS and MODSEQ are asked
FETCH_BYTES = 4 << 20  # of responses rendered before they are written and the client reads
NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = "not authenticated", "authenticated", "selected", "logout"
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE", "APPENDLIMIT")
MAX_LITERAL_BEFORE_LOGIN = 8 * 1024
MAX_LITERAL_COMMAND = 64 * 1024  # any literal but APPEND's message


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
    run: Callable[..., Awaitable[Any]]  # run(fn, *args) in a worker thread
    tls: Any  # conf.reactor.ServerTLS for STARTTLS and port 993, or None without a certificate
    version: str
    connections: ConnectionLimit = field(kw_only=True)  # shared by the 143 and 993 listeners
    # Password checks in threads of their own (postroom/daemons.py), and each account's
    # share of the store threads: neither a login flood nor one user's slow SEARCHes in many
    # sessions can keep other users waiting.
    run_login: Callable[..., Awaitable[Any]] | None = field(default=None, kw_only=True)
    shares: FairShare = field(default_factory=lambda: FairShare(4), kw_only=True)


class Answer(Exception):
    """Ends a command with a tagged NO or BAD: `status`, optional response `code`, text."""

    def __init__(self, status: str, text: str, code: str | None = None):
        super().__init__(text)
        self.status, self.text, self.code = status, text, code


def no(text: str, code: str | None = None) -> Answer:
    return Answer("NO", text, code)


def bad(text: str, code: str | None = None) -> Answer:
    return Answer("BAD", text, code)


class Session:
    def __init__(self, context: IMAPContext, connection: Connection, sid: str):
        self.context = context
        self.conn = connection
        self.sid = sid
        self.state = NOT_AUTHENTICATED
        self.user: str | None = None
        self.view: View | None = None
        self.condstore = False  # enabled by ENABLE CONDSTORE or a CONDSTORE-aware command
        self.errors = 0
        self.log = EventLogger("imapd.session").bind(sid=sid)
        self._watch = None
        # The watcher says the selected mailbox changed: a flag, and a future IDLE waits on.
        # (Futures, not tasks: a thousand idle sessions should cost little.)
        self._changed = False
        self._change_waiter: asyncio.Future | None = None
        self.ended = False
        self._literal: AppendLiteral | None = None  # APPEND's message, streaming in

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

    def literal_sink(self, command: str, parts: list, size: int) -> AppendLiteral | DroppedLiteral | None:
        """The framer asks, as a literal begins: APPEND's message, once logged in, goes into
        the store as it arrives (imapd/append.py) instead of being held whole."""
        if command != "APPEND" or self.state == NOT_AUTHENTICATED or len(parts) != 1:
            return None  # held as any literal; a second one (MULTIAPPEND) is refused anyway
        self._drop_literal()
        try:
            head = parse_command(Frame([parts[0], LiteralStandIn(size), b""])).args
        except ParseError:
            return DroppedLiteral()  # the command will be refused for its head: read and drop
        date: datetime.datetime | None = head.get("date")
        self._literal = AppendLiteral(self.context.store, self.user, head["mailbox"], flags=head["flags"],
                                      internal_date=date.timestamp() if date else None,
                                      limit=self.max_message_size())
        return self._literal

    def _drop_literal(self) -> None:
        if self._literal is not None:
            self._literal.close()
            self._literal = None

    def greeting(self) -> bytes:
        return f"* OK [CAPABILITY {self.capabilities()}] Postroom ready\r\n".encode()

    # -- writing --------------------------------------------------------------------------

    def untagged(self, line: bytes | str) -> None:
        self.conn.write(b"* " + (line.encode() if isinstance(line, str) else line) + b"\r\n")

    def tagged(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        coded = f"[{code}] " if code else ""
        self.conn.write(f"{tag} {status} {coded}{text}\r\n".encode())

    # -- dispatch -------------------------------------------------------------------------

    async def handle(self, command: Command) -> None:
        """Run one command to its tagged response."""
        handler = COMMANDS.get(command.name)
        allowed = STATES.get(self.state, ())
        try:
            if handler is None:
                raise bad("unknown command")
            if command.name not in allowed:
                raise bad(f"{command.name} is not allowed {_state_phrase(self.state)}")
            result = await handler(self, command)
            code, text = result if isinstance(result, tuple) else (None, result or f"{command.name} completed")
            if self.view is not None and command.name not in ("LOGOUT",):
                await self.sync(expunges=command.name not in NO_EXPUNGE_DURING)
            self.tagged(command.tag, "OK", text, code)
            self.errors = 0
        except _Done:
            return
        except Answer as answer:
            try:
                if self.view is not None and answer.status == "NO":
                    await self.sync(expunges=command.name not in NO_EXPUNGE_DURING)
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
        self._drop_literal()  # an APPEND whose whole command did not parse: nothing stored
        if error.tag:
            self.tagged(error.tag, error.status, str(error), error.code)
        else:
            self.tagged("*", "BAD", str(error), error.code)
        self.note_error(error.status)

    def note_error(self, status: str) -> None:
        if status != "BAD":
            return
        self.errors += 1
        if self.errors >= 20:
            self.untagged("BYE too many bad commands")
            self.log.warning("closed", reason="bad_commands")
            self.state = LOGOUT
            self.conn.close()

    # -- any state ------------------------------------------------------------------------

    async def cmd_capability(self, command: Command):
        self.untagged(f"CAPABILITY {self.capabilities()}")

    async def cmd_noop(self, command: Command):
        return None

    async def cmd_logout(self, command: Command):
        self.untagged("BYE logging out")
        self.state = LOGOUT
        self.log.info("logout", user=self.user)
        return None

    async def cmd_id(self, command: Command):
        params = command.args.get("params")
        if params:
            shown = " ".join(f"{k}={v}" for k, v in list(params.items())[:8])
            self.log.info("client_id", user=self.user, client=shown[:300])
        self.untagged(b"ID " + r.plist([r.string(b"name"), r.string(b"Postroom"), r.string(b"version"),
                                        r.string(self.context.version.encode())]))

    async def cmd_enable(self, command: Command):
        enabled = [c for c in command.args["capabilities"] if c == "CONDSTORE"]
        if enabled:
            self.condstore = True
        self.untagged("ENABLED" + "".join(" " + c for c in enabled))

    # -- not authenticated ----------------------------------------------------------------

    async def cmd_starttls(self, command: Command):
        if self.conn.tls:
            raise bad("TLS is already active")
        if not self.context.tls is not None:
            raise no("TLS is not configured")
        self.tagged(command.tag, "OK", "begin TLS negotiation now")
        await self.conn.start_tls()
        raise _Done()

    async def cmd_login(self, command: Command):
        if not self.plaintext_ok():
            raise no("use STARTTLS before LOGIN", "PRIVACYREQUIRED")
        return await self.login(command.args["user"], command.args["password"])

    async def cmd_authenticate(self, command: Command):
        if command.args["mechanism"] != "PLAIN":
            raise no("only AUTHENTICATE PLAIN is supported", "CANNOT")
        if not self.plaintext_ok():
            raise no("use STARTTLS before AUTHENTICATE", "PRIVACYREQUIRED")
        response = command.args.get("initial")
        if response is None:
            self.conn.write(b"+ \r\n")
            line = (await self.conn.next_line()).strip()
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
        return await self.login(user, secret)

    async def login(self, user: str, password: str):
        throttle = self.context.throttle
        async with throttle.checks:
            account = await (self.context.run_login or self.context.run)(self.context.accounts.authenticate, user,
                                                                          password)
        if account is None:
            delay = throttle.failed(self.conn.peer)
            self.log.warning("login_failed", user=user[:100], ip=self.conn.peer, delay=delay)
            await asyncio.sleep(delay)
            raise no("wrong user name or password", "AUTHENTICATIONFAILED")
        throttle.succeeded(self.conn.peer)
        name = str(account.address)  # the store's account name: local@a-label
        await self.call(self.context.store.ensure_account, name)
        self.user = name
        self.state = AUTHENTICATED
        self.log = self.log.bind(user=self.user)
        self.log.info("login", ip=self.conn.peer, tls=self.conn.tls)
        return "CAPABILITY " + self.capabilities(), "logged in"

    # -- authenticated: mailboxes ---------------------------------------------------------

    async def cmd_select(self, command: Command):
        return await self.open_mailbox(command, readonly=command.name == "EXAMINE")

    cmd_examine = cmd_select

    async def open_mailbox(self, command: Command, readonly: bool):
        if self.view is not None:
            self.close_view()
            self.untagged("OK [CLOSED] previous mailbox closed")
        if command.args.get("condstore"):
            self.condstore = True
        name = command.args["mailbox"]
        mailbox, uids, bits = await self.call(self.context.store.uids, self.user, name)
        # RFC 3501 §6.3.2: EXAMINE must not take \Recent away from anyone.
        recent = () if readonly else self.context.recent.claim(self.user, mailbox.id, mailbox.uidnext)
        view = View(mailbox, uids, readonly=readonly, recent=recent, snapshots=self.context.snapshots)
        self.view = view
        self.state = SELECTED
        keywords = " ".join(mailbox.keywords)
        flags = " ".join(SYSTEM_FLAGS) + (" " + keywords if keywords else "")
        self.untagged(f"FLAGS ({flags})")
        self.untagged(f"{view.exists} EXISTS")
        self.untagged(f"{len(view.recent)} RECENT")
        first_unseen = next((i + 1 for i, b in enumerate(bits) if not b & _SEEN_BIT), None)
        if first_unseen:
            self.untagged(f"OK [UNSEEN {first_unseen}] first unseen")
        self.untagged(f"OK [UIDVALIDITY {mailbox.uidvalidity}] UIDs valid")
        self.untagged(f"OK [UIDNEXT {mailbox.uidnext}] predicted next UID")
        self.untagged(f"OK [HIGHESTMODSEQ {mailbox.highestmodseq}] modseq")
        if readonly:
            self.untagged("OK [PERMANENTFLAGS ()] read-only")
        else:
            self.untagged(f"OK [PERMANENTFLAGS ({flags} \\*)] flags allowed")
        self.watch(mailbox.name)
        self.log.info("select", mailbox=mailbox.name, exists=view.exists, readonly=readonly)
        return ("READ-ONLY" if readonly else "READ-WRITE"), f"{command.name} completed"

    def close_view(self) -> None:
        self.view = None
        self.state = AUTHENTICATED
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def cmd_create(self, command: Command):
        name = command.args["mailbox"].rstrip("/")  # RFC 3501: a trailing separator is a hint only
        uses = command.args.get("special_use") or ()
        if len(uses) > 1:
            raise no("one special-use attribute per mailbox", "USEATTR")
        try:
            await self.call(self.context.store.create_mailbox, self.user, name, uses[0] if uses else None)
        except MailboxError as e:
            if uses and "special-use" in str(e):
                raise no(str(e), "USEATTR") from None
            raise
        self.log.info("create", mailbox=name)

    async def cmd_delete(self, command: Command):
        name = command.args["mailbox"]
        if self.view is not None and self.view.name == name:
            raise no("close the mailbox before deleting it", "INUSE")
        await self.call(self.context.store.delete_mailbox, self.user, name)
        self.log.info("delete", mailbox=name)

    async def cmd_rename(self, command: Command):
        old, new = command.args["old"], command.args["new"]
        await self.call(self.context.store.rename_mailbox, self.user, old, new)
        self.log.info("rename", mailbox=old, to=new)

    async def cmd_subscribe(self, command: Command):
        name = command.args["mailbox"]
        await self.call(self.context.store.mailbox, self.user, name)  # NONEXISTENT if not there
        await self.call(self.context.store.subscribe, self.user, name, True)

    async def cmd_unsubscribe(self, command: Command):
        await self.call(self.context.store.subscribe, self.user, command.args["mailbox"], False)

    async def cmd_list(self, command: Command):
        args = command.args
        select = set(args.get("select") or ())
        returns = args.get("return_") or {}
        reference, patterns = args["reference"], args["patterns"]
        if patterns == [""] and not select:
            # RFC 3501 §6.3.8: the hierarchy delimiter and the root of the reference
            self.untagged('LIST (\\Noselect) "/" ""')
            return None
        boxes = await self.call(self.context.store.mailboxes, self.user)
        subscribed = set(await self.call(self.context.store.subscriptions, self.user))
        listed = list_mailboxes(boxes, subscribed, reference, patterns,
                                subscribed_only="SUBSCRIBED" in select,
                                special_use_only="SPECIAL-USE" in select,
                                recursive="RECURSIVEMATCH" in select)
        status_items = returns.get("STATUS")
        show_subscribed = returns.get("SUBSCRIBED") or "SUBSCRIBED" in select
        for item in listed:
            attrs = list(item.attributes(subscribed=show_subscribed))
            line = f"LIST ({' '.join(attrs)}) \"/\" ".encode() + r.mailbox(item.name)
            if item.child_info:
                line += b" (" + b'"CHILDINFO" (' + b'"SUBSCRIBED"' + b"))"
            self.untagged(line)
            if status_items and item.selectable:
                await self.status_lines(item.name, status_items, quiet=True)

    async def cmd_lsub(self, command: Command):
        args = command.args
        boxes = await self.call(self.context.store.mailboxes, self.user)
        subscribed = set(await self.call(self.context.store.subscriptions, self.user))
        # RFC 3501 §6.3.9: "%" reaching only a subscribed child lists its parent as \Noselect.
        listed = list_mailboxes(boxes, subscribed, args["reference"], args["patterns"][:1], subscribed_only=True,
                                recursive=True)
        for item in listed:
            attrs = "" if item.subscribed and item.selectable else "\\Noselect"
            self.untagged(f"LSUB ({attrs}) \"/\" ".encode() + r.mailbox(item.name))

    async def cmd_namespace(self, command: Command):
        self.untagged('NAMESPACE (("" "/")) NIL NIL')

    async def cmd_status(self, command: Command):
        name = command.args["mailbox"]
        await self.status_lines(name, command.args["items"], quiet=False)

    async def status_lines(self, name: str, items: Iterable[str], *, quiet: bool) -> None:
        try:
            mailbox = await self.call(self.context.store.mailbox, self.user, name)
        except Answer:
            if quiet:
                return
            raise
        deleted = 0
        if "DELETED" in items:
            deleted = len(await self.call(self.context.store.search, self.user, mailbox.name,
                                          ("flag", "\\Deleted", True)))
        values = {"DELETED": deleted, "MESSAGES": mailbox.exists, "UIDNEXT": mailbox.uidnext,
                  "UIDVALIDITY": mailbox.uidvalidity, "UNSEEN": mailbox.unseen,
                  "HIGHESTMODSEQ": mailbox.highestmodseq, "SIZE": mailbox.size,
                  "RECENT": self.context.recent.count(self.user, mailbox.id, mailbox.uidnext),
                  "APPENDLIMIT": self.max_message_size()}
        shown = " ".join(f"{item} {values[item]}" for item in items if item in values)
        if "HIGHESTMODSEQ" in items:
            self.condstore = True
        self.untagged(b"STATUS " + r.mailbox(mailbox.name) + f" ({shown})".encode())

    async def cmd_append(self, command: Command):
        args = command.args
        message: bytes | AppendLiteral = args["message"]
        if isinstance(message, AppendLiteral):
            return await self._append_streamed(message)
        if not message:
            raise bad("empty message")
        if b"\n" in message.replace(b"\r\n", b""):
            # Lines end in CRLF in IMAP (RFC 3501 §2.3.1.1) and in the store, where sizes,
            # POP3's dot-stuffing and BODY[] byte ranges count on it: a bare LF becomes CRLF.
            message = _BARE_LF.sub(b"\r\n", message)
        if len(message) > self.max_message_size():
            raise no("message is larger than APPENDLIMIT", "TOOBIG")
        date: datetime.datetime | None = args.get("date")
        try:
            delivered = await self.call(self.context.store.append, self.user, args["mailbox"], message,
                                        flags=args.get("flags") or (),
                                        internal_date=date.timestamp() if date else None)
        except Answer as answer:
            if answer.code == "NONEXISTENT":
                answer.code = "TRYCREATE"
            raise
        self.log.info("append", mailbox=delivered.mailbox, uid=delivered.uid, size=len(message))
        return f"APPENDUID {delivered.uidvalidity} {delivered.uid}", "APPEND completed"

    async def _append_streamed(self, literal: AppendLiteral):
        """APPEND whose message went into the store as it arrived: commit it, or say why not."""
        if literal is self._literal:
            self._literal = None  # this command has it now
        try:
            if not literal.received:
                raise bad("empty message")
            if literal.too_big:
                raise no("message is larger than APPENDLIMIT", "TOOBIG")
            try:
                delivered = await self.call(literal.commit)
            except Answer as answer:
                if answer.code == "NONEXISTENT":
                    answer.code = "TRYCREATE"
                raise
        finally:
            literal.close()
        self.log.info("append", mailbox=delivered.mailbox, uid=delivered.uid, size=literal.size)
        return f"APPENDUID {delivered.uidvalidity} {delivered.uid}", "APPEND completed"

    async def cmd_getquotaroot(self, command: Command):
        # One quota root, "", for the whole account, when it has a quota (RFC 9208 §4.3: a
        # mailbox without a quota root gets a QUOTAROOT response naming none).
        name = command.args["mailbox"]
        mailbox = await self.call(self.context.store.mailbox, self.user, name)
        quota = await self.call(self.context.store.quota, self.user)
        limited = bool(quota.bytes or quota.messages)
        self.untagged(b"QUOTAROOT " + r.mailbox(mailbox.name) + (b' ""' if limited else b""))
        if limited:
            await self.quota_line(quota)

    async def cmd_getquota(self, command: Command):
        quota = await self.call(self.context.store.quota, self.user)
        if command.args["root"] != "" or not (quota.bytes or quota.messages):
            raise no("no such quota root", "NONEXISTENT")
        await self.quota_line(quota)

    async def quota_line(self, quota) -> None:
        """RFC 9208 §5.1, 5.2: STORAGE in KiB, MESSAGE in messages; the limited ones only."""
        usage = await self.call(self.context.store.usage, self.user)
        resources = []
        if quota.bytes:
            resources.append(f"STORAGE {(usage['used'] + 1023) // 1024} {quota.bytes // 1024}")
        if quota.messages:
            resources.append(f"MESSAGE {usage['messages']} {quota.messages}")
        self.untagged(f'QUOTA "" ({" ".join(resources)})')

    async def cmd_setquota(self, command: Command):
        raise no("quotas are set by the administrator (postroom user quota)", "NOPERM")

    async def cmd_idle(self, command: Command):
        # What changed before IDLE began is told at once, before the continuation: the
        # watcher's signal may have come and gone already, and a client that reads "+"
        # and then waits on its socket can miss lines that came in the same packet.
        self._changed = False
        if self.view is not None:
            await self.sync(expunges=True)
        self.conn.write(b"+ idling\r\n")
        line = self.conn.next_line()
        loop = asyncio.get_running_loop()
        try:
            while not line.done():
                if self._changed:
                    self._changed = False
                    if self.view is not None:
                        await self.sync(expunges=True)
                    continue
                self._change_waiter = loop.create_future()
                await asyncio.wait((line, self._change_waiter), return_when=asyncio.FIRST_COMPLETED)
                self._change_waiter = None
        finally:
            self._change_waiter = None
            if not line.done():
                line.cancel()
        line = line.result().strip()
        if line.upper() != b"DONE":
            raise bad("expected DONE")
        return "IDLE terminated"

    def _mailbox_changed(self) -> None:
        self._changed = True
        if self._change_waiter is not None and not self._change_waiter.done():
            self._change_waiter.set_result(None)

    def watch(self, name: str) -> None:
        if self.ended:
            return  # the client left while SELECT was reading the store
        loop = asyncio.get_running_loop()

        def changed(_state) -> None:  # from the watcher's thread
            loop.call_soon_threadsafe(self._mailbox_changed)

        if self._watch is not None:
            self._watch.cancel()
        self._watch = self.context.watcher.watch(self.user, name, changed)

    # -- selected -------------------------------------------------------------------------

    async def cmd_check(self, command: Command):
        return None

    async def cmd_close(self, command: Command):
        view = self.require_view()
        if not view.readonly:
            await self.call(self.context.store.expunge, self.user, view.name)
        self.close_view()

    async def cmd_unselect(self, command: Command):
        self.close_view()

    async def cmd_expunge(self, command: Command):
        view = self.require_writable()
        ranges = None
        if command.name == "UID EXPUNGE":
            ranges = view.uid_ranges(command.args["set"])
            if not ranges:
                return None
        args = (self.user, view.name) + ((ranges,) if ranges is not None else ())
        removed = await self.call(self.context.store.expunge, *args)
        self.announce_expunged(removed)
        self.log.info("expunge", mailbox=view.name, count=len(removed))
        return None

    cmd_uid_expunge = cmd_expunge

    def announce_expunged(self, uids: Iterable[int]) -> None:
        assert self.view is not None
        for seq in self.view.expunge_now(uids):
            self.untagged(f"{seq} EXPUNGE")

    async def cmd_search(self, command: Command):
        view = self.require_view()
        use_uid = command.name == "UID SEARCH"
        query = self.resolve_query(command.args["query"])
        try:
            uids = await self.call(self.context.store.search, self.user, view.name, query)
        except SearchError as e:
            raise bad(str(e)) from None
        uids, seqs = view.known(uids)
        line = "SEARCH" + (" " + " ".join(map(str, uids if use_uid else seqs)) if uids else "")
        if _has_modseq(query) and uids:
            self.condstore = True
            states = await self.call(self.context.store.flags, self.user, view.name, [(u, u) for u in uids])
            line += f" (MODSEQ {max(s.modseq for s in states)})" if states else ""
        self.untagged(line)

    cmd_uid_search = cmd_search

    def resolve_query(self, query: tuple) -> tuple:
        """The store's query tree: sequence numbers, `*` and \\Recent made UIDs."""
        view = self.require_view()
        kind = query[0]
        try:
            if kind == "seq":
                return ("uid", view.seq_ranges(query[1]) or [(0, 0)])
        except ValueError:
            # RFC 3501 asks for BAD on numbers beyond EXISTS in most commands; in SEARCH
            # they simply match nothing (what Dovecot and clients expect).
            spans = [(lo, min(hi, view.exists)) for lo, hi in query[1].resolve(view.exists) if lo <= view.exists]
            return ("uid", [(view.uids[lo - 1], view.uids[hi - 1]) for lo, hi in spans] or [(0, 0)])
        if kind == "uidset":
            return ("uid", view.uid_ranges(query[1]) or [(0, 0)])
        if kind == "recent":
            return ("uid", view.recent_ranges() or [(0, 0)])
        if kind == "not":
            return ("not", self.resolve_query(query[1]))
        if kind == "or":
            return ("or", self.resolve_query(query[1]), self.resolve_query(query[2]))
        if kind == "and":
            return ("and", [self.resolve_query(q) for q in query[1]])
        if kind == "modseq":
            self.condstore = True
        return query

    async def cmd_fetch(self, command: Command):
        view = self.require_view()
        use_uid = command.name == "UID FETCH"
        items: list[FetchItem] = list(command.args["items"])
        changedsince = command.args.get("changedsince")
        if changedsince is not None or any(i.name == "MODSEQ" for i in items):
            self.condstore = True
        if use_uid and not any(i.name == "UID" for i in items):
            items.insert(0, FetchItem("UID"))
        if self.condstore and changedsince is not None and not any(i.name == "MODSEQ" for i in items):
            items.append(FetchItem("MODSEQ"))
        uids = view.uids_in(self.ranges(command))
        if not uids:
            return None
        mark_seen = not view.readonly and fetching.sets_seen(items)
        if mark_seen and not any(i.name == "FLAGS" for i in items):
            items.append(FetchItem("FLAGS"))
        if self.condstore and mark_seen:
            # RFC 7162 §3.1: FETCH responses that report a change carry UID and MODSEQ.
            if not any(i.name == "MODSEQ" for i in items):
                items.append(FetchItem("MODSEQ"))
            if not any(i.name == "UID" for i in items):
                items.insert(0, FetchItem("UID"))
        flags_only = all(i.name in ("UID", "FLAGS", "MODSEQ") for i in items)
        store = self.context.store
        # Flags come from fixed-size records: big batches. Message data is rendered until
        # FETCH_BYTES are pending, written, and the next part waits for the client to read.
        batch = FLAGS_BATCH if flags_only else FETCH_BATCH
        recent = frozenset(view.recent)
        position = 0
        while position < len(uids):
            chunk = uids[position:position + batch]
            ranges = _as_ranges(chunk)
            if mark_seen:
                changed, _ = await self.call(store.store_flags, self.user, view.name, ranges, "add", ["\\Seen"])
                view.mark_told(changed)
            if flags_only:
                states = await self.call(store.flags, self.user, view.name, ranges)
                lines = [self.flags_fetch_line(s, items, changedsince) for s in states]
                done = len(chunk)
            else:
                lines, done = await self.call(_render_batch, store, self.user, view.name, chunk, items,
                                              changedsince, view.seq_of, recent)
            for line in lines:
                if line:
                    self.conn.write(line)
            position += done
            await self.conn.drain()
        return None

    cmd_uid_fetch = cmd_fetch

    def flags_fetch_line(self, state, items: list[FetchItem], changedsince: int | None) -> bytes | None:
        view = self.require_view()
        seq = view.seq_of(state.uid)
        if seq is None or (changedsince is not None and state.modseq <= changedsince):
            return None
        view.mark_told([state])
        parts = []
        for item in items:
            if item.name == "UID":
                parts.append(f"UID {state.uid}")
            elif item.name == "FLAGS":
                parts.append(f"FLAGS ({' '.join(self.flags_with_recent(state.uid, state.flags))})")
            elif item.name == "MODSEQ":
                parts.append(f"MODSEQ ({state.modseq})")
        return f"* {seq} FETCH ({' '.join(parts)})\r\n".encode()

    def flags_with_recent(self, uid: int, flags: Iterable[str]) -> list[str]:
        out = list(flags)
        if self.view is not None and uid in self.view.recent:
            out.append("\\Recent")
        return out

    async def cmd_store(self, command: Command):
        view = self.require_writable()
        args = command.args
        unchanged = args.get("unchangedsince")
        if unchanged is not None:
            self.condstore = True
        ranges = self.ranges(command)
        uids = view.uids_in(ranges)
        if not uids:
            return None
        flags = [f for f in args["flags"] if f.lower() != "\\recent"]
        changed, modified = await self.call(self.context.store.store_flags, self.user, view.name, _as_ranges(uids),
                                            args["mode"], flags, unchanged)
        view.mark_told(changed)
        if not args["silent"]:
            states = await self.call(self.context.store.flags, self.user, view.name, _as_ranges(uids))
            refused = set(modified)
            shown = [FetchItem("FLAGS"), FetchItem("UID")] + ([FetchItem("MODSEQ")] if self.condstore else [])
            for state in states:
                if state.uid not in refused and state.uid not in view.pending:
                    self.conn.write(self.flags_fetch_line(state, shown, None) or b"")
        elif self.condstore and unchanged is not None:
            # RFC 7162 §3.1.3: with UNCHANGEDSINCE the new MODSEQ is reported even when silent
            for state in changed:
                seq = view.seq_of(state.uid)
                if seq is not None:
                    self.untagged(f"{seq} FETCH (UID {state.uid} MODSEQ ({state.modseq}))")
        if modified:
            numbers = modified if command.name == "UID STORE" else [view.seq_of(u) for u in modified]
            return f"MODIFIED {_set_text([n for n in numbers if n])}", "conditional STORE failed"
        return None

    cmd_uid_store = cmd_store

    async def cmd_copy(self, command: Command):
        view = self.require_view()
        move = command.name.endswith("MOVE")
        if move:
            self.require_writable()
        uids = view.uids_in(self.ranges(command))
        if not uids:
            return None
        target = command.args["mailbox"]
        operation = self.context.store.move if move else self.context.store.copy
        try:
            uidvalidity, pairs = await self.call(operation, self.user, view.name, _as_ranges(uids), target)
        except Answer as answer:
            if answer.code == "NONEXISTENT":
                answer.code = "TRYCREATE"
            raise
        code = None
        if pairs:
            code = f"COPYUID {uidvalidity} {_set_text([a for a, _ in pairs])} {_set_text([b for _, b in pairs])}"
        self.log.info("move" if move else "copy", mailbox=view.name, to=target, count=len(pairs))
        if move:
            if code:
                self.untagged(f"OK [{code}] moved")
            self.announce_expunged([a for a, _ in pairs])
            return None
        return code, "COPY completed"

    cmd_uid_copy = cmd_move = cmd_uid_move = cmd_copy

    def ranges(self, command: Command) -> list[tuple[int, int]]:
        view = self.require_view()
        sequence: SequenceSet = command.args["set"]
        if command.name.startswith("UID "):
            return view.uid_ranges(sequence)
        try:
            return view.seq_ranges(sequence)
        except ValueError:
            raise bad("invalid message sequence number") from None

    def require_view(self) -> View:
        if self.view is None:
            raise bad("no mailbox selected")
        return self.view

    def require_writable(self) -> View:
        view = self.require_view()
        if view.readonly:
            raise no("mailbox is read-only (EXAMINE)", "READ-ONLY")
        return view

    # -- keeping the client in step -------------------------------------------------------

    async def sync(self, *, expunges: bool) -> None:
        """Tell the client what changed in the selected mailbox since it was last told."""
        view = self.view
        if view is None:
            return
        store = self.context.store
        try:
            mailbox, changed, expunged = await self.call(store.changes_since, self.user, view.name, view.modseq)
        except Answer as answer:
            # Renamed (here, by another session, or a parent of it): follow it by its id.
            new_name = await self.call(store.mailbox_name, self.user, view.uidvalidity) \
                if answer.code == "NONEXISTENT" else None
            if new_name is None:
                if answer.code == "NONEXISTENT":
                    self.untagged("BYE the selected mailbox was deleted")
                    self.log.info("closed", reason="mailbox_deleted", mailbox=view.name)
                    self.state = LOGOUT
                    self.conn.close()
                return
            self.log.info("selected_renamed", mailbox=view.name, to=new_name)
            view.name = new_name
            self.watch(new_name)
            mailbox, changed, expunged = await self.call(store.changes_since, self.user, view.name, view.modseq)
        if mailbox.uidvalidity != view.uidvalidity:
            self.untagged("BYE the selected mailbox was replaced")
            self.state = LOGOUT
            self.conn.close()
            return
        view.pending.update(uid for uid in expunged if view.seq_of(uid) is not None)
        if expunges and view.pending:
            self.announce_expunged(list(view.pending))
        new = sorted(s.uid for s in changed if s.uid > view.max_uid())
        if view.add(new):
            if not view.readonly:
                view.recent.update(self.context.recent.claim_new(self.user, view.uidvalidity, new))
            self.untagged(f"{view.exists} EXISTS")
            self.untagged(f"{len(view.recent)} RECENT")
        for state in view.flag_updates(s for s in changed if s.uid not in new):
            seq = view.seq_of(state.uid)
            modseq = f" MODSEQ ({state.modseq})" if self.condstore else ""
            flags = " ".join(self.flags_with_recent(state.uid, state.flags))
            self.untagged(f"{seq} FETCH (UID {state.uid} FLAGS ({flags}){modseq})")
        view.in_step(max(view.modseq, mailbox.highestmodseq))
        view.told = {uid: m for uid, m in view.told.items() if m > view.modseq}

    # -- store calls ----------------------------------------------------------------------

    async def call(self, fn, *args, **kwargs):
        """A store call in a thread (within the account's share), its errors turned into IMAP
        answers."""
        try:
            async with self.context.shares.slot(self.user or self.sid):
                return await self.context.run(functools.partial(fn, **kwargs) if kwargs else fn, *args)
        except tuple(STORE_ANSWERS) as e:
            status, code = next(answer for kind, answer in STORE_ANSWERS.items() if isinstance(e, kind))
            raise Answer(status, str(e), code) from None
        except StoreError as e:
            self.log.error("store_failed", error=str(e))
            raise no("temporary failure, try again", "UNAVAILABLE") from None

    def end(self) -> None:
        """The connection is gone."""
        self.ended = True
        self._drop_literal()  # cut off in the middle of an APPEND: nothing of it stays
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


class _Done(Exception):
    """The command has answered itself (STARTTLS)."""


# The store's errors as IMAP answers, most specific first; str() of each is safe to show.
# Any other StoreError is a fault on our side: logged, and answered NO [UNAVAILABLE].
STORE_ANSWERS: dict[type[Exception], tuple[str, str | None]] = {
    MailboxNotFoundError: ("NO", "NONEXISTENT"),
    MailboxExistsError: ("NO", "ALREADYEXISTS"),
    MailboxLimitError: ("NO", "LIMIT"),
    QuotaExceededError: ("NO", "OVERQUOTA"),
    DiskFullError: ("NO", "OVERQUOTA"),  # as Dovecot answers "Not enough disk space"
    FlagError: ("BAD", None),
    MailboxNameError: ("NO", "CANNOT"),
    MailboxError: ("NO", "CANNOT"),
}
_SEEN_BIT = SEEN
_BARE_LF = re.compile(rb"(?<!\r)\n")
NO_EXPUNGE_DURING = {"FETCH", "STORE", "SEARCH", "COPY"}


def _state_phrase(state: str) -> str:
    return {NOT_AUTHENTICATED: "before login", AUTHENTICATED: "without a selected mailbox",
            SELECTED: "here", LOGOUT: "after LOGOUT"}[state]


def _as_ranges(uids: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for uid in uids:
        if out and uid == out[-1][1] + 1:
            out[-1] = (out[-1][0], uid)
        else:
            out.append((uid, uid))
    return out


def _set_text(numbers: list[int]) -> str:
    return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in _as_ranges(sorted(numbers)))


def _has_modseq(query: tuple) -> bool:
    kind = query[0]
    if kind == "modseq":
        return True
    if kind == "not":
        return _has_modseq(query[1])
    if kind == "or":
        return _has_modseq(query[1]) or _has_modseq(query[2])
    if kind == "and":
        return any(_has_modseq(q) for q in query[1])
    return False


def _render_batch(store: Store, account: str, mailbox: str, uids: list[int], items, changedsince, seq_of,
                  recent: frozenset[int]) -> tuple[list[bytes], int]:
    """FETCH responses for the first of `uids` (in a worker thread: reads files), until
    about FETCH_BYTES are rendered; also how many of `uids` they answer."""
    lines: list[bytes] = []
    pending = 0
    for info in store.fetch(account, mailbox, _as_ranges(uids)):
        if pending >= FETCH_BYTES:
            return lines, uids.index(info.uid)
        if changedsince is not None and info.modseq <= changedsince:
            continue
        seq = seq_of(info.uid)
        if seq is None:
            continue
        body = fetching.render(info, items, lambda info=info: store.open_message(info), recent=info.uid in recent)
        lines.append(b"* %d FETCH (" % seq + body + b")\r\n")
        pending += len(lines[-1])
    return lines, len(uids)


def _commands() -> dict[str, Callable]:
    table = {}
    for name in dir(Session):
        if name.startswith("cmd_"):
            table[name[4:].upper().replace("_", " ")] = getattr(Session, name)
    return table


COMMANDS = _commands()
ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
STATES: dict[str, set[str]] = {
    NOT_AUTHENTICATED: ANY | {"STARTTLS", "LOGIN", "AUTHENTICATE"},
    AUTHENTICATED: ANY | {"ENABLE", "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
                          "LIST", "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "GETQUOTAROOT", "GETQUOTA",
                          "SETQUOTA"},
    LOGOUT: set(),
}
STATES[SELECTED] = STATES[AUTHENTICATED] | {
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "UID EXPUNGE", "SEARCH", "UID SEARCH", "FETCH", "UID FETCH", "STORE",
    "UID STORE", "COPY", "UID COPY", "MOVE", "UID MOVE"}
