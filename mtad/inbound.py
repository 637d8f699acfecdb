"""The inbound MX agent: one connection of aiosmtpd's asyncio protocol driving our SMTP core.

aiosmtpd supplies the connection plumbing (stream reader and writer, the STARTTLS upgrade
whose connection_made drops plaintext read before the handshake, the idle timeout), reached
only through mtad/aiosmtpd_adapter.py. Its command loop is replaced: mtad.session does all
protocol work, and this module answers the session's questions (mtad/events.py):
- RCPT: the accounts database (local users, aliases, catch-alls, sub-addresses); relay
  tricks and other domains are refused; remote alias targets wait for the outbound queue
  (451 4.3.0 until it exists); over quota is 452 4.2.2.
- message data: streamed into the store as it arrives (Store.begin_delivery): the
  Return-Path: and Received: headers (RFC 5321 §4.4) first, as the first chunk comes, then
  each chunk; nothing holds the message in memory. At its end the delivery is committed for
  every local recipient; 250 only once every copy is durable. A small message is parsed in
  the event loop and handed straight to the store's committers (Delivery.start_commit); a
  big one, or a retry after a failure, is committed in a worker thread.
Any unexpected exception is logged with a traceback and answered 451 4.3.0 with the session
id, never with its text.

Stopping (InboundContext.stop_sessions, RFC 5321 §3.8): a session waiting for a command is
told 421 4.3.2 at once and closed; any other is told so at its next command, so a message
being sent may be finished, and its delivery completes and its 250 is written first. After
the grace period whatever is left is cut off, its unfinished message discarded.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conf.logfmt import EventLogger, session_id
from conf.schema import Config
from mtad import replies
from mtad.aiosmtpd_adapter import AiosmtpdConnection, TLSHandshakeError
from mtad.events import NEED_DATA, Close, DataChunk, DataEnd, Hello, MailFrom, Question, RcptTo, StartTLS
from mtad.replies import Reply
from mtad.session import Session, SessionConfig
from storage import (
    WRITE_IN_COMMITTER,
    AccountError,
    Accounts,
    AddressError,
    AliasLoopError,
    Delivered,
    Delivery,
    DeliveryError,
    DiskFullError,
    NotLocalError,
    QuotaExceededError,
    Store,
    StoreError,
    UnknownAddressError,
    parse_address,
)
from wire.connections import ConnectionLimit

_log = EventLogger("mtad.inbound")
MAX_RECEIVED = 100  # more Received: headers than this is a loop (RFC 5321 §6.3)
READ_SIZE = 65536
_counter = itertools.count(1)
_RECEIVED_UNSAFE = str.maketrans({c: "?" for c in '();\\"<>'})
LAST_WORDS = 1.0  # seconds for a session's last replies once it may no longer be waited for


@dataclass
class InboundContext:
    config: Config
    accounts: Accounts
    store: Store
    tls: ssl.SSLContext | None
    deliver_in_thread: Callable  # run a blocking call off the event loop
    connections: ConnectionLimit | None = None  # made from [smtp] when not given
    # Deliveries under way: they finish even when their session is gone (client gone,
    # daemon stopping), so that a failed copy is always withdrawn; stop() waits for them.
    deliveries: set[asyncio.Task] = field(default_factory=set)
    # Live sessions, tracked here for the stop: asyncio.Server.wait_closed() is no help (it
    # returns at once before Python 3.12, and waits for every connection since).
    sessions: set[InboundSMTP] = field(default_factory=set)
    stopping: bool = False
    # Set when a session ends or a delivery's reply is decided: what a stop waits on.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.connections is None:
            self.connections = ConnectionLimit(self.config.smtp.max_connections,
                                               self.config.smtp.max_connections_per_ip)

    async def finish_deliveries(self) -> None:
        while self.deliveries:
            await asyncio.gather(*self.deliveries, return_exceptions=True)

    async def stop_sessions(self, grace: float) -> None:
        """The daemon stops (its listeners are closed): every session ends within `grace`
        seconds, except that a delivery under way finishes and its reply is written."""
        self.stopping = True
        for session in list(self.sessions):
            session.stop_if_idle()
        await self._sessions_gone(grace)
        for session in list(self.sessions):
            if not session.delivering:
                session.cut_off()
        # A delivery is not cut short: the store must settle it (every copy or none) and
        # the client hear the outcome, or it sends again what we stored.
        await self._until(lambda: not any(session.delivering for session in self.sessions))
        await self._sessions_gone(LAST_WORDS)  # their replies go out, then 421
        for session in list(self.sessions):
            session.cut_off()
        await self._sessions_gone(LAST_WORDS)  # cut off: their tasks end at the next turns
        await self.finish_deliveries()

    async def _sessions_gone(self, seconds: float) -> None:
        await self._until(lambda: not self.sessions, seconds)

    async def _until(self, condition: Callable[[], bool], seconds: float | None = None) -> None:
        """Wait until `condition()` holds, looking again at each `changed`; at most `seconds`."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            self.changed.clear()  # before the look: a change from here on wakes the wait
            if condition():
                return
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return

    def admit(self, ip: str) -> bool:
        return self.connections.admit(ip)

    def release(self, ip: str) -> None:
        self.connections.release(ip)


