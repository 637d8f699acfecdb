"""The inbound MX agent: answers the SMTP core's questions for mail from other MTAs
(mtad/agent.py runs the connection and the stop; mtad/routing.py stores and queues).

- RCPT: the accounts database (local users, aliases, catch-alls, sub-addresses); relay
  tricks and other domains are refused; over quota is 452 4.2.2. An alias's remote targets
  are forwarded through the outbound queue, the envelope sender rewritten by SRS
  (mtad/srs.py) so that the forward passes SPF at its destination; mail to one of our SRS
  addresses (a bounce of a forward) goes back to the sender it stands for.
- DSN (RFC 3461): offered; NOTIFY, ORCPT, RET and ENVID go with the forwarded recipients,
  and a local recipient with NOTIFY=SUCCESS gets the sender a report (mtad/success.py).
- message data: streamed into the store and the queue as it arrives (mtad/routing.py): the
  Return-Path: and Received: headers (RFC 5321 §4.4) first, as the first chunk comes, then
  each chunk; nothing holds the message in memory. At its end the delivery is committed for
  every recipient; 250 only once every copy is durable.
"""

from __future__ import annotations

import email.utils
import functools
import itertools
import time

from mtad import replies
from mtad.agent import AgentContext, SMTPAgent, policy_reply, store_failure_reply
from mtad.events import DataEnd, Hello, MailFrom, Question, RcptTo
from mtad.replies import Reply
from mtad.routing import Recipients, Route
from mtad.session import SessionConfig
from storage import (
    DeliveryError,
    NotLocalError,
    StoreError,
    parse_address,
)
from wire import metrics

MAX_RECEIVED = 100  # more Received: headers than this is a loop (RFC 5321 §6.3)
_counter = itertools.count(1)
_RECEIVED_UNSAFE = str.maketrans({c: "?" for c in '();\\"<>'})
SRS_PREFIXES = ("srs0=", "srs1=")


def message_id(sid: str) -> str:
    """The id of one message of a session: in its Received: header and its log lines."""
    return f"{sid}{next(_counter):04X}"


@functools.lru_cache(maxsize=2)
def received_date(second: int) -> str:
    """The date-time of a Received: header (RFC 5322 §3.3, local time), which is to the
    second: made once a second rather than once a message (formatdate and its time zone
    work take 10 to 20 us a call; a lookup here, half a microsecond)."""
    return email.utils.formatdate(second, localtime=True)


def sanitize_helo(name: str | None) -> str:
    """The client's word, in a header others parse: the characters that would end or open
    a Received: token (RFC 5321 §4.4: ";" ends the clauses, "(" a comment) go."""
    return (name or "unknown").translate(_RECEIVED_UNSAFE)


