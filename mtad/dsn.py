"""Delivery status notifications: the report a sender gets when its message failed, is
delayed, or (when asked) was delivered (RFC 3461 §6, RFC 3464), as a whole message.

    From: Mail Delivery System <MAILER-DAEMON@reporting-mta>    To: the envelope sender
    Auto-Submitted: auto-replied                                 (RFC 3834 §5)
    Content-Type: multipart/report; report-type=delivery-status  (RFC 6522)
      1. text/plain: what happened, in plain words
      2. message/delivery-status: per-message fields (Reporting-MTA, Original-Envelope-Id,
         Arrival-Date), a blank line, then per recipient Original-Recipient, Final-Recipient,
         Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until
      3. the original: text/rfc822-headers (its header section) or message/rfc822 (all of it)

What is returned (RFC 3461 §4.3): RET=HDRS, the headers; RET=FULL, the whole message, in a
report of a failure; without RET, the whole message for a failure up to FULL_LIMIT and the
headers beyond. Reports without a failure (delayed, delivered, relayed) carry the headers
only: the sender has the message, and it may yet arrive. For an SMTPUTF8 original the
report uses the RFC 6533 types (message/global-delivery-status, message/global-headers,
message/global), whose fields may hold UTF-8, and must itself be sent with SMTPUTF8; for an
8BITMIME original it must be sent with BODY=8BITMIME (the parts are labelled 8bit).

The report is sent with the null reverse-path (RFC 5321 §4.5.5), so nobody reports on it.
`is_bounce` is the check before making one: never a report to <>, never a bounce of a
bounce. `wants_report` applies the recipient's NOTIFY (RFC 3461 §4.1).

The original is streamed from a file (the queue's spool file) into the writer in CHUNK
pieces, never held whole: a 25 MB original costs 64 KiB of memory here. The boundary is 128
random bits, which no original can contain except by chance (the file is not read twice to
check). Text that comes from outside (remote replies, addresses) has its control characters
replaced, so a reply line cannot become a header field of the report.
"""

from __future__ import annotations

import email.utils
import io
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO, Callable

FULL_LIMIT = 64 * 1024
CHUNK = 64 * 1024
MAX_HEADER_SECTION = 1024 * 1024  # what is returned of an original whose header never ends
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_LINE = 78
MAX_TEXT = 2000
MAX_WORD = 900


@dataclass(frozen=True)
class RecipientReport:
    address: str                    # the recipient as we tried it (Final-Recipient)
    orcpt: str | None               # RFC 3461 ORCPT as given ("rfc822;a@b"), or None
    action: str                     # "failed" | "delayed" | "delivered" | "relayed" | "expanded"
    status: str                     # RFC 3463 "5.1.1"
    diagnostic: str | None = None   # "smtp; 550 5.1.1 no such user"
    remote_mta: str | None = None   # the host that answered, "mx.example.net"
    last_attempt: float | None = None
    will_retry_until: float | None = None  # for "delayed"


def wants_report(notify: tuple[str, ...], action: str) -> bool:
    """Whether a recipient with this NOTIFY wants a report of `action` (RFC 3461 §4.1):
    () is the default, failures and delays; NEVER is none; SUCCESS covers delivered,
    relayed (the next hop does not do DSN, §6.2.2) and expanded."""
    wanted = {word.upper() for word in notify} or {"FAILURE", "DELAY"}
    if "NEVER" in wanted:
        return False
    return {"failed": "FAILURE", "delayed": "DELAY"}.get(action, "SUCCESS") in wanted


def is_bounce(sender: str, headers: bytes = b"") -> bool:
    """Whether a message must not be reported on: the null reverse-path (a DSN, RFC 5321
    §4.5.5, or an auto-reply, RFC 3834 §3.1.5), a MAILER-DAEMON sender, or a delivery report
    that some relay passed on with a sender (its header section, or the start of the message,
    in `headers`)."""
    if not sender or sender.rpartition("@")[0].lower() == "mailer-daemon":
        return True
    content_type = _header_value(headers, b"content-type").lower()
    return content_type.startswith("multipart/report") and re.search(
        r"report-type\s*=\s*\"?(global-)?delivery-status", content_type) is not None


def build_report(**kwargs) -> bytes:
    """write_report into memory: for small originals and tests."""
    out = io.BytesIO()
    write_report(out.write, **kwargs)
    return out.getvalue()


