"""Where a message goes, for both SMTP agents: its local recipients' mailboxes (the store)
and, for its remote recipients, the outbound queue (storage/queue.py), written together as
the message arrives.

A Route is one message on its way: a store delivery for the local accounts (with the
Return-Path: and Received: headers in front) and a queue entry for the remote recipients
(with the Received: header only: Return-Path: is the final hop's to add, RFC 5321 §4.4),
each chunk written to both. A message with remote recipients is known by its queue id
(given when its queue entry is begun) from its Received: header to its last log line.

Its commit is the promise a 250 makes (DESIGN.md): the store copies first, each durable
or none (the withdrawal below); then the queue entry, signed with DKIM when the message is
our users' (policy/dkim.py: the body hash is computed as the chunks pass, the header
section kept, so signing never holds the message; the signature is given to the queue as
the bytes it puts in front). If the queue cannot
take it, the stored copies are withdrawn too: after a 4xx the client sends the message
again to every recipient, and a copy kept would arrive twice.

Outbound holds what remote recipients need, made on first use: the queue, the DKIM signer
and the SRS rewriter (mtad/srs.py) of the data dir. A daemon that never sees a remote
recipient never opens the queue. The queue is a storage.QueueSet: a single node's one
queue, or in a cluster the queues of the shards this node holds, each message going into
one of them (the submitting user's shard when held here; storage/queues.py); a node that
holds none answers 451 4.3.0 (NoQueueError).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Container, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from conf.logfmt import EventLogger
from conf.schema import Config
from storage import (
    WRITE_IN_COMMITTER,
    DataDir,
    Delivered,
    Delivery,
    DeliveryError,
    QueueSet,
    Store,
    NoOwnerError,
    NotOwnerError,
    StoreError,
)
from wire import node_proof as proof

if TYPE_CHECKING:
    from mtad.events import RcptDSN
    from mtad.writer import WriterClient

_log = EventLogger("mtad.routing")
# A cluster's: how long a RCPT, or a commit whose shard changed hands, waits for the
# mailbox's shard to have an owner again, then 451. A graceful hand-over (a drain, a stop)
# takes HANDOVER_GRACE (1 s) and the shard's detach, after up to [cluster] let_go_wait (10 s) for the
# old owner's processes to let go (cluster/agent.py), and the new owner's attach; a dead
# node's shards, its lease's TTL (10 s by default) and a claim. An SMTP client waits
# minutes for a RCPT's reply (RFC 5321 §4.5.3.2): a wait of seconds is no refusal, and a
# 451 for a drain is one (issue 18: a drain moves shards with no refused delivery).
OWNER_WAIT = 15.0
# Seconds between two looks at the node table while an owner is slow to answer a hand-off
# (Route._begin).
OWNER_LOOK = 0.25
HAND_OVER_TRIES = 3  # owners tried for one copy, when each in turn says it is not the owner any more
UNREACHED = "unreached: "  # a hand-off failure's reason when the owner could not be reached
MAX_HEAD = 64 * 1024  # of a message's first bytes kept for a success report (RFC 3461 §6.2.6.1)


class Outbound:
    """The queue, the DKIM signer and the SRS rewriter of one data dir. `open_queues`: how
    the composition root opens this process's queues (postroom/datadir.py open_queues, in a
    cluster fenced like the store); by default, the data dir's one queue."""

    def __init__(self, config: Config, data_dir: DataDir, open_queues: Callable[[], QueueSet] | None = None):
        self.config = config
        self.data_dir = data_dir
        self._open_queues = open_queues or (lambda: QueueSet(data_dir))

    @cached_property
    def queue(self) -> QueueSet:
        return self._open_queues()

    def open_queue(self) -> None:
        """Open the queue now (or raise): a remote recipient is taken only if it can be queued."""
        self.queue.ready()

    @cached_property
    def signer(self):
        """A DKIMSigner, or None when [dkim] sign is off."""
        if not self.config.dkim.sign:
            return None
        from policy.dkim import DKIMSigner

        return DKIMSigner(self.data_dir.path / "dkim")

    @cached_property
    def srs(self):
        from mtad.srs import SRS, load_secret

        return SRS(load_secret(self.config.srs, self.data_dir), self.config.srs.domain or self.config.server.hostname)

    def envelope(self, *, sender: str, recipients: dict[str, RemoteRecipient], envid: str | None, ret: str | None,
                 smtputf8: bool, eight_bit: bool, origin: str, user: str | None):
        from storage import QueuedRecipient, QueueEnvelope

        queued = tuple(QueuedRecipient(address, r.orcpt, r.notify) for address, r in recipients.items())
        return QueueEnvelope(sender, queued, envid=envid, ret=ret, smtputf8=smtputf8, eight_bit=eight_bit,
                             origin=origin, user=user)


