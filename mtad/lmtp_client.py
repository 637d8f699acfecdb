"""The handing node's side of the cluster's LMTP hand-off (RFC 2033; the owner's side is
mtad/lmtp.py): one message to a shard's owner, before the 250 to the client that sent it.

aiosmtplib speaks SMTP only (its data() reads one reply, where LMTP gives one per
recipient), so this is the few commands LMTP needs, over asyncio streams: LHLO, MAIL, a
RCPT per recipient, DATA with the message dot-stuffed (RFC 5321 §4.5.2), then each
accepted recipient's reply in RCPT order, QUIT. Every step is bounded by `timeout`; a
connection that fails or a reply that makes no sense raises HandOffError, which the caller
answers 451 4.4.0 (the sender tries again later, and no copy was promised).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_REPLY_LINES = 100  # an LHLO reply lists its extensions; more than this is not a server
MAX_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512 for a reply line; be generous, not unbounded
_DOT = re.compile(rb"^\.", re.MULTILINE)


class HandOffError(Exception):
    """The owner could not be reached, or said something no LMTP server says."""


@dataclass(frozen=True)
class Outcome:
    """One recipient's answer: at RCPT (refused) or after the data."""
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


NOT_SENT = Outcome(451, "4.4.0 not sent: another recipient was refused")


async def hand_over(host: str, port: int, *, helo: str, sender: str, recipients: Sequence[str],
                    message: bytes, timeout: float = 60.0, smtputf8: bool = False,
                    eight_bit: bool = False, sent_from: int = 0) -> dict[str, Outcome]:
    """Deliver `message` (CRLF lines, trace headers included) to `recipients` at the LMTP
    server at host:port; each recipient's outcome. The data goes only if every RCPT was
    accepted; else the accepted ones are answered NOT_SENT and nothing is stored there.
    `sent_from`: where in `message` the sender's own bytes start (after this node's trace
    and verdict fields), told to a server that offers XSENT (mtad/lmtp.py) for its
    deduplication key."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE * 2), timeout)
    except (OSError, TimeoutError) as e:
        raise HandOffError(f"cannot connect to {host}:{port}: {e}") from None
    try:
        return await asyncio.wait_for(_transaction(reader, writer, helo, sender, recipients, message, smtputf8,
                                                   eight_bit, sent_from), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        raise HandOffError(f"LMTP to {host}:{port} failed: {type(e).__name__}: {e}") from None
    finally:
        writer.close()


async def _transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, helo: str, sender: str,
                       recipients: Sequence[str], message: bytes, smtputf8: bool, eight_bit: bool,
                       sent_from: int) -> dict[str, Outcome]:
    await _expect(reader, 220)
    writer.write(f"LHLO {helo}\r\n".encode())
    keywords = {line.split(" ", 1)[0].upper() for line in (await _expect(reader, 250)).text.split("\n")[1:]}
    params = (" BODY=8BITMIME" if eight_bit else "") + (" SMTPUTF8" if smtputf8 else "")
    if sent_from and "XSENT" in keywords:
        params += f" XSENT={sent_from}"
    # PIPELINING is required of every LMTP server (RFC 2033 §5): MAIL and every RCPT at once.
    commands = [f"MAIL FROM:<{sender}>{params}\r\n"] + [f"RCPT TO:<{r}>\r\n" for r in recipients]
    writer.write("".join(commands).encode("utf-8"))
    mail = await _reply(reader)
    outcomes: dict[str, Outcome] = {}
    for recipient in recipients:
        outcomes[recipient] = await _reply(reader)
    if not mail.ok:
        return {recipient: mail for recipient in recipients}
    if not all(outcomes[r].ok for r in recipients):
        # Every copy or none (mtad/routing.py): the caller fails the whole message when one
        # recipient is refused, and the sender sends it again to all. Copies stored here
        # for the others would then be a second time (a message with no Message-ID has no
        # deduplication key) or despite a bounce.
        writer.write(b"QUIT\r\n")
        return {r: outcomes[r] if not outcomes[r].ok else NOT_SENT for r in recipients}
    accepted = list(recipients)
    writer.write(b"DATA\r\n")
    await _expect(reader, 354)
    body = _DOT.sub(b"..", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    writer.write(body + b".\r\n")
    await writer.drain()
    for recipient in accepted:  # RFC 2033 §4.2: one reply for each, in RCPT order
        outcomes[recipient] = await _reply(reader)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    return outcomes


async def _expect(reader: asyncio.StreamReader, code: int) -> Outcome:
    reply = await _reply(reader)
    if reply.code != code:
        raise ValueError(f"expected {code}, got {reply.code} {reply.text}")
    return reply


async def _reply(reader: asyncio.StreamReader) -> Outcome:
    """One reply, multi-line or not."""
    texts = []
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readuntil(b"\n")
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            raise ValueError(f"not a reply line: {line[:80]!r}")
        texts.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
        if line[3:4] != b"-":
            return Outcome(int(line[:3]), "\n".join(texts))
    raise ValueError(f"a reply of over {MAX_REPLY_LINES} lines")
