"""The handing node's side of the cluster's LMTP hand-off (RFC 2033; the owner's side is
mtad/lmtp.py): one message to a shard's owner, before the 250 to the client that sent it.

aiosmtplib speaks SMTP only (its data() reads one reply, where LMTP gives one per
recipient), so this is the few commands LMTP needs, over asyncio streams: LHLO, MAIL, a
RCPT per recipient, DATA with the message dot-stuffed (RFC 5321 §4.5.2), then each
accepted recipient's reply in RCPT order, QUIT. A message for accounts on several owners
opens a transaction at each (`Handing.begin`) and sends the data to none unless all of
them accepted every recipient (mtad/routing.py). Every step is bounded by `timeout`; a
connection that fails or a reply that makes no sense raises HandOffError, which the caller
answers 451 4.4.0 (the sender tries again later, and no copy was promised).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wire import node_proof as proof

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
                    eight_bit: bool = False, sent_from: int = 0, junk: bool = False) -> dict[str, Outcome]:
    """Deliver `message` (CRLF lines, trace headers included) to `recipients` at the LMTP
    server at host:port; each recipient's outcome. The data goes only if every RCPT was
    accepted; else the accepted ones are answered NOT_SENT and nothing is stored there."""
    handing = await Handing.begin(host, port, helo=helo, sender=sender, recipients=recipients, timeout=timeout,
                                  smtputf8=smtputf8, eight_bit=eight_bit, sent_from=sent_from, junk=junk)
    try:
        if not handing.accepted:
            return handing.refused()
        return await handing.send(message)
    finally:
        await handing.close()


class Handing:
    """One owner's LMTP transaction, open up to its data: MAIL and every RCPT answered. The
    caller sends the data (`send`) only once every owner of the message accepted every
    recipient, so that one owner's refusal stores nothing at another (every copy or none,
    mtad/routing.py); it always `close`s. `sent_from`: where in the message the sender's own
    bytes start (after the handing node's trace and verdict fields), told to a server that
    offers XSENT (mtad/lmtp.py) for its deduplication key; `junk`: the policy's Junk verdict,
    told to one that offers XJUNK, which files the copies in each account's Junk mailbox;
    `credentials(nonce)`: this node's name and its proof for a cluster listener's greeting
    nonce, sent as AUTH PLAIN before MAIL (wire/node_proof.py)."""

    def __init__(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 recipients: Sequence[str], timeout: float):
        self.where = f"{host}:{port}"
        self._reader, self._writer = reader, writer
        self.recipients = list(recipients)
        self.outcomes: dict[str, Outcome] = {}
        self._timeout = timeout
        self._open = True

    @classmethod
    async def begin(cls, host: str, port: int, *, helo: str, sender: str, recipients: Sequence[str],
                    timeout: float = 60.0, smtputf8: bool = False, eight_bit: bool = False,
                    sent_from: int = 0, junk: bool = False,
                    credentials: Callable[[str], tuple[str, str] | None] | None = None) -> Handing:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE * 2), timeout)
        except (OSError, TimeoutError) as e:
            raise HandOffError(f"cannot connect to {host}:{port}: {e}") from None
        handing = cls(host, port, reader, writer, recipients, timeout)
        try:
            await handing._step(handing._envelope(helo, sender, smtputf8, eight_bit, sent_from, junk, credentials))
        except BaseException:
            await handing.close()
            raise
        return handing

    @property
    def accepted(self) -> bool:
        return all(self.outcomes[r].ok for r in self.recipients)

    def refused(self) -> dict[str, Outcome]:
        """Each recipient's outcome when the data is not sent: the refusals, and NOT_SENT."""
        return {r: self.outcomes[r] if not self.outcomes[r].ok else NOT_SENT for r in self.recipients}

    async def send(self, message: bytes) -> dict[str, Outcome]:
        """The data, and each recipient's reply to it (RFC 2033 §4.2: in RCPT order)."""
        return await self._step(self._data(message))

    async def close(self) -> None:
        if self._open:
            self._open = False
            try:
                if not self._writer.is_closing():
                    self._writer.write(b"QUIT\r\n")
            # uvloop's transport, closed under us by a reset (the owner died), raises
            # RuntimeError: the hand-off's failure is already said, the QUIT is a courtesy.
            except (OSError, RuntimeError):
                pass
            self._writer.close()

    async def _step(self, work):
        try:
            return await asyncio.wait_for(work, self._timeout)
        # LimitOverrunError: a line longer than the reader's limit, which is no ValueError.
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise HandOffError(f"LMTP to {self.where} failed: {type(e).__name__}: {e}") from None

    async def _envelope(self, helo: str, sender: str, smtputf8: bool, eight_bit: bool, sent_from: int,
                        junk: bool, credentials: Callable[[str], tuple[str, str] | None] | None = None) -> None:
        reader, writer = self._reader, self._writer
        greeting = await _expect(reader, 220)
        writer.write(f"LHLO {helo}\r\n".encode())
        keywords = {line.split(" ", 1)[0].upper() for line in (await _expect(reader, 250)).text.split("\n")[1:]}
        # A cluster's listener asks the handing node to prove itself for the nonce in its
        # greeting (wire/node_proof.py).
        nonce = proof.nonce_in(greeting.text)
        answer = credentials(nonce) if credentials is not None and nonce and "AUTH" in keywords else None
        if answer is not None:
            name, proven = answer
            writer.write(b"AUTH PLAIN " + base64.b64encode(f"\0{name}\0{proven}".encode()) + b"\r\n")
            await _expect(reader, 235)
        # RFC 6531 §3.4: an envelope with an address beyond ASCII goes with SMTPUTF8, whatever
        # the caller said (the owner refuses such a MAIL or RCPT without it, 553 5.6.7).
        utf8 = smtputf8 or not sender.isascii() or not all(r.isascii() for r in self.recipients)
        params = (" BODY=8BITMIME" if eight_bit else "") + (" SMTPUTF8" if utf8 else "")
        if sent_from and "XSENT" in keywords:
            params += f" XSENT={sent_from}"
        if junk and "XJUNK" in keywords:
            params += " XJUNK"
        # PIPELINING is required of every LMTP server (RFC 2033 §5): MAIL and every RCPT at once.
        commands = [f"MAIL FROM:<{sender}>{params}\r\n"] + [f"RCPT TO:<{r}>\r\n" for r in self.recipients]
        writer.write("".join(commands).encode("utf-8"))
        mail = await _reply(reader)
        for recipient in self.recipients:
            self.outcomes[recipient] = await _reply(reader)
        if not mail.ok:
            self.outcomes = {recipient: mail for recipient in self.recipients}

    async def _data(self, message: bytes) -> dict[str, Outcome]:
        reader, writer = self._reader, self._writer
        writer.write(b"DATA\r\n")
        await _expect(reader, 354)
        body = _DOT.sub(b"..", message)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        writer.write(body + b".\r\n")
        await writer.drain()
        for recipient in self.recipients:
            self.outcomes[recipient] = await _reply(reader)
        return dict(self.outcomes)


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