@dataclass(frozen=True)
class RemoteRecipient:
    orcpt: str | None = None  # RFC 3461 ORCPT
    notify: tuple[str, ...] = ()


@dataclass
class Recipients:
    """A transaction's recipients as routed: local ones to accounts, remote ones to the queue."""
    local: dict[str, list[str]] = field(default_factory=dict)  # recipient -> the accounts it reaches
    remote: dict[str, RemoteRecipient] = field(default_factory=dict)  # address -> DSN parameters
    # Local recipients whose RCPT asked NOTIFY=SUCCESS (RFC 3461 §4.1) -> their ORCPT.
    success: dict[str, str | None] = field(default_factory=dict)
    # In a cluster, the accounts whose shard another node owns, by that node's LMTP address.
    handoffs: dict[tuple[str, int], list[str]] = field(default_factory=dict)

    def add_local(self, address: str, accounts: list[str], dsn: RcptDSN, router: Router | None = None) -> None:
        """`accounts` reached through `address`; with a `router`, those another node owns
        are handed to it (RFC 2033 LMTP) rather than stored here. NoOwnerError when one's
        shard has no owner just now (a node failing over): the RCPT is answered 451."""
        here = accounts
        if router is not None:
            owners = {account: router.owner(account) for account in accounts}
            here = [account for account in accounts if owners[account] is None]
            for account, owner in owners.items():
                if owner is not None and account not in self.handoffs.setdefault(owner, []):
                    self.handoffs[owner].append(account)
        self.local[address] = here
        if "SUCCESS" in dsn.notify:
            self.success[address] = dsn.orcpt

    def accounts(self) -> list[str]:
        return list(dict.fromkeys(a for targets in self.local.values() for a in targets))

    def add_remote(self, address: str, dsn: RcptDSN, *, via: str | None = None) -> None:
        """A remote recipient; `via` the local address it was reached through (an alias),
        which becomes its ORCPT if the client gave none (RFC 3461 §4.2, §6.2.7.4)."""
        orcpt = dsn.orcpt or (f"rfc822;{via}" if via else None)
        self.remote.setdefault(address, RemoteRecipient(orcpt, dsn.notify))

    def clear(self) -> None:
        self.local.clear()
        self.remote.clear()
        self.success.clear()
        self.handoffs.clear()


class Router(Protocol):
    """Where an account's mail goes in a cluster (mtad/cluster_router.py)."""

    def owner(self, account: str) -> tuple[str, int] | None:
        """None: this node; else the LMTP address (host, port) of the node that owns the
        account's shard. NoOwnerError between owners."""

    def holds(self, account: str) -> bool:
        """Whether this node may commit to the account's shard now (its claim and lease)."""

    def here(self) -> tuple[str, int]:
        """This node's own LMTP address (host, port)."""

    def is_peer(self, ip: str) -> bool:
        """Whether `ip` is a live node's address: who may hand mail over by LMTP."""

    def node(self) -> str:
        """This node's name."""

    def secret(self) -> bytes | None:
        """The cluster's secret, which a hand-off proves (wire/node_proof.py); None before the
        node's agent has read it."""

    # True once this daemon stops: its node's agent follows the cluster no more (it is
    # leaving), so a shard's next owner will never show in this node's table here.
    stopping: bool


