"""One POP3 session's work on the store: what the sans-IO core (pop3d.core) asks for and
cannot do itself. Checking a password (delayed when wrong, policy.logins), taking the
maildrop lock (storage.lock_maildrop) and the snapshot of INBOX (pop3d.maildrop), streaming
a message from the store in chunks paced by the transport, marking retrieved messages
\\Seen for IMAP, and removing the deleted ones in the UPDATE state.

The session knows no sockets: it writes through its `Connection` (the Twisted adapter in
pop3d.protocol). Store calls run in threads via `context.run`. `perform` is the one place
an unexpected error becomes the core's "-ERR [SYS/TEMP] internal error, session <sid>",
logged with its traceback and never shown to the client.

\\Seen is written behind: RETR never waits for a commit. The UIDs retrieved queue up for
SEEN_DELAY, then one store write adds \\Seen to all of them, so a client fetching
thousands of messages pays for a few commits, and IMAP sees the flag within a moment.
QUIT and a dropped connection flush the queue at once (a message sent is a message read,
though a drop deletes nothing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from conf import Config
from conf.logfmt import EventLogger
from policy.logins import LoginThrottle
from pop3d import replies
from pop3d.core import Authenticate, Close, Event, POP3Core, Reply, Retrieve, Settings, StartTLS, Update
from pop3d.framer import BodyEncoder
from pop3d.maildrop import EXPIRE_AT_QUIT, EXPIRE_NEVER, Maildrop, too_soon
from storage import INBOX, Accounts, MaildropLock, NoOwnerError, NotOwnerError, Store, StoreError, lock_maildrop
from wire import metrics
from wire import node_proof as proof
from wire.connections import ConnectionLimit

CHUNK = 128 * 1024  # bytes read from a message file at a time
# RETR reads ahead: the messages after the one asked for are opened (and their first chunk
# read) in the same store call, up to this many of them and bytes of first chunks, so a
# client fetching one message after another (fetchmail; bench/pop3.py) waits for a store
# thread once in a while, not once a message. A message smaller than a chunk is read whole
# and its file closed at once, so read-ahead holds few files open (at most 8 bigger ones).
# Like the snapshot of the maildrop itself, a message read ahead is sent even if IMAP
# expunged it meanwhile, as one already being sent is.
AHEAD_MESSAGES = 64
AHEAD_BYTES = 1024 * 1024
SEEN_DELAY = 0.25  # seconds retrieved UIDs wait to share one \\Seen write


class Connection(Protocol):
    """What the session needs from the transport side."""

    peer: str  # the client's IP address
    tls: bool  # TLS is active

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...  # returns once the transport wants more; ConnectionError if gone

    def start_tls(self) -> None: ...

    def close(self) -> None: ...

    def relay_to(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...  # a cluster's proxy


@dataclass
class POP3Context:
    config: Config
    accounts: Accounts
    store: Store
    throttle: LoginThrottle
    run: Callable[..., Awaitable[Any]]  # run(function, *args) in a store thread
    tls: Any  # conf.tls.ServerTLS for STLS and port 995, or None without a certificate
    version: str
    # \Seen writes still running after their session ended (kept referenced until done).
    background: set[asyncio.Task] = field(default_factory=set)
    connections: ConnectionLimit = field(kw_only=True)  # shared by the 110 and 995 listeners
    # Password checks in threads of their own (postroom/daemons.py): a login flood never
    # holds the store threads, and argon2's memory stays bounded.
    run_login: Callable[..., Awaitable[Any]] | None = field(default=None, kw_only=True)
    # A cluster's: where a user whose shard another node owns is served (pop3d/proxy.py).
    # owner(account) -> None (here) or that node's POP3 (host, port); NoOwnerError between owners.
    owner: Callable[[str], tuple[str, int] | None] | None = field(default=None, kw_only=True)
    # is_peer(ip) -> whether ip is a live node's address: a proxy whose XCLIENT is believed.
    is_peer: Callable[[str], bool] | None = field(default=None, kw_only=True)
    # The cluster's secret and this node's name (wire/node_proof.py): a live node's proxy proves
    # itself with the secret and logs in as its client's user without the password.
    secret: Callable[[], bytes | None] | None = field(default=None, kw_only=True)
    node: Callable[[], str] | None = field(default=None, kw_only=True)
    proxy_tls: Any = field(default=None, kw_only=True)  # ssl.SSLContext to check the owner with


class Session:
    def __init__(self, context: POP3Context, connection: Connection, sid: str, *, implicit_tls: bool):
        self.context = context
        self.conn = connection
        self.sid = sid
        pop3 = context.config.pop3
        self.nonce = proof.nonce() if context.secret is not None else None  # a cluster's (wire/node_proof.py)
        self.core = POP3Core(Settings(
            sid=sid, implementation=f"Postroom {context.version}", tls_available=context.tls is not None,
            tls_active=implicit_tls, plaintext_auth=pop3.plaintext_auth, login_delay=int(pop3.login_delay),
            expire=EXPIRE_NEVER if pop3.expire == "never" else EXPIRE_AT_QUIT,
            cluster_peer=context.is_peer is not None and context.is_peer(connection.peer),
            greeting_note=proof.greeting_note(self.nonce, context.config.server.hostname) if self.nonce else "",
        ))
        self.log = EventLogger("pop3d.session").bind(sid=sid)
        self.user: str | None = None
        self.lock: MaildropLock | None = None
        self.retrieved = 0  # messages sent whole by RETR
        self.ended = False
        self.updating = False  # QUIT's removals are running: the lock is theirs to release
        self._seen_uids: list[int] = []  # sent by RETR, waiting for the next \Seen write
        self._seen_task: asyncio.Task | None = None
        self._seen_now = asyncio.Event()  # stop waiting for more: QUIT, or the connection ended
        self._ahead: dict[int, tuple[BinaryIO, bytes]] = {}  # uid -> opened by read-ahead

    def greeting(self) -> bytes:
        return self.core.greeting()

    # -- events --------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Act on an event that needs no store: a reply, a last reply, STLS."""
        if isinstance(event, (Reply, StartTLS, Close)):
            self.conn.write(event.data)
        if isinstance(event, StartTLS):
            self.conn.start_tls()
        elif isinstance(event, Close):
            self.conn.close()

    async def perform(self, event: Event) -> None:
        """Do the store work of `event`, then answer; an unexpected error answers -ERR."""
        try:
            if isinstance(event, Authenticate):
                outcome = await self._login(event)
            elif isinstance(event, Retrieve):
                outcome = await self._retrieve(event)
            elif isinstance(event, Update):
                outcome = await self._update(event)
            else:
                outcome = event
        except ConnectionError:
            raise
        except _MessageCutError:
            self.conn.close()  # part of a message is out: no reply can follow it
            return
        except Exception as e:
            # NotOwnerError: the shard was released meanwhile, no bug (the session ends: cluster/follow.py).
            self.log.error("error", exc_info=not isinstance(e, NotOwnerError), command=type(event).__name__,
                           error=str(e)[:200])
            outcome = self.core.failed()
            if isinstance(event, Update):
                self._release()
        if outcome is not None:
            self.emit(outcome)

    # -- AUTHORIZATION -------------------------------------------------------------------------

    @property
    def client_ip(self) -> str:
        """The client's address: a cluster proxy's XCLIENT ADDR=, else the connection's."""
        return self.core.forwarded_for or self.conn.peer

    def _via(self) -> dict[str, str]:
        """For a login's log line: the proxy node a forwarded client came through."""
        return {"via": self.conn.peer} if self.core.forwarded_for else {}

    async def _login(self, event: Authenticate) -> Event:
        context, peer = self.context, self.client_ip
        if event.authzid:  # a node's proxy, for its client's user (pop3d/core.py lets no one else)
            return await self._login_proxied(event)
        async with context.throttle.checks:
            user = await (context.run_login or context.run)(context.accounts.authenticate, event.user, event.password)
        metrics.login("pop3", ok=user is not None)
        if user is None:
            delay = context.throttle.failed(peer)
            self.log.warning("login_failed", user=event.user[:100], ip=peer, mechanism=event.mechanism, delay=delay,
                             **self._via())
            await asyncio.sleep(delay)
            return self.core.login_refused(replies.WRONG_PASSWORD)
        context.throttle.succeeded(peer)
        account = str(user.address)  # the store's account name: local@a-label
        if context.owner is not None:
            proxied = await self._proxy(account, event.password)
            if proxied is not None:
                return proxied
        return await self._enter(account, event.mechanism)

    async def _enter(self, account: str, mechanism: str, **extra: str) -> Event:
        """The maildrop of `account` (here), locked and listed: the TRANSACTION state."""
        context, peer = self.context, self.client_ip
        try:
            outcome = await context.run(self._open_maildrop, account)
        except NotOwnerError:  # the shard was released just now: its next owner serves it
            self.log.info("login_moving", user=account, ip=peer)
            return self.core.login_refused(replies.MAILDROP_MOVING, counts=False)
        if isinstance(outcome, str):
            self.log.info(outcome, user=account, ip=peer)
            if outcome == "in_use":
                return self.core.login_refused(replies.MAILDROP_IN_USE, counts=False)
            return self.core.login_refused(replies.wait_between_logins(self.core.settings.login_delay),
                                           counts=False)
        lock, maildrop = outcome
        if self.ended:  # the client left while the store was asked
            lock.release()
            raise ConnectionError("connection closed")
        self.lock, self.user = lock, account
        self.log = self.log.bind(user=account)
        self.log.info("login", ip=peer, tls=self.conn.tls, mechanism=mechanism,
                      messages=maildrop.count(), octets=maildrop.octets(), **self._via(), **extra)
        return self.core.logged_in(maildrop)

    async def _login_proxied(self, event: Authenticate) -> Event:
        """A live node's proxy logs in as `event.authzid` with its proof of the cluster's
        secret for this session's nonce (wire/node_proof.py): the password was checked there."""
        context = self.context
        if not proof.valid(context.secret(), self.nonce or "", event.user, event.password):
            self.log.warning("proxy_auth_failed", node=event.user[:64], ip=self.conn.peer)
            return self.core.login_refused(replies.WRONG_PASSWORD)
        user = context.accounts.get_user(event.authzid)
        if user is None:
            return self.core.login_refused(replies.WRONG_PASSWORD)
        if self.core.forwarded_for is None:
            self.core.forwarded_for = self.conn.peer  # served here, never proxied on
        account = str(user.address)
        if context.owner is not None:
            try:
                elsewhere = context.owner(account) is not None
            except NoOwnerError:
                elsewhere = True
            if elsewhere:  # this node's table disagrees with the proxy's for now
                self.log.info("login_moving", user=account, ip=self.client_ip, **self._via())
                return self.core.login_refused(replies.MAILDROP_MOVING, counts=False)
        return await self._enter(account, event.mechanism, node=event.user)

    async def _proxy(self, account: str, password: str) -> Event | None:
        """A cluster's: the session at the node that owns `account`'s shard, the owner's reply
        to PASS the client's (pop3d/proxy.py); None when this node owns it."""
        from storage import NoOwnerError
        from pop3d.proxy import ProxyError, log_in_at

        context = self.context
        try:
            owner = context.owner(account)
        except NoOwnerError:
            return self.core.login_refused(replies.MAILDROP_MOVING, counts=False)
        if owner is None:
            return None
        if self.core.forwarded_for is not None:
            # Proxied here by a node that took this one for the owner: the two nodes' tables
            # disagree for a moment (a hand-over). Proxying on could go round between them.
            self.log.info("login_moving", user=account, ip=self.client_ip, **self._via())
            return self.core.login_refused(replies.MAILDROP_MOVING, counts=False)
        config = context.config
        try:
            reader, writer, reply = await log_in_at(owner[0], owner[1], user=account, password=password,
                                                    client_ip=self.client_ip, hostname=config.server.hostname,
                                                    tls=context.proxy_tls, timeout=float(config.pop3.login_timeout),
                                                    prove=proof.prover(context.secret, context.node))
        except ProxyError as e:
            self.log.warning("proxy_failed", user=account, owner=f"{owner[0]}:{owner[1]}", error=str(e)[:200])
            return self.core.login_refused(replies.Err("your mailbox's server is not answering, try again later",
                                                       "SYS/TEMP"), counts=False)
        if not reply.startswith(b"+OK"):  # -ERR [IN-USE], say: the owner's words, the login not counted
            self.core.login_refused(replies.Err(""), counts=False)
            return Reply(reply if reply.endswith(b"\r\n") else reply + b"\r\n")
        self.user = account
        self.log = self.log.bind(user=account)
        self.log.info("login", ip=self.client_ip, tls=self.conn.tls, proxied_to=f"{owner[0]}:{owner[1]}")
        self.conn.relay_to(reader, writer)
        return Reply(reply)

    def _open_maildrop(self, account: str) -> tuple[MaildropLock, Maildrop] | str:
        """In a store thread: the lock, then the snapshot (so no other POP3 session can
        change what the snapshot shows); "in_use" or "login_delay" when refused."""
        store = self.context.store
        store.ensure_account(account)
        lock = lock_maildrop(store, account)
        if lock is None:
            return "in_use"
        try:
            now = time.time()
            if too_soon(lock.last_login, now, self.core.settings.login_delay):
                lock.release()
                return "login_delay"
            mailbox, listing = store.sizes(account, INBOX)
            lock.record_login(now)
        except BaseException:
            lock.release()
            raise
        return lock, Maildrop(mailbox.id, listing)

    # -- TRANSACTION ---------------------------------------------------------------------------

    def retrieve_now(self, event: Retrieve) -> bool:
        """Send a RETR'd message that read-ahead holds whole, without the store and
        without a task: its +OK, body and terminator in one write. False when it needs
        `perform` (not read ahead, or bigger than a chunk, or TOP). A pipelining client
        (and fetchmail, one RETR after another) is answered from the pump itself, so a
        message costs no loop turn of its own."""
        opened = self._ahead.get(event.uid) if event.lines is None else None
        if opened is None or len(opened[1]) >= CHUNK:
            return False
        del self._ahead[event.uid]
        encoder = BodyEncoder()
        self.conn.write(b"".join((event.ok, encoder.feed(opened[1]), encoder.end())))
        self.core.finished(event)
        self.retrieved += 1
        self._mark_seen(event.uid)
        return True

    async def _retrieve(self, event: Retrieve) -> Event | None:
        assert self.user is not None
        opened = self._ahead.pop(event.uid, None)
        if opened is None:
            self._drop_ahead()  # not the message expected next: what was read ahead is stale
            ahead = self._ahead_uids(event) if event.lines is None else []
            found = await self.context.run(self._open_messages, [event.uid, *ahead])
            opened = found.pop(event.uid, None)
            if self.ended:
                _close_all(found)
            else:
                self._ahead = found
        if opened is None:
            return self.core.retrieve_failed(replies.message_gone(event.number))
        file, chunk = opened
        try:
            head = event.ok  # goes out with the first chunk: one write for a small message
            encoder = BodyEncoder(event.lines)
            try:
                while chunk:
                    out = encoder.feed(chunk)
                    if encoder.done or len(chunk) < CHUNK:  # a short read of a file is its end
                        self.conn.write(b"".join((head, out, encoder.end())))
                        head = b""
                        break
                    self.conn.write(head + out)
                    head = b""
                    await self.conn.drain()
                    chunk = await self.context.run(file.read, CHUNK)
                else:  # a message whose size is a multiple of CHUNK ends on an empty read
                    self.conn.write(head + encoder.end())
            except ConnectionError:
                raise  # the client left: no disk fault to report
            except OSError as e:
                self.log.error("read_failed", uid=event.uid, error=str(e))
                raise _MessageCutError() from None
        finally:
            file.close()
        self.core.finished(event)
        if event.lines is None:
            self.retrieved += 1
            self._mark_seen(event.uid)
        await self.conn.drain()
        return None

    def _ahead_uids(self, event: Retrieve) -> list[int]:
        """The UIDs after the one RETR asks for, as many as AHEAD_MESSAGES and AHEAD_BYTES allow."""
        maildrop = self.core.maildrop
        uids: list[int] = []
        budget = AHEAD_BYTES - min(event.size, CHUNK)
        number = event.number
        while maildrop is not None and len(uids) < AHEAD_MESSAGES and number < len(maildrop.uids):
            number += 1
            if number in maildrop.deleted:
                continue
            budget -= min(maildrop.sizes[number - 1], CHUNK)
            if budget < 0:
                break
            uids.append(maildrop.uids[number - 1])
        return uids

    def _open_messages(self, uids: list[int]) -> dict[int, tuple[BinaryIO, bytes]]:
        """In a store thread: each message's open file and its first chunk, by UID; a
        message that is gone is left out."""
        assert self.user is not None
        store = self.context.store
        opened: dict[int, tuple[BinaryIO, bytes]] = {}
        try:
            for info in store.fetch(self.user, INBOX, [(uid, uid) for uid in uids]):
                try:
                    file = store.open_message(info)
                except (StoreError, FileNotFoundError):
                    continue  # expunged between the lookup and the open
                try:
                    chunk = file.read(CHUNK)
                except BaseException:
                    file.close()
                    raise
                if len(chunk) < CHUNK:  # the whole message: no file kept open for it
                    file.close()
                opened[info.uid] = file, chunk
        except BaseException:
            _close_all(opened)
            raise
        return opened

    def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, {}
        _close_all(ahead)

    def _mark_seen(self, uid: int) -> None:
        self._seen_uids.append(uid)
        if self._seen_task is None or self._seen_task.done():
            self._seen_task = asyncio.ensure_future(self._write_seen())
            self.context.background.add(self._seen_task)
            self._seen_task.add_done_callback(self.context.background.discard)

    async def _write_seen(self) -> None:
        assert self.user is not None
        store, account = self.context.store, self.user
        while self._seen_uids:
            if not self._seen_now.is_set():
                try:
                    await asyncio.wait_for(self._seen_now.wait(), SEEN_DELAY)
                except asyncio.TimeoutError:
                    pass
            uids, self._seen_uids = self._seen_uids, []
            for attempt in (1, 2):  # a passing store fault gets one more try
                try:
                    await self.context.run(store.store_flags, account, INBOX, [(u, u) for u in uids], "add",
                                           ["\\Seen"])
                    break
                except ConnectionError:  # the process's stop closed the store's threads
                    self.log.warning("seen_not_written", count=len(uids), reason="stopping")
                    return
                except Exception:
                    self.log.error("seen_failed", exc_info=True, count=len(uids), attempt=attempt)

    # -- UPDATE --------------------------------------------------------------------------------

    async def _update(self, event: Update) -> Event:
        assert self.user is not None
        # The maildrop stays locked until UPDATE is over (RFC 1939 §8), even if the client
        # hangs up right after QUIT: end() leaves the lock to us.
        self.updating = True
        try:
            self._seen_now.set()
            if self._seen_task is not None:
                await self._seen_task
            try:
                removed = await self.context.run(self.context.store.remove, self.user, INBOX, event.uids) \
                    if event.uids else []
            except (StoreError, OSError):
                self.log.error("update_failed", exc_info=True, deleted=len(event.uids))
                outcome = self.core.updated(None)
            else:
                self.log.info("quit", retrieved=self.retrieved, deleted=len(removed))
                outcome = self.core.updated(len(removed))
        finally:
            self.updating = False
            self._release()
        return outcome

    # -- the end -------------------------------------------------------------------------------

    def end(self) -> None:
        """The connection is gone (QUIT, a drop, a timeout): free the maildrop at once.
        Nothing is deleted; \\Seen writes already queued finish on their own."""
        self.ended = True
        self._drop_ahead()
        self._seen_now.set()
        if not self.updating:
            self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _close_all(opened: dict[int, tuple[BinaryIO, bytes]]) -> None:
    for file, _ in opened.values():
        file.close()


class _MessageCutError(Exception):
    """A message could not be sent whole after its +OK: the connection must close."""
