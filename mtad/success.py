"""Success reports for mail delivered here (RFC 3461 §6.2.6.1): a recipient whose RCPT said
NOTIFY=SUCCESS and whose copy the store took gets its sender a "delivered" report
(mtad/dsn.py writes it; the headers of the message are returned, as RFC 3461 §4.3 has it
for a report that is no failure). Remote recipients are the delivery runner's to report on.

The report goes from the null sender (RFC 5321 §4.5.5): into the INBOX of each local
account the sender's address reaches, or through the queue (origin "dsn") to a remote
sender. Never about a message that is itself a report or an auto-reply (mtad/dsn.py
is_bounce), never to the null sender. It is sent after the 250, off the event loop: a
report that cannot be made is logged, and the message stays delivered.
"""

from __future__ import annotations

import time

from conf.logfmt import EventLogger
from storage import AccountError, AddressError, Accounts, NotLocalError, Store, StoreError

_log = EventLogger("mtad.routing")


def send_success_report(*, store: Store, accounts: Accounts, outbound, hostname: str, qid: str, sender: str,
                        envid: str | None, arrival: float, delivered: dict[str, str | None], head: bytes,
                        smtputf8: bool, eight_bit: bool) -> None:
    """In a worker thread: the report made and sent (or logged why not)."""
    from mtad import dsn

    log = _log.bind(qid=qid)
    end = head.find(b"\r\n\r\n")
    header = head if end < 0 else head[:end + 2]
    if not sender or dsn.is_bounce(sender, header):
        log.info("dsn_suppressed", reason="a report is never sent about a report", action="delivered")
        return
    now = time.time()
    fields = dict(reporting_mta=hostname, sender=sender, envid=envid, arrival=arrival,
                  recipients=[dsn.RecipientReport(address, orcpt, "delivered", "2.0.0", last_attempt=now)
                              for address, orcpt in delivered.items()],
                  ret="HDRS", original=header, smtputf8=smtputf8, eight_bit=eight_bit, now=now)
    try:
        resolution = accounts.resolve(sender)
        local, remote = [str(a) for a in resolution.local], list(resolution.remote)
    except NotLocalError:
        local, remote = [], [sender]
    except (AddressError, AccountError) as e:
        log.warning("dsn_dropped", action="delivered", to=sender, reason=str(e))
        return
    where = []
    try:
        if local:
            with store.begin_delivery(local) as delivery:
                delivery.write(b"Return-Path: <>\r\n")  # RFC 5321 §4.4, as a delivery by SMTP has it
                dsn.write_report(delivery.write, **fields)
                delivery.commit()
            where.append("store")
        if remote:
            from storage import QueuedRecipient, QueueEnvelope

            envelope = QueueEnvelope("", tuple(QueuedRecipient(r, notify=("NEVER",)) for r in remote),
                                     smtputf8=smtputf8, eight_bit=eight_bit, origin="dsn")
            with outbound.queue.begin(envelope) as enqueue:
                dsn.write_report(enqueue.write, **fields)
                where.append(f"queue:{enqueue.commit()}")
    except (StoreError, OSError) as e:
        log.warning("dsn_not_sent", action="delivered", to=sender, error=type(e).__name__)
    log.info("dsn_sent", action="delivered", to=sender, where=",".join(where) or "-")