async def owner_now(router: Router, account: str, wait: float = OWNER_WAIT, *,
                    gone: tuple[str, int] | None = None) -> tuple[str, int]:
    """The LMTP address of the node that owns `account`'s shard now, this node's own if it
    holds it; waiting up to `wait` while the shard is between owners (a hand-over, a node's
    lease lapsing), then NoOwnerError. With `gone`, an owner that did not answer: waiting
    too while the table still names it (a node stopping closes its listener before its
    shards move; a dead one keeps them until its lease lapses), and that owner still after
    `wait` if nobody else took them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        owner = None
        try:
            owner = router.owner(account)
            if owner is None and router.holds(account):
                owner = router.here()
            # None: the table names this node but its claim is gone (its lease lapsing):
            # not this node's to take, and handing it to itself would go round in a loop.
        except NoOwnerError:
            pass
        # A stopping node's table shows no next owner, ever (Router.stopping): no wait.
        over = loop.time() >= deadline or getattr(router, "stopping", False)
        if owner is not None and (owner != gone or over):
            return owner
        if over:
            raise NoOwnerError(f"the mailbox of {account} has no owner just now")
        await asyncio.sleep(0.05)


@dataclass
class Committed:
    delivered: list[Delivered]  # the store copies
    queue_id: str | None  # the queue entry, if the message has remote recipients
    message_id: str


class Route:
    """One message on its way to its local mailboxes and the queue: made (the queue entry
    begun, so its id is known for the trace headers), then `start`ed with those headers,
    then written. StoreError from any of it (the route is then closed: nothing of it stays)."""

    def __init__(self, store: Store, outbound: Outbound | None, *, accounts: list[str], envelope=None,
                 sign_domain: str | None = None, handoffs: dict[tuple[str, int], list[str]] | None = None,
                 router: Router | None = None, sent_from: int = 0):
        self._store = store
        # Bytes at the message's start that are a handing node's, not the sender's (LMTP's
        # XSENT, mtad/lmtp.py): left out of the deduplication key, as our own trace headers.
        self._sent_from = sent_from
        self._router = router
        self._outbound = outbound
        self._accounts = accounts
        # In a cluster, the accounts other nodes own, by owner: their copy is kept here, in
        # memory (up to [smtp] max_message_size), and handed over at the commit.
        self._handoffs = dict(handoffs or {})
        self._handed: bytearray | None = bytearray() if self._handoffs else None
        self.delivery: Delivery | None = None
        self.enqueue = outbound.queue.begin(envelope) if envelope is not None else None
        # The queue's copy is DKIM-signed for `sign_domain`: what it is given is digested on the way.
        self._sign_domain = sign_domain if self.enqueue is not None and outbound.signer is not None else None
        self._digest = None
        if self._sign_domain is not None:
            from policy.dkim_body import MessageDigest

            self._digest = MessageDigest()
        self.head = bytearray()  # the message's first bytes (its header, mostly), for a success report
        # Where the local copy's own bytes are, for handing it over if its shard changes hands
        # before the commit: verdict head, then local prefix (Return-Path:, Received:), then
        # the message; the copy handed over has the remote prefix in place of the local one.
        self._local_prefix_size = 0
        self._remote_prefix = b""
        self._verdict_size = 0
        self._junk = False  # the policy's Junk verdict, carried to the owners (LMTP's XJUNK)
        # A cluster's: local accounts whose shard this node released while the message came
        # in (let_go): their copy is the one kept to hand over, to their owner at the commit.
        self._moved: list[str] = []
        self._reading = 0  # read_back()s under way (the anti-virus scan): let_go waits for them

    @property
    def queue_id(self) -> str | None:
        """The queue id the message will have, if it has remote recipients."""
        return self.enqueue.id if self.enqueue is not None else None

    def start(self, local_prefix: bytes, remote_prefix: bytes) -> None:
        """Begin the store's delivery; each copy gets its trace headers first."""
        try:
            if self._accounts:
                # What the sender sent starts after our trace headers: with the Message-ID,
                # it tells a message sent again (storage/dedupe.py).
                self.delivery = self._store.begin_delivery(self._accounts,
                                                           dedupe_from=len(local_prefix) + self._sent_from)
                self.delivery.write(local_prefix)
                self._local_prefix_size = len(local_prefix)
            self._remote_prefix = remote_prefix
            if self.enqueue is not None:
                self.enqueue.write(remote_prefix)
                if self._digest is not None:
                    self._digest.update(remote_prefix)
            if self._handed is not None:
                self._handed += remote_prefix  # the owner adds Return-Path: (RFC 5321 §4.4)
            if self.delivery is not None and not self.delivery.keeps_bytes and self._router is not None:
                # Its shard released between the RCPT and now. Last: a copy to hand over made
                # here begins with the remote prefix already.
                self.let_go(())
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        if self.delivery is not None:
            return self.delivery.size
        return self.enqueue.size if self.enqueue is not None else len(self._handed or b"")

    def write(self, data: bytes) -> None:
        if len(self.head) < MAX_HEAD:
            self.head += data[:MAX_HEAD - len(self.head)]
        try:
            if self.delivery is not None:
                try:
                    self.delivery.write(data)
                except NotOwnerError:
                    if self._router is None:
                        raise
                    # Its shard let go of just now (a drain): the copy so far moves out, and
                    # this chunk joins it below.
                    self.let_go(())
            if self.enqueue is not None:
                self.enqueue.write(data)
                if self._digest is not None:
                    self._digest.update(data)
            if self._handed is not None:
                self._handed += data
        except (StoreError, OSError):
            self.close()
            raise

    def let_go(self, held: Container[int]) -> bool:
        """A cluster's, while the message comes in (on the event loop, between two chunks):
        if a shard of the local copy is not in `held` (this node released it: a drain, a
        rebalance), the copy written so far is read back and kept in memory with the copies
        to hand over, and the delivery closed, its file on the shard's volume with it, so
        that the volume can be detached now rather than when the sender finishes. The copy
        goes to the shard's owner at the commit (_follow_owners). Whether it moved."""
        delivery = self.delivery
        if delivery is None or self._router is None:
            return False
        if self._reading:
            return False  # the scan reads its file: the follower's next look comes back
        accounts = list(dict.fromkeys(account for account, _ in delivery.targets))
        if delivery.keeps_bytes and all(self._store.shard_number(account) in held for account in accounts):
            return False
        if not delivery.keeps_bytes and delivery.size > self._local_prefix_size:
            return False  # its bytes were not kept: the commit says so (the shard's NotOwnerError)
        if self._handed is None:
            data = _read_all(delivery) if delivery.keeps_bytes else b""
            start = self._verdict_size + self._local_prefix_size
            self._handed = bytearray(data[:self._verdict_size] + self._remote_prefix + data[start:])
        delivery.close()
        self.delivery = None
        self._moved = accounts
        _log.info("copy_let_go", accounts=",".join(accounts), size=len(self._handed))
        return True

    def read_back(self) -> Iterator[bytes]:
        """The message as written so far (the local copy, else the queue's, else the one
        to hand over), in pieces: what the anti-virus scan reads before the commit."""
        self._reading += 1
        try:
            if self.delivery is not None:
                yield from self.delivery.read()
                return
            if self.enqueue is None and self._handed is not None:
                yield bytes(self._handed)
                return
            with self.enqueue.open() as f:
                while piece := f.read(1 << 16):
                    yield piece
        finally:
            self._reading -= 1

    def verdict(self, head: bytes, mailboxes: dict[str, str] | None, *, junk: bool = False) -> None:
        """The policy's verdict, before the commit: `head` (its header fields) in front of
        every copy, each local account's copy into `mailboxes[account]` (Junk) if given, and
        `junk` told to the owners the other copies are handed to (they file them in Junk)."""
        if self.delivery is not None and self._router is not None and \
                not all(self._router.holds(account) for account, _ in self.delivery.targets):
            # Its shard let go of during the checks, and AgentContext.let_go could not move
            # the copy (the scan was reading it): the head must not make the copy's file
            # now, on a volume detached or being detached. The copy goes to the owner.
            self.let_go(())
        self._verdict_size = len(head)
        self._junk = junk
        if self._handed is not None:
            self._handed[:0] = head
        if self.delivery is None:
            return
        try:
            if mailboxes:
                self.delivery.send_to_each(mailboxes)
            self.delivery.prepend(head)
        except (StoreError, OSError):
            self.close()
            raise

    def close(self) -> None:
        """Abort what is not committed."""
        if self.delivery is not None:
            self.delivery.close()
        if self.enqueue is not None:
            self.enqueue.close()
        self._handed = None

    async def _hand_over(self, message: bytes, helo: str, sender: str, *, smtputf8: bool = False,
                         eight_bit: bool = False) -> None:
        """The copies other nodes own, over LMTP to every owner at once, in two steps: each
        owner's MAIL and RCPTs, then the data to all of them only if every recipient was
        accepted everywhere, so that one owner's refusal (a full mailbox) leaves no copy at
        another (a message with no Message-ID would be stored there at each try). StoreError
        unless every recipient got a 2xx. An owner that cannot be reached or answers 4xx may
        have handed the shard on meanwhile (a drain): those accounts go to their owner as it
        is now, if that changed, up to HAND_OVER_TRIES times."""
        from mtad.lmtp_client import Handing

        pending = dict(self._handoffs)
        sent_from = self._verdict_size + len(self._remote_prefix) + self._sent_from
        # Each owner's greeting has a nonce this node proves itself for (wire/node_proof.py).
        router = self._router
        credentials = proof.prover(router.secret, router.node) if router is not None else None
        for attempt in range(HAND_OVER_TRIES):
            owners = list(pending.items())
            begun = await asyncio.gather(*(self._begin((host, port), accounts, helo=helo, sender=sender,
                                                       sent_from=sent_from, junk=self._junk, smtputf8=smtputf8,
                                                       eight_bit=eight_bit, credentials=credentials)
                                           for (host, port), accounts in owners),
                                         return_exceptions=True)
            handings = [h for h in begun if isinstance(h, Handing)]
            try:
                failures = self._failures(owners, [h if isinstance(h, BaseException) else h.outcomes for h in begun])
                if not failures:
                    sent = await asyncio.gather(*(h.send(message) for h in handings), return_exceptions=True)
                    failures = self._failures(owners, sent)
                    for owner, accounts in owners:
                        failed = failures.get(owner, ((), ""))[0]
                        if taken := [account for account in accounts if account not in failed]:
                            _log.info("handed_over", owner=f"{owner[0]}:{owner[1]}", accounts=",".join(taken),
                                      size=len(message))
                    # The owners that took the data keep it; the others' accounts alone go on.
                    pending = {}
                else:
                    # Nothing was sent anywhere: every account goes again, the moved ones
                    # to their new owner.
                    pending = {owner: [a for a in accounts if a not in failures.get(owner, ((), ""))[0]]
                               for owner, accounts in owners}
            finally:
                await asyncio.gather(*(h.close() for h in handings))
            for (host, port), (failed, why) in failures.items():
                # An owner that could not be reached may be on its way out: its shards'
                # next owner is waited for, as a RCPT waits for one (OWNER_WAIT).
                gone = (host, port) if why.startswith(UNREACHED) else None
                moved = await self._owners_now(failed, gone=gone) if self._router is not None else {}
                if attempt + 1 == HAND_OVER_TRIES or (host, port) in moved:
                    raise HandOffFailed(f"{host}:{port}: {why}")
                _log.info("hand_over_moved", owner=f"{host}:{port}", accounts=",".join(failed),
                          to=",".join(f"{h}:{p}" for h, p in moved), reason=why[:200])
                for owner, moved_accounts in moved.items():
                    pending.setdefault(owner, []).extend(moved_accounts)
            pending = {owner: accounts for owner, accounts in pending.items() if accounts}
            if not pending:
                return

    async def _begin(self, owner: tuple[str, int], accounts: list[str], **envelope):
        """Handing.begin at `owner`, given up (HandOffError) as soon as the node table names
        another owner for every one of `accounts`: an owner paused (SIGSTOP, a frozen VM) accepts
        connections and answers nothing, and its lease lapsing hands its shards on within
        the TTL, well before the LMTP client's timeout. Nothing was sent to it yet: the
        accounts go to their owner now (_owners_now)."""
        from mtad.lmtp_client import Handing, HandOffError

        if self._router is None:
            return await Handing.begin(*owner, recipients=accounts, **envelope)
        begin = asyncio.ensure_future(Handing.begin(*owner, recipients=accounts, **envelope))
        while True:
            try:
                done, _ = await asyncio.wait({begin}, timeout=OWNER_LOOK)
            except asyncio.CancelledError:  # the caller's: nothing of it may stay open
                begin.cancel()
                if begin.done() and not begin.cancelled() and begin.exception() is None:
                    await begin.result().close()
                raise
            if done:
                return begin.result()
            # Every account: an owner that still holds one of them is alive (a shard of its
            # moves in a rebalance) and answers once its RCPTs have waited out the move.
            if all(_owner_named_elsewhere(self._router, account, owner) for account in accounts):
                begin.cancel()
                try:
                    handing = await begin
                except (asyncio.CancelledError, HandOffError):
                    pass
                else:  # it answered just then: it may well be the owner still
                    return handing
                raise HandOffError(f"{owner[0]}:{owner[1]} did not answer; the table names another owner")

    @staticmethod
    def _failures(owners: list[tuple[tuple[str, int], list[str]]],
                  results: list) -> dict[tuple[str, int], tuple[list[str], str]]:
        """The accounts each owner did not take and why, from its outcomes or its
        HandOffError; HandOffFailed at once for a permanent refusal (5xx)."""
        from mtad.lmtp_client import HandOffError

        failures = {}
        for ((host, port), accounts), result in zip(owners, results, strict=True):
            if isinstance(result, HandOffError):
                failures[(host, port)] = (accounts, f"{UNREACHED}{result}")
            elif isinstance(result, BaseException):
                raise result
            else:
                refused = {account: outcome for account, outcome in result.items() if not outcome.ok}
                if not refused:
                    continue
                why = "refused " + ", ".join(f"{a} ({o.code} {o.text[:80]})" for a, o in refused.items())
                if any(o.code >= 500 for o in refused.values()):
                    raise HandOffFailed(f"{host}:{port} {why}")
                failures[(host, port)] = (list(refused), why)
        return failures

    async def _owners_now(self, accounts: list[str], *,
                          gone: tuple[str, int] | None = None) -> dict[tuple[str, int], list[str]]:
        """`accounts` by the LMTP address of their owner now (this node's own for those it
        holds), waiting for shards between owners (and, `gone`, named still by the owner
        that did not answer): HandOffFailed if one stays without."""
        owners: dict[tuple[str, int], list[str]] = {}
        for account in accounts:
            try:
                owner = await owner_now(self._router, account, gone=gone)
            except NoOwnerError as e:
                raise HandOffFailed(str(e)) from None
            owners.setdefault(owner, []).append(account)
        return owners

    async def _follow_owners(self, delivery: Delivery | None, deliver_in_thread: Callable) -> Delivery | None:
        """In a cluster, at the commit: the owners as they are now, not as at the RCPT. If a
        shard of this node's copies changed hands since (a drain, a rebalance), the local
        delivery is read back and closed, and each of its accounts handed to its owner over
        LMTP: this node's own listener for those still here (one commit for all, as every
        copy or none promises), the new owner for the others. A hand-off whose owner changed
        goes to the new one. Nothing changed (the rule): a node-table read per account."""
        router = self._router
        if router is None:
            return delivery
        local = list(dict.fromkeys(account for account, _ in delivery.targets)) if delivery is not None else []
        local = list(dict.fromkeys(self._moved + local))  # let go of while the message came in (let_go)
        moved_here = bool(self._moved) or not all(router.holds(account) for account in local)
        if not moved_here and not any(_owner_changed(router, account, owner)
                                      for owner, accounts in self._handoffs.items() for account in accounts):
            return delivery
        if moved_here and delivery is not None:
            if self._handed is None:
                data = await deliver_in_thread(_read_all, delivery)
                start = self._verdict_size + self._local_prefix_size
                self._handed = bytearray(data[:self._verdict_size] + self._remote_prefix + data[start:])
            delivery.close()
            delivery = None
        accounts = [account for accounts in self._handoffs.values() for account in accounts]
        accounts = list(dict.fromkeys(local + accounts if moved_here else accounts))
        self._handoffs = await self._owners_now(accounts)
        _log.info("owners_changed", accounts=",".join(accounts), to=",".join(f"{h}:{p}" for h, p in self._handoffs))
        return delivery

    async def commit(self, deliver_in_thread: Callable, deliveries: set[asyncio.Task], *,
                     orphaned: Callable[[BaseException], None] = lambda e: None, helo: str = "",
                     sender: str = "", smtputf8: bool = False, eight_bit: bool = False,
                     writer: WriterClient | None = None) -> Committed:
        """Every copy stored and the queue entry written, or DeliveryError / StoreError with
        nothing left of the message. The route is closed either way. `orphaned` hears of a
        store failure that comes after the caller is gone (its session cancelled).
        `smtputf8`, `eight_bit`: the transaction's SMTPUTF8 and BODY=8BITMIME, for the owners
        the copies are handed to. `writer`: the writer process ([smtp] writer), which
        commits a message held in memory (mtad/writer.py)."""
        delivery, self.delivery = self.delivery, None
        enqueue, self.enqueue = self.enqueue, None
        delivered: list[Delivered] = []
        message_id = ""
        try:
            delivery = await self._follow_owners(delivery, deliver_in_thread)
            if self._handed is not None:
                # First, so that a refusal leaves nothing here; a failure after it (this
                # node's own copies) gets a 451, and the copy sent again finds the owner's
                # by its Message-ID (storage/dedupe.py).
                handed, self._handed = bytes(self._handed), None
                await self._hand_over(handed, helo, sender, smtputf8=smtputf8, eight_bit=eight_bit)
            if delivery is not None:
                accounts = [account for account, _ in delivery.targets]
                handed, delivery = delivery, None  # the commit owns it now, and closes it
                # Up to WRITE_IN_COMMITTER, start_commit leaves the fsync to the committers:
                # only then may the event loop call it.
                if (writer is not None and handed.in_memory() is not None
                        and self._store.accounts_ready(accounts)):
                    delivered = await commit_by_writer(writer, handed, deliveries, orphaned)
                elif handed.size <= WRITE_IN_COMMITTER and self._store.accounts_ready(accounts):
                    delivered = await commit_from_loop(self._store, handed, deliver_in_thread, deliveries, orphaned)
                else:
                    delivered = await deliver_in_thread(commit_in_thread, self._store, handed)
                message_id = handed.message_id or ""  # read from the message by the commit
            queue_id = None
            if enqueue is not None:
                handed, enqueue = enqueue, None
                signer = self._outbound.signer if self._digest is not None else None
                try:
                    queue_id = await deliver_in_thread(_enqueue, handed, signer, self._digest, self._sign_domain)
                except BaseException:
                    await deliver_in_thread(withdraw, self._store, delivered)
                    raise
            return Committed(delivered, queue_id, message_id or message_id_of(self.head))
        finally:
            if delivery is not None:
                delivery.close()
            if enqueue is not None:
                enqueue.close()