def write_report(write: Callable[[bytes], object], *, reporting_mta: str, sender: str, envid: str | None,
                 arrival: float, recipients: list[RecipientReport], ret: str | None,
                 original: bytes | BinaryIO, smtputf8: bool = False, eight_bit: bool = False,
                 now: float | None = None, message_id: str | None = None) -> None:
    """Write the report as a whole message (CRLF lines) through `write`, e.g. a queue
    Enqueue's or a store delivery's. `original` is the message as queued (bytes, or a file
    read from its current position). `envid` and each ORCPT are as the queue holds them:
    xtext already decoded (mtad/paths.py), so "+" is a plus here."""
    if not recipients:
        raise ValueError("a report needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown action {r.action!r}")
        if not _STATUS.match(r.status):
            raise ValueError(f"not an RFC 3463 status: {r.status!r}")
    now = time.time() if now is None else now
    source = io.BytesIO(original) if isinstance(original, (bytes, bytearray)) else original
    failed = any(r.action == "failed" for r in recipients)
    full = failed and (ret or "").upper() != "HDRS" and (
        (ret or "").upper() == "FULL" or _size(source) <= FULL_LIMIT)
    boundary = f"=_{secrets.token_hex(16)}"
    host = _clean(reporting_mta)
    mid = message_id or f"<{int(now)}.{secrets.token_hex(8)}@{host}>"
    cte = "8bit" if smtputf8 or eight_bit else "7bit"

    header = [
        ("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
        ("To", f"<{_clean(sender)}>"),
        ("Subject", _subject(recipients)),
        ("Date", _date(now)),
        ("Message-ID", mid),
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 §5: and so never answered itself
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/report; report-type={"global-" if smtputf8 else ""}delivery-status;'
                         f' boundary="{boundary}"'),
    ]
    out = [_field(name, value) for name, value in header]
    out.append(b"\r\nThis is a delivery status notification in MIME format (RFC 3464).\r\n")

    text = _human_text(host, recipients, full, failed).encode()
    out += [f"\r\n--{boundary}\r\n".encode(),
            _field("Content-Description", "Notification"),
            _field("Content-Type", f"text/plain; charset={'us-ascii' if text.isascii() else 'utf-8'}"),
            _field("Content-Transfer-Encoding", "7bit" if text.isascii() else "8bit"),
            b"\r\n", text]

    status_type = "message/global-delivery-status" if smtputf8 else "message/delivery-status"
    out += [f"\r\n--{boundary}\r\n".encode(),
            _field("Content-Description", "Delivery report"),
            _field("Content-Type", status_type),
            _field("Content-Transfer-Encoding", cte), b"\r\n",
            _delivery_status(host, envid, arrival, recipients, smtputf8)]

    if full:
        kind, description = ("message/global" if smtputf8 else "message/rfc822"), "Undelivered Message"
    else:
        kind = "message/global-headers" if smtputf8 else "text/rfc822-headers"
        description = "Undelivered Message Headers" if failed else "Message Headers"
    out += [f"\r\n--{boundary}\r\n".encode(),
            _field("Content-Description", description),
            _field("Content-Type", kind),
            _field("Content-Transfer-Encoding", cte), b"\r\n"]
    write(b"".join(out))
    last = _copy(source, write, headers_only=not full)
    write((b"" if last.endswith(b"\r\n") else b"\r\n") + f"\r\n--{boundary}--\r\n".encode())


def _copy(source: BinaryIO, write, *, headers_only: bool) -> bytes:
    """Stream the original (or its header section) into `write`; returns the last bytes
    written, to know whether a line end is owed before the closing boundary."""
    last = b""
    if not headers_only:
        while chunk := source.read(CHUNK):
            write(chunk)
            last = chunk[-2:]
        return last
    taken = 0
    while taken < MAX_HEADER_SECTION:
        line = source.readline(min(CHUNK, MAX_HEADER_SECTION - taken))
        if not line or line in (b"\r\n", b"\n"):
            break
        write(line)
        taken += len(line)
        last = line[-2:]
    return last


def _size(source: BinaryIO) -> int:
    try:
        return os.fstat(source.fileno()).st_size - source.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        start = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(start)
        return end - start