class InboundSMTP(SMTPAgent):
    """One SMTP connection from another MTA."""

    MX = True
    PROTOCOL = "ESMTP"  # the Received: header's "with" (RFC 3848), "S" added under TLS

    def __init__(self, context: AgentContext, *, implicit_tls: bool = False):
        super().__init__(context, self.session_config(context, implicit_tls), "mtad.inbound")
        self._recipients = Recipients()
        self._outcomes: list[str] = []  # "address:code" of every RCPT of the transaction
        self._mail: MailFrom | None = None
        self._route: Route | None = None  # the message being received, from its first chunk
        self._qid = ""
        self._write_failed: BaseException | None = None  # the store could not take the message

    @staticmethod
    def session_config(context: AgentContext, implicit_tls: bool) -> SessionConfig:
        config = context.config
        return SessionConfig(hostname=config.server.hostname, max_message_size=config.smtp.max_message_size,
                             max_recipients=config.smtp.max_recipients, tls_available=context.tls is not None,
                             is_tls=implicit_tls, dsn=True)

    async def answer(self, event: Question) -> Reply:
        """The reply to one of the core's questions."""
        if isinstance(event, Hello):
            self.log.info("helo", name=event.name)
            if self.policy is not None:
                self.policy.hello(event.name)
            return replies.OK
        if isinstance(event, MailFrom):
            self._recipients.clear()
            self._outcomes.clear()
            self.drop_message()  # a transaction given up (RSET during BDAT) and not ended
            self._mail = None
            if self.policy is not None:
                refusal = await self.policy.mail(event.address, None)
                if refusal is not None:
                    self.log.info("sender_refused", sender=event.address or "<>", reason=refusal.why,
                                  **self.policy.summary())
                    return policy_reply(refusal)
            self._mail = event
            return replies.SENDER_OK
        if isinstance(event, RcptTo):
            if self.policy is not None:
                refusal = await self.policy.recipient(event.address, None)
                if refusal is not None:
                    self.log.info("rcpt", to=event.address, result=f"{refusal.code} {refusal.enhanced}",
                                  reason=refusal.why)
                    self._outcomes.append(f"{event.address}:{refusal.code}")
                    return policy_reply(refusal)
            if self.context.router is not None:
                await self.owners_known(event.address)
            return self._recipient(event)
        if isinstance(event, DataEnd):
            return await self._end_of_data(event)
        raise RuntimeError(f"no decision for {event!r}")

    @property
    def _sender(self) -> str:
        return self._mail.address if self._mail is not None else ""

    def _recipient(self, event: RcptTo) -> Reply:
        return self._answer_recipient(event, lambda: self._mx_recipient(event), lambda: replies.RELAY_DENIED)

    def _mx_recipient(self, event: RcptTo) -> Reply:
        local, _, domain = event.address.rpartition("@")
        if "%" in local or "!" in local:
            # user%remote@local and remote!user@local: old source routing, a relay trick.
            parse_address(event.address)  # an address from another domain is still plain relaying
            return Reply(553, "5.7.1", "Address with % or ! not accepted here")
        if local.lower().startswith(SRS_PREFIXES) and self._is_srs_domain(domain):
            return self._srs_recipient(event)
        return self._take_local(event)

    def _is_srs_domain(self, domain: str) -> bool:
        config = self.context.config
        return self.context.outbound is not None and \
            domain.lower() == (config.srs.domain or config.server.hostname).lower()

    def _srs_recipient(self, event: RcptTo) -> Reply:
        """Mail to one of our SRS addresses: a bounce (or a reply) to a message we
        forwarded, which goes back to the sender it stands for, local or remote."""
        original = self.context.outbound.srs.reverse(event.address)
        if original is None:  # not ours, forged, or expired
            return replies.NO_SUCH_USER
        try:
            resolution = self.context.accounts.resolve(original)
        except NotLocalError:
            self.context.outbound.open_queue()
            self._recipients.add_remote(original, event.dsn)
            return replies.RECIPIENT_OK
        self._recipients.add_local(event.address, [str(a) for a in resolution.local], event.dsn,
                                   self.context.router)
        for target in resolution.remote:
            self._recipients.add_remote(target, event.dsn, via=original)
        return replies.RECIPIENT_OK

    def take_chunk(self, data: bytes) -> None:
        """Message bytes into the store and the queue as they arrive; the trace headers go
        first, with the first chunk. A full disk (or any write error) fails the message,
        not the session: the rest of its data is read and dropped, and its end is answered
        452 4.3.1 (RFC 3463)."""
        if self._write_failed is not None:
            return
        if self.policy is not None:
            data = self.policy.message_bytes(data)
        self._write_chunk(data)

    def _write_chunk(self, data: bytes) -> None:
        if self._write_failed is not None:
            return
        try:
            if self._route is None:
                self._begin_message()
            self._route.write(data)
        except StoreError as e:  # the route is closed: nothing of it stays
            self._route = None
            self._write_failed = e
            self.log.error("store_write_failed", qid=self._qid, error=type(e).__name__)

    def _begin_message(self) -> None:
        envelope = None
        if self._recipients.remote:
            mail = self._mail
            outbound = self.context.outbound
            envelope = outbound.envelope(
                sender=outbound.srs.forward(self._sender), recipients=self._recipients.remote,
                envid=mail.dsn.envid, ret=mail.dsn.ret, smtputf8=mail.smtputf8,
                eight_bit=(mail.params.get("BODY") or "").upper() == "8BITMIME", origin="forward", user=None)
        route = Route(self.context.store, self.context.outbound, accounts=self._recipients.accounts(),
                      envelope=envelope, handoffs=self._recipients.handoffs, router=self.context.router,
                      sent_from=int(self._mail.params.get("XSENT") or 0))  # only LMTP's session takes it
        self._qid = route.queue_id or message_id(self.sid)
        received = self._received(self._qid)
        route.start(f"Return-Path: <{self._sender}>\r\n".encode("utf-8", "surrogateescape") + received, received)
        self._route = route

    def drop_message(self) -> None:
        if self._route is not None:
            self._route.close()
        self._route, self._write_failed = None, None

    async def _end_of_data(self, end: DataEnd) -> Reply:
        self.delivering = True
        try:
            if end.refusal is None and end.received_headers <= MAX_RECEIVED and self._write_failed is None:
                # What the policy still holds (a message that is all header), or, for an
                # empty message, the trace headers alone.
                held = self.policy.message_end() if self.policy is not None else b""
                if held or self._route is None:
                    self._write_chunk(held)
            route, failed = self._route, self._write_failed
            self._route, self._write_failed = None, None
            if end.refusal is not None:
                self.log.info("message_refused", size=end.size, reason=f"{end.refusal.code} {end.refusal.enhanced}")
                reply = end.refusal
            elif end.received_headers > MAX_RECEIVED:
                self.log.info("message_refused", size=end.size, reason="mail loop")
                reply = replies.MAIL_LOOP
            elif failed is not None:
                self.log.info("message_refused", size=end.size, reason="store write failed")
                reply = store_failure_reply(failed)
            else:
                handed, route = route, None  # from here on the commit owns it, and closes it
                return await self._judge_and_deliver(handed, end)
            if route is not None:
                route.close()
            return reply
        finally:
            self.delivering = False
            self.context.changed.set()

    async def _judge_and_deliver(self, route: Route, end: DataEnd) -> Reply:
        """The policy's end-of-data checks and its verdict, then the delivery."""
        if self.policy is None:
            return await self._deliver(route)
        # Greylisting's triplets: every recipient taken, local or forwarded.
        accepted = [o.rpartition(":")[0] for o in self._outcomes if o.endswith(":250")]
        verdict = await self.judge(route, end.size, accepted, self._recipients.accounts())
        if isinstance(verdict, Reply):
            return verdict
        reply = await self._deliver(route, self.policy.summary(verdict))
        if reply.code == 250:
            self.policy.accepted(verdict)
        return reply

    async def _deliver(self, route: Route, results: dict[str, str] | None = None) -> Reply:
        """Commit the message for every recipient: 250 once every copy is durable."""
        qid, accounts, size = self._qid, self._recipients.accounts(), route.size
        started = time.perf_counter()
        try:
            committed = await route.commit(self.context.deliver_in_thread, self.context.deliveries,
                                           orphaned=self._orphaned, helo=self.context.config.server.hostname,
                                           sender=self._sender,
                                           smtputf8=self._mail is not None and self._mail.smtputf8,
                                           eight_bit=self._mail is not None and
                                           (self._mail.params.get("BODY") or "").upper() == "8BITMIME",
                                           writer=self.context.writer)
        except (DeliveryError, StoreError, OSError) as e:
            metrics.delivery("local", "failed", time.perf_counter() - started)
            errors = [error for _, error in e.errors] if isinstance(e, DeliveryError) else [e]
            self.log.error("store_failed", qid=qid, error=type(errors[0]).__name__, reason=str(errors[0])[:200],
                           delivered=len(e.delivered) if isinstance(e, DeliveryError) else 0, failed=len(errors))
            return store_failure_reply(e)
        metrics.delivery("local", "delivered", time.perf_counter() - started)
        message_id = committed.message_id[:200]
        duplicates = [d.account for d in committed.delivered if d.duplicate]
        if duplicates:
            # A sender that lost our 250 sent it again: the copies it reached are kept as they are.
            self.log.info("message_duplicate", qid=qid, message_id=message_id, mailboxes=",".join(duplicates))
        extra = {"forwarded": len(self._recipients.remote)} if committed.queue_id else {}
        self.log.info("message_accepted", qid=qid, message_id=message_id, size=size,
                      sender=self._sender or "<>", recipients=",".join(self._outcomes), mailboxes=len(accounts),
                      duplicates=len(duplicates), **extra, **(results or {}))
        self.report_success(qid, self._mail, self._recipients, route.head)
        self._recipients.clear()
        return Reply(250, "2.0.0", f"OK: queued as {qid}")

    def _received(self, qid: str) -> bytes:
        """A Received: header as RFC 5321 §4.4 and RFC 3848 describe it."""
        tls = self.tls_version()
        protocol = f"{self.PROTOCOL}S" if tls else self.PROTOCOL
        recipients = [o.rpartition(":")[0] for o in self._outcomes if o.endswith(":250")]
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        tls_clause = f"\r\n\t(using {tls} with cipher {self.tls_cipher()})" if tls else ""
        received = (f"Received: from {sanitize_helo(self.core.helo_name)} ([{self.peer}])\r\n\t"
                    f"by {self.context.config.server.hostname} "
                    f"(Postroom) with {protocol} id {qid}{tls_clause}{for_clause};\r\n\t"
                    f"{received_date(int(time.time()))}\r\n")
        return received.encode("utf-8", "surrogateescape")