class HandOffFailed(StoreError):
    """A copy another node owns was not taken there: the client is told 451 4.4.0."""


def _read_all(delivery: Delivery) -> bytes:
    return b"".join(delivery.read())


def _owner_named_elsewhere(router: Router, account: str, owner: tuple[str, int]) -> bool:
    """Whether the table names an owner of `account` other than `owner` (this node included);
    not while the shard is between owners."""
    try:
        now = router.owner(account)
    except NoOwnerError:
        return False
    if now is None:
        return router.holds(account) and router.here() != owner
    return now != owner


def _owner_changed(router: Router, account: str, owner: tuple[str, int]) -> bool:
    try:
        return router.owner(account) != owner
    except NoOwnerError:
        return True


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def message_id_of(head: bytes) -> str:
    """The Message-ID of a message by its first bytes, for the log when no local copy's
    commit has read it (mail only queued or forwarded); "" when there is none."""
    end = head.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(head if end < 0 else head[:end])
    return found.group(1).decode("ascii", "replace").strip()[:250] if found else ""


def _enqueue(enqueue, signer, digest, domain: str | None) -> str:
    """In a worker thread: the DKIM signature computed from the message's digest (RFC 6376),
    then the queue entry committed with it in front; the queue id."""
    try:
        prepend = signer.sign_digest(digest, domain) if signer is not None and domain else b""
        return enqueue.commit(prepend)
    finally:
        enqueue.close()