class InboundSMTP(AiosmtpdConnection):
    """One SMTP connection."""

    def __init__(self, context: InboundContext, *, implicit_tls: bool = False):
        config = context.config
        super().__init__(hostname=config.server.hostname, tls_context=context.tls, timeout=config.smtp.timeout)
        self.context = context
        self.sid = session_id()
        self.log = EventLogger("mtad.inbound").bind(sid=self.sid)
        self.core = Session(SessionConfig(
            hostname=config.server.hostname,
            max_message_size=config.smtp.max_message_size,
            max_recipients=config.smtp.max_recipients,
            tls_available=context.tls is not None,
            is_tls=implicit_tls,
        ))
        self._local: dict[str, list[str]] = {}  # recipient -> accounts it reaches
        self._outcomes: list[str] = []  # "address:code" of every RCPT of the transaction
        self._delivery: Delivery | None = None  # the message being received, from its first chunk
        self._qid = ""
        self._write_failed: BaseException | None = None  # the store could not take the message
        self._sender = ""
        self._peer = ""
        self._idle = False  # waiting for a command: a stop tells it at once
        self.delivering = False  # a message is being stored: a stop waits for its reply

    async def serve(self) -> None:
        """The whole session: started once the connection is up."""
        self._peer = self.peer_address
        if not self.context.admit(self._peer):
            self.log.warning("connection_refused", client=self._peer, reason="too many connections")
            self.write(replies.TOO_MANY_CONNECTIONS.lines())
            self.close()
            return
        self.log.info("connect", client=self._peer)
        smtp = self.context.config.smtp
        self.context.sessions.add(self)
        try:
            if self.context.stopping:  # accepted just before the listener closed: 421, no 220
                self.core.data_to_send()
                self.core.close(replies.SHUTTING_DOWN)
            await self._send()
            while not self.core.closed:
                if not await self._act_on_events():
                    break
                await self._send()
                if self.core.closed:
                    break
                if self.context.stopping and not self.core.receiving:
                    # RFC 5321 §3.8: the next command is answered 421 (4.3.2, RFC 3463).
                    self.log.info("shutdown")
                    self.core.close(replies.SHUTTING_DOWN)
                    continue
                self._idle = not self.core.receiving
                try:
                    data = await self.read(READ_SIZE)
                finally:
                    self._idle = False
                if not data:
                    break
                self.core.receive(data)
                # RFC 5321 §4.5.3.2: commands are awaited for `timeout` (§4.5.3.2.7: at
                # least 5 minutes), each block of message data for `data_timeout` (§4.5.3.2.5).
                self.set_timeout(float(smtp.data_timeout) if self.core.receiving else None)
            await self._send()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TLSHandshakeError:
            self.log.info("tls_failed")
        except Exception:
            self.log.error("session_failed", exc_info=True)
            self.write(Reply(421, "4.3.0", f"Internal error, session {self.sid}; try again later").lines())
        finally:
            self.context.sessions.discard(self)
            self.context.changed.set()
            self._drop_message()  # one cut off mid-message leaves nothing behind
            self.context.release(self._peer)
            self.log.info("disconnect", client=self._peer)
            self.close()

    def stop_if_idle(self) -> None:
        """The daemon stops: a session waiting for a command hears 421 4.3.2 now (RFC 5321
        §3.8); any other hears it once its current command is answered."""
        if self._idle and not self.disconnected:
            self.log.info("shutdown")
            self.core.close(replies.SHUTTING_DOWN)
            self.write(self.core.data_to_send())
            self.close()

    def cut_off(self) -> None:
        """The grace period is over: say 421 4.3.2 and drop the connection, whatever it
        was sending (a message not finished is not stored)."""
        if self.disconnected:
            return
        if not self.core.closed:
            self.log.info("shutdown", cut_off=True, receiving=self.core.receiving)
            self.core.close(replies.SHUTTING_DOWN)
            self.write(self.core.data_to_send())
        self.abort()

    def timed_out(self) -> None:
        """The idle timer fired: say why before the connection closes (RFC 5321 §4.5.3.2)."""
        self.log.info("timeout", client=self._peer)
        self.write(replies.TIMEOUT.lines())

    async def _act_on_events(self) -> bool:
        """Act on the core's events until it needs more bytes (True) or closes (False)."""
        while True:
            event = self.core.next_event()
            if event is NEED_DATA:
                return True
            if isinstance(event, Close):
                await self._send()
                return False
            if isinstance(event, DataChunk):
                self._write_chunk(event.data)
            elif isinstance(event, StartTLS):
                await self._send()
                await self.start_tls()
                self.core.tls_established()
                self.log.info("starttls", version=self.tls_version())
            else:
                self.core.answer(event, await self._answer(event))

    async def _answer(self, event: Question) -> Reply:
        """The reply to one of the core's questions."""
        try:
            if isinstance(event, Hello):
                self.log.info("helo", name=event.name)
                return replies.OK
            if isinstance(event, MailFrom):
                self._local.clear()
                self._outcomes.clear()
                self._drop_message()  # a transaction given up (RSET during BDAT) and not ended
                self._sender = event.address
                return replies.SENDER_OK
            if isinstance(event, RcptTo):
                return self._recipient(event.address)
            if isinstance(event, DataEnd):
                return await self._end_of_data(event)
        except Exception:
            self.log.error("decision_failed", exc_info=True, question=type(event).__name__)
            return Reply(451, "4.3.0", f"Temporary failure, session {self.sid}; try again later")
        raise RuntimeError(f"no decision for {event!r}")

    def _recipient(self, address: str) -> Reply:
        local, _, _ = address.rpartition("@")
        outcome = None
        try:
            if "%" in local or "!" in local:
                # user%remote@local and remote!user@local: old source routing, a relay trick.
                parse_address(address)  # an address from another domain is still plain relaying
                outcome = Reply(553, "5.7.1", "Address with % or ! not accepted here")
            else:
                resolution = self.context.accounts.resolve(address)
                if resolution.remote:
                    outcome = Reply(451, "4.3.0", "Forwarding to other domains is not available yet")
                else:
                    over = [a for a in resolution.local if self.context.store.is_full(str(a))]
                    if over:
                        outcome = replies.OVER_QUOTA
                    else:
                        self._local[address] = [str(a) for a in resolution.local]
                        outcome = replies.RECIPIENT_OK
        except NotLocalError:
            outcome = replies.RELAY_DENIED
        except UnknownAddressError:
            outcome = replies.NO_SUCH_USER
        except AliasLoopError:
            outcome = Reply(554, "5.4.6", "Alias loop")
        except AddressError as e:
            outcome = Reply(553, "5.1.3", f"Bad recipient address: {e}")
        except AccountError:
            outcome = replies.NO_SUCH_USER
        self.log.info("rcpt", to=address, result=f"{outcome.code} {outcome.enhanced}")
        self._outcomes.append(f"{address}:{outcome.code}")
        return outcome

    def _write_chunk(self, data: bytes) -> None:
        """Message bytes into the store as they arrive; the trace headers go first, with the
        first chunk. A full disk (or any write error) fails the message, not the session: the
        rest of its data is read and dropped, and its end is answered 452 4.3.1 (RFC 3463)."""
        if self._write_failed is not None:
            return
        try:
            if self._delivery is None:
                self._begin_message()
            self._delivery.write(data)
        except StoreError as e:  # the delivery is aborted: nothing of it stays
            self._delivery = None
            self._write_failed = e
            self.log.error("store_write_failed", qid=self._qid, error=type(e).__name__)

    def _begin_message(self) -> None:
        self._qid = f"{self.sid}{next(_counter):04X}"
        accounts = list(dict.fromkeys(a for targets in self._local.values() for a in targets))
        trace = self._trace_headers(self._qid)
        # What the sender sent starts after our trace headers: with the Message-ID, it
        # tells a message sent again (storage/dedupe.py).
        self._delivery = self.context.store.begin_delivery(accounts, dedupe_from=len(trace))
        self._delivery.write(trace)

    def _drop_message(self) -> None:
        if self._delivery is not None:
            self._delivery.close()
        self._delivery, self._write_failed = None, None

    async def _end_of_data(self, end: DataEnd) -> Reply:
        self.delivering = True
        try:
            if end.refusal is None and end.received_headers <= MAX_RECEIVED and self._write_failed is None \
                    and self._delivery is None:
                self._write_chunk(b"")  # an empty message: the trace headers alone
            delivery, failed = self._delivery, self._write_failed
            self._delivery, self._write_failed = None, None
            if end.refusal is not None:
                self.log.info("message_refused", size=end.size, reason=f"{end.refusal.code} {end.refusal.enhanced}")
                reply = end.refusal
            elif end.received_headers > MAX_RECEIVED:
                self.log.info("message_refused", size=end.size, reason="mail loop")
                reply = replies.MAIL_LOOP
            elif failed is not None:
                self.log.info("message_refused", size=end.size, reason="store write failed")
                reply = replies.INSUFFICIENT_STORAGE if isinstance(failed, DiskFullError) else replies.TEMPORARY_FAILURE
            else:
                handed, delivery = delivery, None  # from here on the commit owns it, and closes it
                return await self._deliver(handed)
            if delivery is not None:
                delivery.close()
            return reply
        finally:
            self.delivering = False
            self.context.changed.set()

    async def _deliver(self, delivery: Delivery) -> Reply:
        """Commit the message for every local recipient: 250 once every copy is durable."""
        qid, accounts = self._qid, [account for account, _ in delivery.targets]
        try:
            # Up to WRITE_IN_COMMITTER, start_commit leaves the fsync to the committers:
            # only then may the event loop call it.
            if delivery.size <= WRITE_IN_COMMITTER and self.context.store.accounts_ready(accounts):
                delivered = await self._commit_from_loop(delivery)
            else:
                delivered = await self.context.deliver_in_thread(_commit, self.context.store, delivery)
        except DeliveryError as e:
            errors = [error for _, error in e.errors]
            self.log.error("store_failed", qid=qid, error=type(errors[0]).__name__,
                           delivered=len(e.delivered), failed=len(errors))
            if any(isinstance(error, DiskFullError) for error in errors):
                return replies.INSUFFICIENT_STORAGE
            full = any(isinstance(error, QuotaExceededError) for error in errors)
            return replies.OVER_QUOTA if full and not e.delivered else replies.TEMPORARY_FAILURE
        message_id = (delivery.message_id or "")[:200]
        duplicates = [d.account for d in delivered if d.duplicate]
        if duplicates:
            # A sender that lost our 250 sent it again: the copies it reached are kept as they are.
            self.log.info("message_duplicate", qid=qid, message_id=message_id, mailboxes=",".join(duplicates))
        self.log.info("message_accepted", qid=qid, message_id=message_id, size=delivery.size,
                      sender=self._sender or "<>", recipients=",".join(self._outcomes), mailboxes=len(accounts),
                      duplicates=len(duplicates))
        self._local.clear()
        return Reply(250, "2.0.0", f"OK: queued as {qid}")

    async def _commit_from_loop(self, delivery: Delivery) -> list[Delivered]:
        """A small message: parsed here and handed to the shards' committers, which fsync
        and index it, with no thread of its own: at a thousand messages a second, the
        hand-offs between threads cost more than the work. Failures go to a thread for the
        retry."""
        task = asyncio.ensure_future(_commit_and_settle(self.context, delivery))
        self.context.deliveries.add(task)
        task.add_done_callback(self._delivery_done)
        # Shielded: if the session is cancelled meanwhile (the client hung up after its
        # final dot), the delivery still completes or withdraws every copy.
        return await asyncio.shield(task)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self.context.deliveries.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # the session hears of it too, unless it is gone
        if error is not None and self.closing:
            self.log.error("store_failed_after_disconnect", error=type(error).__name__)

    def _trace_headers(self, qid: str) -> bytes:
        """Return-Path: and a Received: header as RFC 5321 §4.4 and RFC 3848 describe them."""
        tls = self.tls_version()
        protocol = "ESMTPS" if tls else "ESMTP"
        # The client's word, in a header others parse: the characters that would end or
        # open a Received: token (RFC 5321 §4.4: ";" ends the clauses, "(" a comment) go.
        helo = (self.core.helo_name or "unknown").translate(_RECEIVED_UNSAFE)
        recipients = list(self._local)
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        tls_clause = f"\r\n\t(using {tls} with cipher {self.tls_cipher()})" if tls else ""
        received = (f"Received: from {helo} ([{self._peer}])\r\n\tby {self.context.config.server.hostname} "
                    f"(Postroom) with {protocol} id {qid}{tls_clause}{for_clause};\r\n\t"
                    f"{email.utils.formatdate(time.time(), localtime=True)}\r\n")
        return f"Return-Path: <{self._sender}>\r\n{received}".encode("utf-8", "surrogateescape")

    async def _send(self) -> None:
        data = self.core.data_to_send()
        if data:
            self.write(data)
            await self.drain()


