"""What the SMTP session core (mtad/session.py) tells its adapter, h11-style.

`Session.next_event()` returns one of these. Four are questions, the decisions the core
leaves to the adapter: Hello, MailFrom, RcptTo and DataEnd. The core reads no further input
until the adapter answers the open question with `Session.answer(event, reply)`, passing the
event itself back, so that pipelined commands are answered in order (RFC 2920 §3.1). The
others need no answer: DataChunk goes into the store delivery, StartTLS is acted on (then
`Session.tls_established()`), Close ends the connection. NEED_DATA and PAUSED are the two
"nothing now" sentinels: more bytes are needed, or a question is still open.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtad.replies import Reply


@dataclass(frozen=True)
class Hello:
    """EHLO/HELO: answer with a Reply (replies.OK to accept; the session adds the keywords)."""
    name: str
    extended: bool  # EHLO, not HELO


@dataclass(frozen=True)
class MailFrom:
    """MAIL FROM, its syntax, parameters and size already checked: answer 250 to start the
    transaction, or a refusal."""
    address: str  # "" for the null reverse-path
    params: dict[str, str | None]

    @property
    def smtputf8(self) -> bool:
        """The transaction may carry UTF-8 addresses and headers (RFC 6531 §3.4)."""
        return "SMTPUTF8" in self.params


@dataclass(frozen=True)
class RcptTo:
    """RCPT TO, its syntax checked and within max_recipients: answer 250 to add the
    recipient, or a refusal."""
    address: str
    params: dict[str, str | None]


@dataclass(frozen=True)
class DataChunk:
    """Message bytes (unstuffed), for the store delivery. No answer."""
    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """The whole message has arrived: answer with the final reply for the transaction.
    If `refusal` is set the session already knows the answer; the adapter must discard the
    delivery and answer it (or a reply of its own, never 250)."""
    size: int
    received_headers: int
    refusal: Reply | None


@dataclass(frozen=True)
class StartTLS:
    """Send what is pending, upgrade the transport, then call `Session.tls_established()`.
    No answer."""


@dataclass(frozen=True)
class Close:
    """Send what is pending, then close the connection."""


Question = Hello | MailFrom | RcptTo | DataEnd


class NeedData:
    """No event until more bytes arrive."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Paused:
    """Waiting for the adapter's answer to the last question."""

    def __repr__(self) -> str:
        return "PAUSED"


NEED_DATA = NeedData()
PAUSED = Paused()