def commit_in_thread(store: Store, delivery: Delivery) -> list[Delivered]:
    """In a worker thread: every copy stored (returned), or DeliveryError with none left."""
    try:
        try:
            return delivery.commit()
        except DeliveryError as first:
            return _retry_or_withdraw(store, delivery, first)
    finally:
        delivery.close()


async def commit_by_writer(writer: WriterClient, delivery: Delivery, deliveries: set[asyncio.Task],
                           orphaned: Callable[[BaseException], None]) -> list[Delivered]:
    """A message held in memory, committed by the writer process (mtad/writer.py): every
    copy stored, or DeliveryError / StoreError with none left; the delivery's message_id
    set as a local commit sets it. Closes the delivery (its bytes went to the writer)."""

    async def commit() -> list[Delivered]:
        try:
            return await writer.commit(delivery)
        finally:
            delivery.close()

    return await _outlasting(commit(), deliveries, orphaned)


async def _outlasting(commit: Awaitable[list[Delivered]], deliveries: set[asyncio.Task],
                      orphaned: Callable[[BaseException], None]) -> list[Delivered]:
    """`commit` as a task that outlasts its session: tracked in `deliveries` (a stop waits
    for it) and shielded (if the session is cancelled meanwhile, the client having hung up
    after its final dot, the delivery still completes or withdraws every copy); a failure
    after the session is gone goes to `orphaned`."""
    task = asyncio.ensure_future(commit)
    deliveries.add(task)

    def done(task: asyncio.Task) -> None:
        deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            orphaned(task.exception())  # the session hears of it too, unless it is gone

    task.add_done_callback(done)
    return await asyncio.shield(task)