def _commit(store: Store, delivery: Delivery) -> list[Delivered]:
    """In a worker thread: every copy stored (returned), or DeliveryError with none left."""
    try:
        try:
            return delivery.commit()
        except DeliveryError as first:
            return _retry_or_withdraw(store, delivery, first)
    finally:
        delivery.close()


async def _commit_and_settle(context: InboundContext, delivery: Delivery) -> list[Delivered]:
    """In the event loop: every copy stored (returned), or DeliveryError with none left (see
    _retry_or_withdraw)."""
    loop = asyncio.get_running_loop()
    settled = loop.create_future()

    def on_done(delivered, errors) -> None:
        loop.call_soon_threadsafe(_settle, settled, delivered, errors)

    try:
        delivery.start_commit(on_done)
        delivered, errors = await settled
        if errors:
            return await context.deliver_in_thread(_retry_or_withdraw, context.store, delivery,
                                                   DeliveryError(delivered, errors))
        return delivered
    finally:
        delivery.close()


def _settle(future: asyncio.Future, delivered: list, errors: list) -> None:
    if not future.done():
        future.set_result((delivered, errors))


def _retry_or_withdraw(store: Store, delivery: Delivery, first: DeliveryError) -> list[Delivered]:
    """Every copy stored, or none: after our 4xx the sender sends the message again to all
    its recipients, so a copy kept from a partly failed delivery would arrive twice. The
    failed copies get one more try first (a race with a quota or a mailbox change, a passing
    fault); if they fail again, the stored ones are taken back and DeliveryError says why.
    A copy that was there before this delivery (a duplicate) is never taken back."""
    stored = list(first.delivered)
    failed = [target for target, _ in first.errors]
    try:
        return stored + delivery.retry(failed)
    except DeliveryError as second:
        stored += second.delivered
        errors = second.errors
    for copy in stored:
        if copy.duplicate:
            continue
        try:
            store.remove(copy.account, copy.mailbox, [copy.uid])
        except (StoreError, OSError) as e:  # the copy stays: better twice than lost
            _log.error("withdraw_failed", account=copy.account, uid=copy.uid, error=type(e).__name__)
    raise DeliveryError([], errors)


