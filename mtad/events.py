"""What the SMTP session core (mtad/session.py) tells its adapter, h11-style.

`Session.next_event()` returns one of these. Five are questions, the decisions the core
leaves to the adapter: Hello, Auth, MailFrom, RcptTo and DataEnd. The core reads no further input
until the adapter answers the open question with `Session.answer(event, reply)`, passing the
event itself back, so that pipelined commands are answered in order (RFC 2920 §3.1). The
others need no answer: DataChunk goes into the store delivery, StartTLS is acted on (then
`Session.tls_established()`), Close ends the connection. NEED_DATA and PAUSED are the two
"nothing now" sentinels: more bytes are needed, or a question is still open.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtad.replies import Reply


@dataclass(frozen=True)
class Hello:
    """EHLO/HELO: answer with a Reply (replies.OK to accept; the session adds the keywords)."""
    name: str
    extended: bool  # EHLO, not HELO


@dataclass(frozen=True)
class Auth:
    """AUTH (RFC 4954), its SASL exchange done (mtad/sasl.py): answer 235 2.7.0 when the
    password is right for `authcid` and the client may act as `authzid` (if given), else
    535 5.7.8. The session then takes no AUTH more, and MAIL may follow."""
    mechanism: str  # "PLAIN" or "LOGIN"
    authcid: str  # the user name the client gave
    password: str = field(repr=False)
    authzid: str = ""  # PLAIN's authorization identity; "" to act as authcid


@dataclass(frozen=True)
class MailDSN:
    """MAIL's DSN parameters (RFC 3461 §4.3, §4.4), checked; None when not given."""
    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # xtext-decoded: printable ASCII, at most 100 characters


@dataclass(frozen=True)
class RcptDSN:
    """RCPT's DSN parameters (RFC 3461 §4.1, §4.2), checked."""
    notify: tuple[str, ...] = ()  # () for the default; ("NEVER",), or SUCCESS/FAILURE/DELAY in order given
    orcpt: str | None = None  # "addr-type;address", the address xtext-decoded


@dataclass(frozen=True)
class MailFrom:
    """MAIL FROM, its syntax, parameters and size already checked: answer 250 to start the
    transaction, or a refusal."""
    address: str  # "" for the null reverse-path
    params: dict[str, str | None]
    dsn: MailDSN = MailDSN()

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
    dsn: RcptDSN = RcptDSN()


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


Question = Hello | Auth | MailFrom | RcptTo | DataEnd


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
