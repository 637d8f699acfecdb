"""Delivery status notifications (RFC 3464) from the runner to a message's sender.

mtad/dsn.py writes the report; this module decides who gets it and streams it there (the
original is read from the queue's file as the report is written, never whole in memory):
- never to the null sender, and never about a message that is itself a bounce (RFC 3461
  §6.2, RFC 5321 §6.1: no loops of reports);
- to a local sender (a domain of ours): straight into the INBOX of every account the
  address reaches (Accounts.resolve: an alias, a sub-address), durable before this
  returns, with "Return-Path: <>" as a store delivery by SMTP would have;
- to anyone else (and an alias's remote targets): through the queue, from the null
  sender (RFC 5321 §4.5.5), origin "dsn" (in a cluster, the queue of a shard this node
  holds now: storage/queues.py).
A sender that no longer exists gets nothing: the report is dropped with a log line.
Everything here blocks (the store, the queue, the accounts): the runner calls it in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from conf.logfmt import EventLogger
from mtad import dsn
from storage import (
    AccountError,
    Accounts,
    AddressError,
    DeliveryError,
    NotLocalError,
    Queue,
    QueuedMessage,
    QueueSet,
    QueuedRecipient,
    QueueEnvelope,
    Store,
    StoreError,
)

MAX_HEADER_BLOCK = 256 * 1024  # what is read of the original to tell whether it is a bounce
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

_log = EventLogger("mtad.outbound")


@dataclass(frozen=True)
class Reported:
    """What became of one report: where it went ("store", "queue: <qid>", or why not)."""

    sent: bool
    where: str


def status_of(reply: str) -> str:
    """The RFC 3463 status of an SMTP reply line: its enhanced code, else the code's class."""
    parts = reply.split(None, 2)
    if len(parts) > 1 and _STATUS.match(parts[1]):
        return parts[1]
    return f"{reply[:1] if reply[:1] in '245' else '4'}.0.0"


class Reporter:
    def __init__(self, hostname: str, queue: Queue | QueueSet, store: Store, accounts: Accounts,
                 unwrap: Callable[[str], str | None] = lambda address: None):
        self._hostname = hostname
        self._queue = queue
        self._store = store
        self._accounts = accounts
        # SRS.reverse: a forwarded message's sender is an SRS address of ours, and its report
        # goes to the original sender at once, not out through DNS to our own name and back.
        self._unwrap = unwrap

    def send(self, message: QueuedMessage, recipients: list[dsn.RecipientReport], original: BinaryIO,
             now: float) -> Reported:
        """Build the report about `recipients` of `message` and send it to its sender."""
        envelope = message.envelope
        log = _log.bind(qid=message.id)
        actions = ",".join(sorted({r.action for r in recipients}))
        if not envelope.sender:
            log.info("dsn_suppressed", reason="null sender", action=actions)
            return Reported(False, "null sender")
        original.seek(0)
        if dsn.is_bounce(envelope.sender, _header_block(original)):
            log.info("dsn_suppressed", reason="a report is never sent about a report", action=actions)
            return Reported(False, "bounce of a bounce")
        sender = self._unwrap(envelope.sender) or envelope.sender
        fields = dict(reporting_mta=self._hostname, sender=sender, envid=envelope.envid,
                      arrival=message.created, recipients=recipients, ret=envelope.ret,
                      smtputf8=envelope.smtputf8, eight_bit=envelope.eight_bit, now=now)
        try:
            resolution = self._accounts.resolve(sender)
        except NotLocalError:
            qid = self._enqueue([sender], original, fields)
            log.info("dsn_sent", action=actions, to=sender, dsn_qid=qid)
            return Reported(True, f"queue: {qid}")
        except (AddressError, AccountError) as e:
            log.warning("dsn_dropped", action=actions, to=sender, reason=str(e))
            return Reported(False, str(e))
        where = []
        if resolution.local:
            try:
                self._store_report([str(a) for a in resolution.local], original, fields)
                where.append("store")
            except (DeliveryError, StoreError) as e:
                # Some copy failed (over quota, disk full): the others are durable all the same.
                log.warning("dsn_not_stored", to=sender, reason=str(e))
        if resolution.remote:
            where.append(f"queue: {self._enqueue(list(resolution.remote), original, fields)}")
        log.info("dsn_sent", action=actions, to=sender, where=" ".join(where) or "-")
        return Reported(bool(where), " ".join(where))

    def _store_report(self, accounts: list[str], original: BinaryIO, fields: dict) -> None:
        """Into each account's INBOX, streamed: durable when this returns."""
        original.seek(0)
        with self._store.begin_delivery(accounts) as delivery:
            delivery.write(b"Return-Path: <>\r\n")  # RFC 5321 §4.4, as a delivery by SMTP has it
            dsn.write_report(delivery.write, original=original, **fields)
            delivery.commit()

    def _enqueue(self, recipients: list[str], original: BinaryIO, fields: dict) -> str:
        """Through the queue from the null sender (RFC 5321 §4.5.5), streamed."""
        envelope = QueueEnvelope("", tuple(QueuedRecipient(r, notify=("NEVER",)) for r in recipients),
                                 smtputf8=fields["smtputf8"], eight_bit=fields["eight_bit"], origin="dsn")
        original.seek(0)
        with self._queue.begin(envelope) as enqueue:
            dsn.write_report(enqueue.write, original=original, **fields)
            return enqueue.commit()


def _header_block(original: BinaryIO) -> bytes:
    """The original's header lines (bounded), for telling a bounce from other mail."""
    head = original.read(MAX_HEADER_BLOCK)
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end + 2]