async def commit_small(store: Store, delivery: Delivery, deliver_in_thread: Callable) -> list[Delivered]:
    """The writer process's commit (mtad/writer.py) of a message held in memory: from its
    event loop when the accounts are ready (an account's first delivery makes its mailboxes,
    which a loop must not wait for), else in a thread. Closes the delivery."""
    if store.accounts_ready([account for account, _ in delivery.targets]):
        return await _commit_and_settle(store, delivery, deliver_in_thread)
    return await deliver_in_thread(commit_in_thread, store, delivery)


async def commit_from_loop(store: Store, delivery: Delivery, deliver_in_thread: Callable,
                           deliveries: set[asyncio.Task], orphaned: Callable[[BaseException], None]
                           ) -> list[Delivered]:
    """A small message: parsed here and handed to the shards' committers, which fsync
    and index it, with no thread of its own: at a thousand messages a second, the
    hand-offs between threads cost more than the work. Failures go to a thread for the
    retry."""
    return await _outlasting(_commit_and_settle(store, delivery, deliver_in_thread), deliveries, orphaned)


async def _commit_and_settle(store: Store, delivery: Delivery, deliver_in_thread: Callable) -> list[Delivered]:
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
            return await deliver_in_thread(_retry_or_withdraw, store, delivery, DeliveryError(delivered, errors))
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
    withdraw(store, stored)
    raise DeliveryError([], errors)


def withdraw(store: Store, copies: list[Delivered]) -> None:
    """Take back the copies this delivery stored (not those that were there before it)."""
    for copy in copies:
        if copy.duplicate:
            continue
        try:
            store.remove(copy.account, copy.mailbox, [copy.uid])
        except (StoreError, OSError) as e:  # the copy stays: better twice than lost
            _log.error("withdraw_failed", account=copy.account, uid=copy.uid, error=type(e).__name__)