def _delivery_status(host: str, envid: str | None, arrival: float, recipients: list[RecipientReport],
                     smtputf8: bool) -> bytes:
    # RFC 3464 §2.2: the per-message fields, then each recipient's after a blank line.
    fields = [("Reporting-MTA", f"dns; {host}")]
    if envid:
        fields.append(("Original-Envelope-Id", _clean(envid)))
    fields.append(("Arrival-Date", _date(arrival)))
    out = [_field(name, value) for name, value in fields]
    for r in recipients:
        out.append(b"\r\n")
        rows = []
        if r.orcpt:
            kind, _, address = r.orcpt.partition(";")
            rows.append(("Original-Recipient", f"{kind.strip().lower()};{_clean(address.strip())}"))
        rows += [("Final-Recipient", _address_field(r.address, smtputf8)),
                 ("Action", r.action),
                 ("Status", r.status)]
        if r.remote_mta:
            rows.append(("Remote-MTA", f"dns; {_clean(r.remote_mta)}"))
        if r.diagnostic:
            rows.append(("Diagnostic-Code", _clean(r.diagnostic)))
        if r.last_attempt is not None:
            rows.append(("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until is not None:
            rows.append(("Will-Retry-Until", _date(r.will_retry_until)))
        out += [_field(name, value) for name, value in rows]
    return b"".join(out)


def _address_field(address: str, smtputf8: bool) -> str:
    """`rfc822; a@b`, or for a UTF-8 address `utf-8; ...` (RFC 6533 §3): raw in a global
    report, with \\x{HEX} escapes (utf-8-addr-xtext's embedded-unicode) in a plain one."""
    address = _clean(address)
    if address.isascii():
        return f"rfc822; {address}"
    if smtputf8:
        return f"utf-8; {address}"
    return "utf-8; " + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)


def _subject(recipients: list[RecipientReport]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _human_text(host: str, recipients: list[RecipientReport], full: bool, failed: bool) -> str:
    lines = [f"This is the mail system at {host}.", ""]
    for r in recipients:
        who = f"<{_clean(r.address)}>"
        answer = _answer(r)
        if r.action == "failed":
            lines.append(f"Your message to {who} could not be delivered, and no further attempts will be made.")
            if answer:
                lines.append(answer)
        elif r.action == "delayed":
            until = f" until {_date(r.will_retry_until)}" if r.will_retry_until else ""
            lines.append(f"Your message to {who} has not been delivered yet. You do not need to send it again: "
                         f"delivery will be tried again{until}, and you will be told if it fails.")
            if answer:
                lines.append(answer)
        elif r.action == "delivered":
            lines.append(f"Your message to {who} was delivered.")
        elif r.action == "relayed":
            lines.append(f"Your message to {who} was passed on to a server that does not send delivery "
                         "reports: you will get no further notice about it.")
        else:
            lines.append(f"Your message to {who} was delivered, and forwarded on to further addresses.")
        lines.append("")
    if failed:
        lines.append("Your message is attached below." if full else "The headers of your message are attached below.")
    else:
        lines.append("The headers of your message are attached below.")
    return "\r\n".join(_wrap(line) for line in lines) + "\r\n"


def _answer(r: RecipientReport) -> str:
    if not r.diagnostic:
        return ""
    reply = _clean(r.diagnostic.partition(";")[2].strip() or r.diagnostic)
    where = f"The server {_clean(r.remote_mta)}" if r.remote_mta else "The mail system"
    return f"{where} answered: {reply}"


def _wrap(line: str) -> str:
    if len(line) <= _LINE:
        return line
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > _LINE:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out)


def _field(name: str, value: str) -> bytes:
    """`Name: value` CRLF, folded at spaces so no line passes 78 characters where it can
    be helped (RFC 5322 §2.1.1)."""
    words = value.split(" ")
    lines, current = [], f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > _LINE and current.strip() and current != f"{name}:":
            lines.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode()


def _clean(text: str) -> str:
    """Control characters (CR and LF among them) become one space: text from outside
    never ends a header line or starts a new one. Cut at MAX_TEXT, and words at MAX_WORD,
    so no line of the report passes RFC 5322's 998."""
    text = _CONTROL.sub(" ", text).strip()[:MAX_TEXT]
    return " ".join(word[i:i + MAX_WORD] for word in text.split(" ") for i in range(0, max(len(word), 1), MAX_WORD))


def _date(t: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(t, timezone.utc))  # "+0000"


def _header_value(headers: bytes, name: bytes) -> str:
    """The (unfolded) value of the first `name` field in a header section (or in the
    header section at the start of a whole message: the body is never split)."""
    headers = headers[:MAX_HEADER_SECTION]
    end = headers.find(b"\n\r\n")
    if end < 0:
        end = headers.find(b"\n\n")
    value, taking = [], False
    for line in (headers if end < 0 else headers[:end + 1]).split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if taking:
                value.append(line.strip())
            continue
        if taking:
            break
        field, colon, rest = line.partition(b":")
        if colon and field.strip().lower() == name:
            taking = True
            value.append(rest.strip())
    return b" ".join(value).decode("utf-8", "replace")
