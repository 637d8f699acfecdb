"""What both SMTP agents share (the MX, mtad/inbound.py; submission, mtad/submission.py):
one connection of aiosmtpd's asyncio protocol driving our SMTP core, and the stop.

aiosmtpd supplies the connection plumbing (stream reader and writer, the STARTTLS upgrade
whose connection_made drops plaintext read before the handshake, the idle timeout), reached
only through mtad/aiosmtpd_adapter.py. Its command loop is replaced: mtad.session does all
protocol work, and an agent answers the session's questions (mtad/events.py) in `answer`,
takes message bytes in `take_chunk`, and drops an unfinished message in `drop_message`.
Any unexpected exception is logged with a traceback and answered 451 4.3.0 with the session
id, never with its text.

Stopping (AgentContext.stop_sessions, RFC 5321 §3.8): a session waiting for a command is
told 421 4.3.2 at once and closed; any other is told so at its next command, so a message
being sent may be finished, and its delivery completes and its 250 is written first. After
the grace period whatever is left is cut off, its unfinished message discarded.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from conf.logfmt import EventLogger, session_id
from conf.schema import Config
from mtad import replies
from mtad.aiosmtpd_adapter import AiosmtpdConnection, TLSHandshakeError
from mtad.events import NEED_DATA, Close, DataChunk, DataEnd, MailFrom, Question, RcptTo, StartTLS
from mtad.replies import Reply
from mtad.routing import OWNER_WAIT, HandOffFailed, Outbound, Route, Router
from mtad.session import Session, SessionConfig
from mtad.writer import WriterClient
from policy.chain import PolicyServices, Refusal, SessionPolicy
from policy.decide import Decision
from storage import (
    AccountError,
    NoOwnerError,
    NoQueueError,
    Accounts,
    AddressError,
    AliasLoopError,
    DeliveryError,
    DiskFullError,
    NotLocalError,
    NotOwnerError,
    QuotaExceededError,
    Store,
    StoreError,
    UnknownAddressError,
)
from wire import metrics
from wire.connections import ConnectionLimit

READ_SIZE = 65536
LAST_WORDS = 1.0  # seconds for a session's last replies once it may no longer be waited for


@dataclass
class AgentContext:
    """What the sessions of one agent (the MX on [smtp] listen; submission on both its
    listeners) share."""
    config: Config
    accounts: Accounts
    store: Store
    tls: ssl.SSLContext | None
    deliver_in_thread: Callable  # run a blocking call off the event loop
    connections: ConnectionLimit
    outbound: Outbound | None = None  # the queue, DKIM and SRS: remote recipients
    policy: PolicyServices | None = None  # the checks (policy/chain.py); None: none run
    router: Router | None = None  # in a cluster: which node owns an account (mtad/routing.py)
    writer: WriterClient | None = None  # [smtp] writer: the process that commits (mtad/writer.py)
    # Deliveries under way: they finish even when their session is gone (client gone,
    # daemon stopping), so that a failed copy is always withdrawn; stop() waits for them.
    deliveries: set[asyncio.Task] = field(default_factory=set)
    # Live sessions, tracked here for the stop: asyncio.Server.wait_closed() is no help (it
    # returns at once before Python 3.12, and waits for every connection since).
    sessions: set[SMTPAgent] = field(default_factory=set)
    stopping: bool = False
    # Set when a session ends or a delivery's reply is decided: what a stop waits on.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def let_go(self, held: Container[int]) -> int:
        """A cluster's (cluster/follow.py, on the event loop): the messages coming in whose
        local copy is on a shard this node no longer holds close their file there and keep
        the copy to hand over (Route.let_go); how many did."""
        moved = 0
        for session in list(self.sessions):
            # The message coming in, or the one in its end-of-data checks (a DNS answer that
            # is slow to come would hold the shard's volume for as long).
            for route in (getattr(session, "_route", None), session._judged):
                try:
                    moved += route is not None and route.let_go(held)
                except (StoreError, OSError) as e:  # read back failed: the commit says what it says
                    session.log.error("let_go_failed", error=str(e)[:200])
        return moved

    async def finish_deliveries(self) -> None:
        while self.deliveries:
            await asyncio.gather(*self.deliveries, return_exceptions=True)

    async def stop_sessions(self, grace: float) -> None:
        """The daemon stops (its listeners are closed): every session ends within `grace`
        seconds, except that a delivery under way finishes and its reply is written."""
        self.stopping = True
        if self.router is not None:
            self.router.stopping = True
        for session in list(self.sessions):
            session.stop_if_idle()
        await self._sessions_gone(grace)
        for session in list(self.sessions):
            if not session.delivering:
                session.cut_off()
            else:
                session.stop_checks()
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


def store_failure_reply(error: BaseException) -> Reply:
    """What a message the store or the queue could not take is answered (RFC 3463)."""
    if isinstance(error, HandOffFailed):
        return replies.HAND_OFF_FAILED
    if isinstance(error, DeliveryError):
        errors = [e for _, e in error.errors]
        if any(isinstance(e, DiskFullError) for e in errors):
            return replies.INSUFFICIENT_STORAGE
        full = any(isinstance(e, QuotaExceededError) for e in errors)
        return replies.OVER_QUOTA if full and not error.delivered else replies.TEMPORARY_FAILURE
    return replies.INSUFFICIENT_STORAGE if isinstance(error, DiskFullError) else replies.TEMPORARY_FAILURE


def policy_reply(refusal: Refusal) -> Reply:
    return Reply(refusal.code, refusal.enhanced, refusal.text)


class SMTPAgent(AiosmtpdConnection):
    """One SMTP connection of an agent; a subclass answers the core's questions."""

    MX = False  # mail from other servers (the whole policy chain), not from our users
    CHECKED = True  # the policy chain runs (not for a cluster's LMTP hand-off: mtad/lmtp.py)
    service = "smtp"  # the metrics' name of its listener: smtp, submission, submissions

    def __init__(self, context: AgentContext, session_config: SessionConfig, logger: str):
        config = context.config
        super().__init__(hostname=config.server.hostname, tls_context=context.tls, timeout=config.smtp.timeout)
        self.context = context
        self.sid = session_id()
        self.log = EventLogger(logger).bind(sid=self.sid)
        self.core = Session(session_config)
        self._peer = ""
        self._idle = False  # waiting for a command: a stop tells it at once
        self._handshaking = False  # STARTTLS's handshake under way: a stop drops it at once
        # The end-of-data checks under way, as a task when they wait on a peer, and whether a
        # stop's grace gave them up (stop_checks).
        self._judging: asyncio.Future | None = None
        self._checks_given_up = False
        self._judged: Route | None = None  # the route those checks are about: a release lets go of it
        self.delivering = False  # a message is being stored: a stop waits for its reply
        self.policy: SessionPolicy | None = None  # made once the client's address is known

    def admit(self, ip: str) -> bool:
        """The connection limits ([smtp] max_connections, max_connections_per_ip) let it in."""
        return self.context.admit(ip)

    def release(self, ip: str) -> None:
        self.context.release(ip)

    def refusal(self) -> tuple[Reply, str]:
        """What a connection `admit` turned away is told, and the log's reason."""
        return replies.TOO_MANY_CONNECTIONS, "too many connections"

    # -- what a subclass writes -------------------------------------------------------------

    async def answer(self, event: Question) -> Reply:
        raise NotImplementedError

    def take_chunk(self, data: bytes) -> None:
        """Message bytes, as the core passes them on."""
        raise NotImplementedError

    def drop_message(self) -> None:
        """The session ends: a message not finished leaves nothing behind."""

    # -- the session ----------------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self._peer

    async def serve(self) -> None:
        """The whole session: started once the connection is up."""
        self._peer = self.peer_address
        if self.context.policy is not None and self.CHECKED:
            self.policy = self.context.policy.session(self._peer, mx=self.MX)
        if not self.admit(self._peer):
            metrics.connection(self.service, accepted=False)
            reply, reason = self.refusal()
            self.log.warning("connection_refused", client=self._peer, reason=reason)
            self.write(reply.lines())
            self.close()
            return
        metrics.connection(self.service, accepted=True)
        self.log.info("connect", client=self._peer, port=self.peer_port)
        smtp = self.context.config.smtp
        self.context.sessions.add(self)
        try:
            if self.policy is not None:
                refusal = await self.policy.connect()
                if refusal is not None:
                    self.log.warning("connection_refused", client=self._peer, reason=refusal.why)
                    self.core.data_to_send()  # no 220: the refusal is the greeting (RFC 5321 §3.1)
                    self.core.close(policy_reply(refusal))
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
            self.drop_message()  # one cut off mid-message leaves nothing behind
            self.release(self._peer)
            metrics.connection_closed(self.service)
            self.log.info("disconnect", client=self._peer)
            self.close()

    def stop_if_idle(self) -> None:
        """The daemon stops: a session waiting for a command hears 421 4.3.2 now (RFC 5321
        §3.8); any other hears it once its current command is answered."""
        if self._handshaking and not self.closing:  # closing: told already (a listener's stop before)
            self._drop_in_handshake()
        elif self._idle and not self.disconnected:
            self.log.info("shutdown")
            self.core.close(replies.SHUTTING_DOWN)
            self.write(self.core.data_to_send())
            self.close()

    def stop_checks(self) -> None:
        """The grace period is over: end-of-data checks still under way (a clamd or DNS
        server that does not answer) are given up, and the message is answered 451 4.3.2;
        a commit under way is not touched (the store settles it, the client hears it)."""
        if self._judging is not None and not self._judging.done():
            self._checks_given_up = True
            self._judging.cancel()

    def _drop_in_handshake(self) -> None:
        """The daemon stops during STARTTLS: the client waits on the handshake as an idle one
        waits for its next command, but a 421 in plaintext would land inside the handshake:
        the connection is dropped instead."""
        self.log.info("shutdown", handshake=True)
        self.abort()

    def cut_off(self) -> None:
        """The grace period is over: say 421 4.3.2 and drop the connection, whatever it
        was sending (a message not finished is not stored)."""
        if self.disconnected:
            return
        if not self.core.closed and not self._handshaking:  # no plaintext inside a TLS handshake
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
                self.take_chunk(event.data)
            elif isinstance(event, StartTLS):
                await self._send()
                if self.context.stopping:  # came with the stop: no handshake to hold it up
                    self._drop_in_handshake()
                    return False
                self._handshaking = True
                try:
                    await self.start_tls()
                finally:
                    self._handshaking = False
                self.core.tls_established()
                self.log.info("starttls", version=self.tls_version())
            else:
                reply = await self._answer(event)
                self._count(event, reply)
                self.core.answer(event, reply)
                if self.context.stopping and not self.core.receiving:
                    # The daemon stops: what the client pipelined behind this command is not
                    # taken (serve() sends the replies so far, then 421), or a client that
                    # pipelines transactions would go on committing past the grace.
                    return True

    def _count(self, event: Question, reply: Reply) -> None:
        """The metrics of a message's end (accepted, deferred, refused) and of a refused
        MAIL or RCPT, by the reply's enhanced status code."""
        if isinstance(event, DataEnd):
            metrics.message(self.service, reply.code, reply.enhanced)
        elif reply.code >= 400 and isinstance(event, (MailFrom, RcptTo)):
            metrics.refused_command(self.service, "MAIL" if isinstance(event, MailFrom) else "RCPT", reply.code,
                                    reply.enhanced)

    async def _answer(self, event: Question) -> Reply:
        try:
            return await self.answer(event)
        except Exception:
            self.log.error("decision_failed", exc_info=True, question=type(event).__name__)
            return Reply(451, "4.3.0", f"Temporary failure, session {self.sid}; try again later")

    def report_success(self, qid: str, mail, recipients, head: bytes) -> None:
        """After the 250: a "delivered" report for each local recipient that asked for one
        (NOTIFY=SUCCESS, mtad/success.py), made and sent in a delivery thread."""
        if not recipients.success or not mail.address:
            return
        from mtad.success import send_success_report

        context = self.context
        future = asyncio.ensure_future(context.deliver_in_thread(functools.partial(
            send_success_report, store=context.store, accounts=context.accounts, outbound=context.outbound,
            hostname=context.config.server.hostname, qid=qid, sender=mail.address, envid=mail.dsn.envid,
            arrival=time.time(), delivered=dict(recipients.success), head=bytes(head), smtputf8=mail.smtputf8,
            eight_bit=(mail.params.get("BODY") or "").upper() == "8BITMIME")))
        context.deliveries.add(future)
        future.add_done_callback(self._report_done)

    def _report_done(self, future: asyncio.Future) -> None:
        self.context.deliveries.discard(future)
        if not future.cancelled() and future.exception() is not None:
            self.log.error("dsn_failed", error=type(future.exception()).__name__)

    def _orphaned(self, error: BaseException) -> None:
        """A delivery failed after its commit began; logged here if its session is gone."""
        if self.closing:
            self.log.error("store_failed_after_disconnect", error=type(error).__name__)

    async def _send(self) -> None:
        data = self.core.data_to_send()
        if data:
            self.write(data)
            await self.drain()

    # -- the policy's verdict at the end of the data, shared by the MX and submission ---------

    async def judge(self, route: Route, size: int, recipients: list[str], accounts: list[str]) -> Reply | Decision:
        """The policy's end-of-data checks on `route` before its commit: the reply refusing
        the message (the route closed), or the decision, its header fields put in front and a
        Junk verdict applied to `accounts`' copies. `recipients`: greylisting's triplets."""
        checks = self.policy.end_of_data(route.read_back, recipients)
        if self.policy.waits():  # a task, which a stop's grace can give up on (stop_checks)
            checks = self._judging = asyncio.ensure_future(checks)
        self._judged = route
        try:
            try:
                decision = await checks
            except asyncio.CancelledError:
                if not self._checks_given_up or asyncio.current_task().cancelling():
                    raise
                # The stop's grace ran out first (a clamd or DNS server that does not
                # answer): a 451 now, not a connection dropped at the stop's deadline.
                self.log.info("message_refused", qid=self._qid, size=size, reason="451 4.3.2", why="shutdown")
                route.close()
                return replies.CHECKS_STOPPED
            finally:
                self._judging = self._judged = None
            if decision.refused:
                sender = self._mail.address if self._mail is not None else ""
                self.log.info("message_refused", qid=self._qid, size=size, sender=sender or "<>",
                              reason=f"{decision.code} {decision.enhanced}", why=decision.why,
                              **self.policy.summary(decision))
                route.close()
                return Reply(decision.code, decision.enhanced, decision.text)
            junk = decision.action == "junk"
            mailboxes = await self.junk_mailboxes(accounts) if junk and accounts else None
            route.verdict(self.policy.header_fields(decision), mailboxes, junk=junk)
        except (StoreError, OSError) as e:  # the route is closed: nothing of it stays
            route.close()
            self.log.error("store_failed", qid=self._qid, error=type(e).__name__)
            return store_failure_reply(e)
        except BaseException:
            route.close()
            raise
        return decision

    async def junk_mailboxes(self, accounts: list[str]) -> dict[str, str]:
        """Where a Junk verdict files each account's copy: its \\Junk mailbox (made if none).
        In a cluster, an account whose shard this node no longer holds (let go of while the
        message came in: a drain) is left out: its copy goes to its owner, which files it in
        Junk by the verdict the hand-off carries (LMTP's XJUNK)."""
        store, fallback = self.context.store, self.context.config.policy.junk_mailbox

        def junk_mailbox(account: str) -> str | None:
            try:
                return store.junk_mailbox(account, fallback)
            except NotOwnerError:
                return None

        return await self.context.deliver_in_thread(
            lambda: {account: mailbox for account in accounts if (mailbox := junk_mailbox(account)) is not None})

    # -- recipients, shared by the MX and submission ------------------------------------------

    def _answer_recipient(self, event, decide: Callable[[], Reply], not_local: Callable[[], Reply]) -> Reply:
        """RCPT answered by `decide()`, with the accounts' errors turned into replies the same
        way on both agents; `not_local()` answers an address of another domain (the MX
        refuses to relay, submission queues it). Logged and noted for the summary line."""
        address = event.address
        try:
            outcome = decide()
        except NotLocalError:
            outcome = not_local()
        except (UnknownAddressError, AccountError):
            outcome = replies.NO_SUCH_USER
        except AliasLoopError:
            outcome = Reply(554, "5.4.6", "Alias loop")
        except AddressError as e:
            outcome = Reply(553, "5.1.3", f"Bad recipient address: {e}")
        except NoOwnerError:
            outcome = replies.NO_OWNER_NOW
        except NoQueueError:  # a cluster node holding no shard just now: nowhere to queue
            outcome = replies.TEMPORARY_FAILURE
        self.log.info("rcpt", to=address, result=f"{outcome.code} {outcome.enhanced}")
        self._outcomes.append(f"{address}:{outcome.code}")
        return outcome

    async def owners_known(self, address: str) -> None:
        """In a cluster: wait (up to OWNER_WAIT) while a shard of `address`'s mailboxes is
        between owners, as for the moment a drain or a rebalance hands it over, so that
        the RCPT is not told 451 for that; a node that died takes up to its lease's TTL.
        Not once this daemon stops: its node's shards are "leaving" then, their next owner
        never shows in this node's table (its agent follows the cluster no more), and a
        wait here held this session, and the stop with it, for OWNER_WAIT: a hand-off the
        other nodes tried to those shards meanwhile waited as long, and was answered 451."""
        try:
            accounts = [str(a) for a in self.context.accounts.resolve(address).local]
        except (AccountError, AddressError, NotLocalError):
            return  # the RCPT's own answer says so
        router = self.context.router
        deadline = asyncio.get_running_loop().time() + OWNER_WAIT
        for account in accounts:
            while True:
                try:
                    router.owner(account)
                    break
                except NoOwnerError:
                    if self.context.stopping or asyncio.get_running_loop().time() >= deadline:
                        # The RCPT says 451 4.4.0; an LMTP one for a shard still held here
                        # is taken (mtad/lmtp.py), its DATA told 421 by the stop, and the
                        # handing node waits for the next owner (mtad/routing.py).
                        return
                    await asyncio.sleep(0.05)

    def _take_local(self, event) -> Reply:
        """A recipient of our domains: its mailboxes and its alias's remote targets join
        the transaction, unless one of the mailboxes is full."""
        resolution = self.context.accounts.resolve(event.address)
        router = self.context.router
        # A mailbox another node owns is that node's to say full (at its LMTP RCPT).
        if any(self.context.store.is_full(str(a)) for a in resolution.local
               if router is None or router.owner(str(a)) is None):
            return replies.OVER_QUOTA
        if resolution.remote:
            self.context.outbound.open_queue()
        if resolution.local:
            self._recipients.add_local(event.address, [str(a) for a in resolution.local], event.dsn, router)
        for target in resolution.remote:
            self._recipients.add_remote(target, event.dsn, via=event.address)
        return replies.RECIPIENT_OK
