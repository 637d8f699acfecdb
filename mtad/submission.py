"""The submission agent (RFC 6409): where our users' mail clients send mail, on [submission]
listen (STARTTLS, 587) and listen_tls (implicit TLS, 465, RFC 8314). It answers the SMTP
core's questions (mtad/agent.py runs the connection and the stop; mtad/routing.py stores
and queues):

- AUTH PLAIN and LOGIN (RFC 4954; the core offers them only once the session is TLS and
  refuses MAIL before them): the password is checked in the login threads against the
  accounts; a failure is answered 535 5.7.8 after the login throttle's delay for the
  client's address (policy/logins.py, shared with IMAP, POP3 and every mtad worker).
- MAIL: the envelope sender must be the user's (Accounts.may_send_as: the address, a
  sub-address of it, or an alias that reaches the user), else 553 5.7.1.
- RCPT: a local address is resolved as the MX does (into mailboxes, and an alias's remote
  targets into the queue); any other goes to the outbound queue.
- DSN (RFC 3461): NOTIFY, ORCPT, RET and ENVID go into the queue entry; a local recipient
  with NOTIFY=SUCCESS gets the user a "delivered" report (mtad/success.py).
- the message: its header section is read first (mtad/headers.py; at most what the core
  passes on, 1 MiB), and checked: exactly one From: field, each of its addresses the
  user's, else 553 5.7.1 at the end of the data (550 5.6.0 for a From: that cannot be read).
  Date: and Message-ID: are added when missing (RFC 6409 §8.2, §8.3). Then the message
  streams into the store and the queue behind a Received: header that says ESMTPSA (RFC
  3848) and the user, and leaves the client's address out with [submission] hide_client_ip.
  The queue's copy is DKIM-signed for the domain of its From: address.

No copy is kept for the sender: mail clients store their own in Sent (IMAP APPEND).
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable

from mtad import replies
from mtad.agent import AgentContext, SMTPAgent, policy_reply, store_failure_reply
from mtad.events import Auth, DataEnd, Hello, MailFrom, Question, RcptTo
from mtad.headers import HeaderBlock, HeaderTooBigError, fields, from_addresses, missing_fields
from mtad.inbound import MAX_RECEIVED, message_id, sanitize_helo
from mtad.replies import Reply
from mtad.routing import Recipients, Route
from mtad.session import SessionConfig
from policy.logins import LoginThrottle
from policy.message_scan import without_forged_results
from storage import (
    Address,
    AddressError,
    DeliveryError,
    StoreError,
    parse_address,
)
from wire import metrics


class SubmissionSMTP(SMTPAgent):
    """One connection from a user's mail client."""

    def __init__(self, context: AgentContext, throttle: LoginThrottle, run_login: Callable, *,
                 implicit_tls: bool = False):
        config = context.config
        super().__init__(context, SessionConfig(
            hostname=config.server.hostname,
            max_message_size=config.smtp.max_message_size,
            max_recipients=config.smtp.max_recipients,
            tls_available=context.tls is not None and not implicit_tls,
            is_tls=implicit_tls,
            auth=True,
            dsn=True,
        ), "mtad.submission")
        self.service = "submissions" if implicit_tls else "submission"
        self.throttle = throttle
        self.run_login = run_login
        self.user: Address | None = None
        self._recipients = Recipients()
        self._outcomes: list[str] = []
        self._mail: MailFrom | None = None
        self._headers: HeaderBlock | None = None  # the message's header section, until it is complete
        self._route: Route | None = None
        self._qid = ""
        self._refusal: Reply | None = None  # the message will be refused: its header said so
        self._write_failed: BaseException | None = None
        self._sign_domain: str | None = None

    async def answer(self, event: Question) -> Reply:
        if isinstance(event, Hello):
            self.log.info("helo", name=event.name)
            return replies.OK
        if isinstance(event, Auth):
            return await self._authenticate(event)
        if isinstance(event, MailFrom):
            reply = self._sender(event)
            if reply.code == 250 and self.policy is not None:
                refusal = await self.policy.mail(event.address, str(self.user))
                if refusal is not None:
                    self._mail = None
                    self.log.info("sender_refused", sender=event.address, reason=refusal.why)
                    return policy_reply(refusal)
            return reply
        if isinstance(event, RcptTo):
            if self.policy is not None:
                refusal = await self.policy.recipient(event.address, str(self.user))
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

    # -- AUTH --------------------------------------------------------------------------------

    async def _authenticate(self, event: Auth) -> Reply:
        """The password checked off the event loop (argon2id), concurrent checks capped; a
        failure waits out the throttle's delay for this address before its 535."""
        throttle = self.throttle
        async with throttle.checks:
            user = await self.run_login(self.context.accounts.authenticate, event.authcid, event.password)
        if user is not None and event.authzid and not _same_address(event.authzid, user.address):
            user = None  # acting as another user is not offered
        metrics.login("submission", ok=user is not None)
        if user is None:
            delay = throttle.failed(self.peer)
            self.log.warning("login_failed", user=event.authcid[:100], ip=self.peer, mechanism=event.mechanism,
                             delay=delay)
            await asyncio.sleep(delay)
            return replies.AUTH_FAILED
        throttle.succeeded(self.peer)
        self.user = user.address
        self.log = self.log.bind(user=str(user.address))
        self.log.info("login", ip=self.peer, mechanism=event.mechanism, tls=self.tls_version())
        return replies.AUTH_OK

    # -- the envelope ------------------------------------------------------------------------

    def _sender(self, event: MailFrom) -> Reply:
        self._recipients.clear()
        self._outcomes.clear()
        self.drop_message()
        self._mail = None
        if not event.address or not self.context.accounts.may_send_as(self.user, event.address):
            self.log.info("sender_refused", sender=event.address or "<>")
            return replies.SENDER_NOT_OWNED
        self._mail = event
        return replies.SENDER_OK

    def _recipient(self, event: RcptTo) -> Reply:
        return self._answer_recipient(event, lambda: self._take_local(event), lambda: self._remote_recipient(event))

    def _remote_recipient(self, event: RcptTo) -> Reply:
        try:
            parse_address(event.address, fold_case=False)
        except AddressError as e:
            return Reply(553, "5.1.3", f"Bad recipient address: {e}")
        self.context.outbound.open_queue()
        self._recipients.add_remote(event.address, event.dsn)
        return replies.RECIPIENT_OK

    # -- the message ---------------------------------------------------------------------------

    def take_chunk(self, data: bytes) -> None:
        """The header section is held until it is complete (and checked); from there on
        each chunk goes into the store and the queue as it comes."""
        if self._refusal is not None or self._write_failed is not None:
            return
        if self._route is not None:
            self._write(data)
            return
        if self._headers is None:
            self._headers = HeaderBlock()
        try:
            complete = self._headers.feed(data)
        except HeaderTooBigError:
            self._refusal, self._headers = replies.HEADER_TOO_BIG, None
            return
        if complete:
            self._begin_message()

    def _begin_message(self) -> None:
        """The header is complete: check it, complete it, and start the message's route."""
        block, self._headers = self._headers, None
        header = block.header
        if header and not header.endswith(b"\r\n"):
            header += b"\r\n"  # a message that ends inside its last header line
        config = self.context.config
        header, forged = without_forged_results(header, config.policy.authserv_id or config.server.hostname)
        if forged:
            self.log.info("forged_results_removed", count=forged)
        header_fields = fields(header)
        self._refusal = self._check_from(header_fields)
        if self._refusal is not None:
            return
        added = missing_fields(header_fields, self.context.config.server.hostname)
        mail = self._mail
        envelope = None
        if self._recipients.remote:
            envelope = self.context.outbound.envelope(
                sender=mail.address, recipients=self._recipients.remote, envid=mail.dsn.envid, ret=mail.dsn.ret,
                smtputf8=mail.smtputf8, eight_bit=(mail.params.get("BODY") or "").upper() == "8BITMIME",
                origin="submission", user=str(self.user))
        try:
            route = Route(self.context.store, self.context.outbound, accounts=self._recipients.accounts(),
                          envelope=envelope, sign_domain=self._sign_domain, handoffs=self._recipients.handoffs,
                          router=self.context.router)
            self._qid = route.queue_id or message_id(self.sid)
            received = self._received(self._qid)
            route.start(f"Return-Path: <{mail.address}>\r\n".encode("utf-8", "surrogateescape") + received, received)
            self._route = route
        except StoreError as e:
            self._fail_write(e)
            return
        self._write(header + added + block.rest)

    def _check_from(self, header_fields: list[tuple[str, str]]) -> Reply | None:
        """None if the From: field names the user (RFC 5322 §3.6: exactly one), else the
        refusal; the domain to sign for is its first address's."""
        values = [value for name, value in header_fields if name == "from"]
        addresses = from_addresses(values[0]) if len(values) == 1 else None
        if addresses is None:
            self.log.info("from_refused", fields=len(values))
            return replies.NO_FROM
        for address in addresses:
            if not self.context.accounts.may_send_as(self.user, address):
                self.log.info("from_refused", from_=address[:200])
                return replies.FROM_NOT_OWNED
        self._sign_domain = parse_address(addresses[0]).domain
        return None

    def _write(self, data: bytes) -> None:
        try:
            self._route.write(data)
        except StoreError as e:
            self._fail_write(e)

    def _fail_write(self, error: BaseException) -> None:
        """A full disk (or any write error) fails the message, not the session: the rest of
        its data is read and dropped, and its end answered 452 4.3.1 or 451 4.3.0."""
        self._route, self._write_failed = None, error
        self.log.error("store_write_failed", qid=self._qid, error=type(error).__name__)

    def drop_message(self) -> None:
        if self._route is not None:
            self._route.close()
        self._route, self._write_failed, self._refusal, self._headers = None, None, None, None
        self._sign_domain = None

    async def _end_of_data(self, end: DataEnd) -> Reply:
        self.delivering = True
        try:
            if end.refusal is None and self._refusal is None and self._write_failed is None and self._route is None:
                self._headers = self._headers or HeaderBlock()
                self._headers.finish()  # a message that is all header (or empty)
                self._begin_message()
            route, failed, refusal = self._route, self._write_failed, self._refusal
            self._route, self._write_failed, self._refusal = None, None, None
            reply = None
            if end.refusal is not None:
                reply = end.refusal
            elif end.received_headers > MAX_RECEIVED:
                reply = replies.MAIL_LOOP
            elif refusal is not None:
                reply = refusal
            elif failed is not None:
                reply = store_failure_reply(failed)
            if reply is not None:
                self.log.info("message_refused", size=end.size, reason=f"{reply.code} {reply.enhanced}")
                if route is not None:
                    route.close()
                return reply
            return await self._scan_and_deliver(route, end)
        finally:
            self._headers = None
            self.delivering = False
            self.context.changed.set()

    async def _scan_and_deliver(self, route: Route, end: DataEnd) -> Reply:
        """The anti-virus scan, if [clamav] is on, then the delivery."""
        if self.policy is None or self.context.policy.scanner is None:
            return await self._deliver(route)
        verdict = await self.judge(route, end.size, [], [])
        if isinstance(verdict, Reply):
            return verdict
        return await self._deliver(route, self.policy.summary(verdict))

    async def _deliver(self, route: Route, results: dict[str, str] | None = None) -> Reply:
        qid, size = self._qid, route.size
        started = time.perf_counter()
        try:
            committed = await route.commit(self.context.deliver_in_thread, self.context.deliveries,
                                           orphaned=self._orphaned, helo=self.context.config.server.hostname,
                                           sender=self._mail.address if self._mail is not None else "",
                                           smtputf8=self._mail is not None and self._mail.smtputf8,
                                           eight_bit=self._mail is not None and
                                           (self._mail.params.get("BODY") or "").upper() == "8BITMIME",
                                           writer=self.context.writer)
        except (DeliveryError, StoreError, OSError) as e:
            metrics.delivery("local", "failed", time.perf_counter() - started)
            self.log.error("store_failed", qid=qid, error=type(e).__name__)
            return store_failure_reply(e)
        metrics.delivery("local", "delivered", time.perf_counter() - started)
        self.log.info("message_accepted", qid=qid, message_id=committed.message_id[:200], size=size,
                      sender=self._mail.address, recipients=",".join(self._outcomes),
                      mailboxes=len(committed.delivered), remote=len(self._recipients.remote), **(results or {}))
        self.report_success(qid, self._mail, self._recipients, route.head)
        self._recipients.clear()
        return Reply(250, "2.0.0", f"OK: queued as {qid}")

    def _received(self, qid: str) -> bytes:
        """Received: (RFC 5321 §4.4) with ESMTPSA or ESMTPA (RFC 3848) and the user; the
        client's address only without [submission] hide_client_ip."""
        tls = self.tls_version()
        protocol = "ESMTPSA" if tls else "ESMTPA"
        helo = sanitize_helo(self.core.helo_name)
        if self.context.config.submission.hide_client_ip:
            if helo.startswith("["):
                helo = "unknown"  # an address literal is the address
            origin = helo
        else:
            origin = f"{helo} ([{self.peer}])"
        accepted = [o.rpartition(":")[0] for o in self._outcomes if o.endswith(":250")]
        for_clause = f"\r\n\tfor <{accepted[0]}>" if len(accepted) == 1 else ""
        tls_clause = f"\r\n\t(using {tls} with cipher {self.tls_cipher()})" if tls else ""
        user = sanitize_helo(str(self.user))
        received = (f"Received: from {origin}\r\n\tby {self.context.config.server.hostname} (Postroom) "
                    f"with {protocol} id {qid}{tls_clause}\r\n\t(authenticated user {user}){for_clause};\r\n\t"
                    f"{email.utils.formatdate(time.time(), localtime=True)}\r\n")
        return received.encode("utf-8", "surrogateescape")


def _same_address(authzid: str, user: Address) -> bool:
    try:
        return parse_address(authzid) == user
    except AddressError:
        return False
