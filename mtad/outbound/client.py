"""One delivery attempt of one message to one destination: SMTP to its hosts in turn.

aiosmtplib opens the session: connect (`[queue] connect_timeout`), the greeting, EHLO
(HELO when EHLO is refused), STARTTLS and AUTH. The transaction itself (MAIL, RCPT, DATA
and the message) is ours, on the same transport, because aiosmtplib cannot do two things
it needs: PIPELINING (its protocol drops replies that arrive while none is awaited, RFC
2920 sends several commands before reading) and streaming (its `data()` takes the whole
message as bytes and copies it twice more); here the message is read from the queue file
in READ_SIZE chunks and written as the socket drains, so memory stays bounded.

What is sent, by what the server's EHLO offers:
- STARTTLS (RFC 3207) whenever offered: opportunistic, no certificate check, and a failed
  handshake is tried once more without TLS; for a domain in `require_verified_tls` the
  certificate must be valid for the host's name (system CAs plus `ca_file`), and a host
  without STARTTLS or with a bad certificate is not used (451 4.7.5 when none is left).
- AUTH (RFC 4954) to the relay with relay_user, only over TLS or to a loopback address.
- SIZE (RFC 1870): SIZE=n on MAIL; a message over the server's limit bounces 552 5.3.4
  before any transaction.
- 8BITMIME (RFC 6152): BODY=8BITMIME; 8-bit data to a server without it bounces 554 5.6.3
  (we do not convert). SMTPUTF8 (RFC 6531): a message that needs it (the envelope says so,
  or an address is not ASCII) to a server without it bounces 553 5.6.7 (RFC 6531 §3.2).
- DSN (RFC 3461 §4): RET, ENVID on MAIL, NOTIFY and ORCPT on RCPT, when offered; then the
  next hop reports, and `Outcome.dsn` says so.
- PIPELINING (RFC 2920 §3.1): MAIL, every RCPT and DATA in one write.
Connections are reused (ConnectionCache, as Postfix's connection cache): after a clean
transaction the session waits up to IDLE seconds for the next message to the same host,
which begins with RSET (pipelined with its envelope); one the server closed meanwhile is
found by that RSET and replaced by a new connection, not counted as a failure.
Per recipient: its RCPT reply when that refused it, else the reply to the data; 2xx
delivered, 4xx deferred, 5xx bounced. A host that cannot be reached, times out, greets
with an error or drops the connection before the data's end: the next host. When none is
left every recipient is deferred with the last failure. A connection lost after the
terminating dot was sent leaves the outcome unknown: deferred, no next host (the message
may arrive twice, RFC 1047, but is never lost).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiosmtplib

from conf.schema import Config
from mtad.outbound.dotstuff import DotStuffer
from mtad.outbound.routes import Host, Route

READ_SIZE = 64 * 1024
MAX_REPLY_LINE = 4096  # a longer reply line is a broken server (RFC 5321 §4.5.3.1.5: 512)
MAX_REPLY_LINES = 100
QUIT_TIMEOUT = 5.0
IDLE = 2.0  # seconds a session waits in the cache for its next message (Postfix: 2 s)
REUSE_LIMIT = 100  # transactions on one session (Postfix's smtp_connection_reuse_count_limit)

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"


@dataclass(frozen=True)
class Recipient:
    address: str
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY values; () sends none (the default)
    orcpt: str | None = None  # "rfc822;user@example.org", the address decoded (mtad/paths.py)


@dataclass(frozen=True)
class Message:
    """What one transaction sends; `open()` gives the bytes (the queue file)."""

    sender: str
    recipients: tuple[Recipient, ...]
    size: int
    open: Callable[[], BinaryIO]
    envid: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    eight_bit: bool = False

    @property
    def needs_smtputf8(self) -> bool:
        return self.smtputf8 or not all(a.isascii() for a in (self.sender, *(r.address for r in self.recipients)))


@dataclass(frozen=True)
class RecipientResult:
    address: str
    code: int
    reply: str  # "550 5.1.1 <x@example.net>: no such user", one line
    remote_mta: str | None = None

    @property
    def state(self) -> str:
        return DELIVERED if self.code < 400 else DEFERRED if self.code < 500 else BOUNCED


@dataclass(frozen=True)
class Outcome:
    results: tuple[RecipientResult, ...]
    host: Host | None = None  # the host that answered, None when none did
    tls: bool = False
    dsn: bool = False  # the host took our DSN parameters: it reports from here on


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    opportunistic_tls: ssl.SSLContext
    verified_tls: ssl.SSLContext
    require_verified: frozenset[str] = frozenset()
    relay_user: str = ""
    relay_password: str = ""

    @classmethod
    def from_config(cls, config: Config) -> ClientSettings:
        outbound, queue = config.outbound, config.queue
        opportunistic = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        opportunistic.check_hostname = False
        opportunistic.verify_mode = ssl.CERT_NONE  # RFC 7435: any TLS beats none
        verified = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if outbound.ca_file is not None:
            verified.load_verify_locations(cafile=str(outbound.ca_file))
        password = ""
        if outbound.relay_password_file is not None:
            password = Path(outbound.relay_password_file).read_text().strip("\r\n")
        return cls(outbound.helo_name or config.server.hostname, float(queue.connect_timeout),
                   float(queue.command_timeout), float(queue.data_timeout), opportunistic, verified,
                   frozenset(d.lower() for d in outbound.require_verified_tls), outbound.relay_user, password)


class HostFailedError(Exception):
    """This host did not take the transaction; the next may. `reply` is what it comes to."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


class _AfterDataError(Exception):
    """The connection failed after the terminating dot: the outcome is unknown."""


class _StaleError(Exception):
    """A cached session is gone (the server closed it while it waited)."""


async def deliver(route: Route, message: Message, settings: ClientSettings, *, verified: bool = False,
                  cache: ConnectionCache | None = None) -> Outcome:
    """Try `route`'s hosts in turn until one answers the transaction; `verified`: the
    recipients' domain is in require_verified_tls. With `cache`, a connection left open by
    an earlier message to the same host is used first, and this one is left there after."""
    last = "451 4.4.1 no host to try"
    for host in route.hosts:
        key = (host.address, host.port, host.name, verified, route.relay)
        try:
            if cache is not None and (session := cache.take(key)) is not None:
                try:
                    return await _send(session, message, cache, key, reset=True)
                except _StaleError:
                    pass  # it was closed while idle: a new connection, as if none had been cached
            session = await _connect(host, route, settings, verified=verified, tls=True)
            return await _send(session, message, cache, key, reset=False)
        except HostFailedError as e:
            last = e.reply
        except _AfterDataError as e:
            return _everyone(message, f"451 4.4.2 {host.name}: {e}; the message may arrive twice", host)
    # Every host refused us (a 5xx greeting, a bad certificate, AUTH refused) or was out of
    # reach: our side or theirs may change, so the mail waits; max_lifetime ends it.
    return _everyone(message, last if last.startswith("4") else f"451 4.4.0 {last}", None)


async def _connect(host: Host, route: Route, settings: ClientSettings, *, verified: bool, tls: bool) -> _Session:
    """A session ready for MAIL: greeted, EHLO, STARTTLS, AUTH; HostFailedError if not."""
    smtp = aiosmtplib.SMTP(hostname=host.address, port=host.port, local_hostname=settings.helo_name,
                           timeout=settings.command_timeout, start_tls=False)
    try:
        await smtp.connect(timeout=settings.connect_timeout)
        await _hello(smtp, settings)
        using_tls = False
        if smtp.supports_extension("starttls") and tls:
            context = settings.verified_tls if verified else settings.opportunistic_tls
            try:
                await smtp.starttls(server_hostname=host.name, tls_context=context, timeout=settings.command_timeout)
            except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as e:
                if verified:
                    raise HostFailedError(f"451 4.7.5 {host}: TLS failed: {_why(e)}") from None
                smtp.close()
                # RFC 7435: opportunistic TLS that fails falls back to none, once.
                return await _connect(host, route, settings, verified=False, tls=False)
            using_tls = True
            await _hello(smtp, settings)
        elif verified:
            raise HostFailedError(f"451 4.7.5 {host} offers no STARTTLS, and TLS is required")
        if route.relay and settings.relay_user:
            if not (using_tls or ipaddress.ip_address(host.address).is_loopback):
                raise HostFailedError(f"451 4.7.10 {host}: no TLS to log in over")
            await smtp.login(settings.relay_user, settings.relay_password)
    except HostFailedError:
        smtp.close()
        raise
    except aiosmtplib.SMTPResponseException as e:
        smtp.close()
        raise HostFailedError(_reply_line(e.code, e.message, host)) from None
    except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
        smtp.close()
        raise HostFailedError(f"451 4.4.1 {host}: {_why(e)}") from None
    return _Session(smtp, host, settings, using_tls)


async def _send(session: _Session, message: Message, cache: ConnectionCache | None, key: tuple,
                *, reset: bool) -> Outcome:
    """One transaction on `session`; then the session goes to `cache`, or is closed."""
    try:
        refused = _refusal(session.smtp, message)
        if refused is not None:
            outcome, keep = _everyone(message, refused, session.host, session.tls), True
        else:
            results, dsn = await session.transaction.run(message, reset=reset)
            outcome, keep = Outcome(tuple(results), session.host, session.tls, dsn), session.transaction.reusable
    except BaseException:
        session.drop()
        raise
    session.uses += 1
    if keep and cache is not None and session.uses < REUSE_LIMIT:
        cache.give(key, session)
    else:
        await session.quit()
    return outcome


class _Session:
    """An open SMTP session, between transactions."""

    def __init__(self, smtp: aiosmtplib.SMTP, host: Host, settings: ClientSettings, tls: bool):
        self.smtp = smtp
        self.host = host
        self.tls = tls
        self.uses = 0
        self.transaction = _Transaction(smtp, host, settings)

    async def quit(self) -> None:
        await self.transaction.quit()
        self.smtp.close()

    def drop(self) -> None:
        """Close without a word (idle too long, the runner stopping)."""
        self.transaction.say_quit()
        self.smtp.close()


class ConnectionCache:
    """Sessions left open after a transaction, by host, for the next message there (as
    Postfix's connection cache does): each waits at most IDLE seconds and carries at most
    REUSE_LIMIT transactions; the next transaction on it begins with RSET, pipelined, which
    also finds a session the server has closed meanwhile."""

    def __init__(self, idle: float = IDLE) -> None:
        self._idle = idle
        self._sessions: dict[tuple, list[tuple[_Session, asyncio.TimerHandle]]] = {}

    def take(self, key: tuple) -> _Session | None:
        waiting = self._sessions.get(key)
        if not waiting:
            return None
        session, timer = waiting.pop()
        if not waiting:
            del self._sessions[key]
        timer.cancel()
        return session

    def give(self, key: tuple, session: _Session) -> None:
        timer = asyncio.get_running_loop().call_later(self._idle, self._expire, key, session)
        self._sessions.setdefault(key, []).append((session, timer))

    def _expire(self, key: tuple, session: _Session) -> None:
        waiting = self._sessions.get(key, [])
        for i, (s, _) in enumerate(waiting):
            if s is session:
                del waiting[i]
                break
        if not waiting:
            self._sessions.pop(key, None)
        session.drop()

    def close(self) -> None:
        for waiting in self._sessions.values():
            for session, timer in waiting:
                timer.cancel()
                session.drop()
        self._sessions.clear()


async def _hello(smtp: aiosmtplib.SMTP, settings: ClientSettings) -> None:
    try:
        await smtp.ehlo(timeout=settings.command_timeout)
    except aiosmtplib.SMTPHeloError:
        await smtp.helo(timeout=settings.command_timeout)  # RFC 5321 §3.2: an old server


def _refusal(smtp: aiosmtplib.SMTP, message: Message) -> str | None:
    """What the whole message gets when this server cannot take it, before any command."""
    if message.needs_smtputf8 and not smtp.supports_extension("smtputf8"):
        return "553 5.6.7 the message needs SMTPUTF8, which the server does not offer"
    if message.eight_bit and not smtp.supports_extension("8bitmime"):
        return "554 5.6.3 the message has 8-bit data, and the server does not offer 8BITMIME"
    limit = smtp.esmtp_extensions.get("size", "")
    if limit.isdigit() and 0 < int(limit) < message.size:
        return f"552 5.3.4 the message ({message.size} bytes) is over the server's limit ({limit})"
    return None


class _Transaction(asyncio.Protocol):
    """MAIL, RCPT, DATA and the data, on the transport aiosmtplib opened, as this transport's
    protocol from now on: replies are read in order, however they arrive."""

    def __init__(self, smtp: aiosmtplib.SMTP, host: Host, settings: ClientSettings):
        self._smtp = smtp
        self._host = host
        self._settings = settings
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: asyncio.Queue[tuple[int, str] | BaseException] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self._transport: asyncio.Transport = smtp.transport  # type: ignore[assignment]
        self._transport.set_protocol(self)
        self.reusable = False  # the last transaction ended cleanly: another may follow

    # -- asyncio.Protocol --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end + 1]).rstrip(b"\r\n")
            del self._buffer[:end + 1]
            self._line(line.decode("utf-8", "replace"))
        if len(self._buffer) > MAX_REPLY_LINE:
            self._fail(ConnectionError("reply line too long"))

    def _line(self, line: str) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            self._fail(ConnectionError(f"malformed reply {line[:80]!r}"))
            return
        self._lines.append(line[4:].strip())
        if len(self._lines) > MAX_REPLY_LINES:
            self._fail(ConnectionError("reply too long"))
        elif line[3:4] != "-":
            self._replies.put_nowait((int(line[:3]), " ".join(t for t in self._lines if t)))
            self._lines = []

    def _fail(self, error: BaseException) -> None:
        self._replies.put_nowait(error)
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._replies.put_nowait(ConnectionError("connection lost") if exc is None else exc)
        self._writable.set()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the transaction ---------------------------------------------------------------

    async def reply(self, timeout: float) -> tuple[int, str]:
        try:
            got = await asyncio.wait_for(self._replies.get(), timeout)
        except TimeoutError:
            raise ConnectionError(f"no reply within {timeout:g}s") from None
        if isinstance(got, BaseException):
            raise ConnectionError(_why(got))
        return got

    async def run(self, message: Message, *, reset: bool = False) -> tuple[list[RecipientResult], bool]:
        """MAIL, RCPT, DATA, the message; `reset`: RSET first (a session used before), and
        _StaleError if that finds the session closed."""
        smtp = self._smtp
        utf8 = message.needs_smtputf8
        dsn = smtp.supports_extension("dsn")
        mail = _mail_command(message, smtp, dsn)
        rcpts = [_rcpt_command(r, dsn, utf8) for r in message.recipients]
        pipelining = smtp.supports_extension("pipelining")
        timeout = self._settings.command_timeout
        self.reusable = False
        if reset:
            try:
                if self._transport.is_closing():
                    raise ConnectionError("closed")
                if pipelining:
                    self._write_lines(["RSET", mail, *rcpts, "DATA"], utf8)
                else:
                    self._write_lines(["RSET"], utf8)
                code, _ = await self.reply(timeout)
            except (ConnectionError, RuntimeError):
                raise _StaleError() from None
            if code != 250:
                raise _StaleError()
        try:
            commands = [mail, *rcpts]
            if pipelining:
                if not reset:
                    self._write_lines(commands + ["DATA"], utf8)
                mail_reply = await self.reply(timeout)
                rcpt_replies = [await self.reply(timeout) for _ in rcpts]
                data_reply = await self.reply(timeout)
            else:
                self._write_lines([mail], utf8)
                mail_reply = await self.reply(timeout)
                rcpt_replies, data_reply = [], (503, "5.5.1 no DATA sent")
                if mail_reply[0] == 250:
                    for command in rcpts:
                        self._write_lines([command], utf8)
                        rcpt_replies.append(await self.reply(timeout))
                    if any(code < 300 for code, _ in rcpt_replies):
                        self._write_lines(["DATA"], utf8)
                        data_reply = await self.reply(timeout)
        except ConnectionError as e:
            raise HostFailedError(f"451 4.4.2 {self._host}: {_why(e)} in the envelope") from None
        if mail_reply[0] != 250:
            results = [self._result(r.address, *mail_reply) for r in message.recipients]
            if data_reply[0] == 354:
                await self._send_data_end()
            self.reusable = mail_reply[0] != 421 and data_reply[0] != 421
            return results, False
        accepted = [r for r, (code, _) in zip(message.recipients, rcpt_replies, strict=True) if code < 300]
        results = {r.address: self._result(r.address, *reply)
                   for r, reply in zip(message.recipients, rcpt_replies, strict=True) if reply[0] >= 300}
        if accepted and data_reply[0] == 354:
            try:
                await self._send_message(message)
            except ConnectionError as e:
                raise HostFailedError(f"451 4.4.2 {self._host}: {_why(e)} while sending the message") from None
            try:
                final = await self.reply(self._settings.data_timeout)
            except ConnectionError as e:
                raise _AfterDataError(f"{_why(e)} after the end of the data") from None
            for r in accepted:
                results[r.address] = self._result(r.address, *final)
        else:
            if data_reply[0] == 354:  # RFC 2920 §3.1: no recipient, but DATA went through
                await self._send_data_end()
            for r in accepted:
                code, text = data_reply if data_reply[0] >= 400 else (451, "4.5.0 DATA not accepted")
                results[r.address] = self._result(r.address, code, text)
        # RFC 5321 §3.8: a 421 closes the session. Otherwise the next RSET starts clean.
        self.reusable = not any(r.code == 421 for r in results.values()) and not self._transport.is_closing()
        return [results[r.address] for r in message.recipients], dsn

    def _write_lines(self, lines: list[str], utf8: bool) -> None:
        self._transport.write("".join(f"{line}\r\n" for line in lines).encode("utf-8" if utf8 else "ascii"))

    async def _send_message(self, message: Message) -> None:
        stuffer = DotStuffer()
        with message.open() as source:
            while chunk := source.read(READ_SIZE):
                await self._drain()
                self._transport.write(stuffer.feed(chunk))
        self._transport.write(stuffer.end())
        await self._drain()

    async def _send_data_end(self) -> None:
        try:
            self._transport.write(b".\r\n")
            await self.reply(self._settings.command_timeout)
        except ConnectionError:
            pass

    async def _drain(self) -> None:
        if self._transport.is_closing():
            raise ConnectionError("connection lost")
        try:
            await asyncio.wait_for(self._writable.wait(), self._settings.data_timeout)
        except TimeoutError:
            raise ConnectionError(f"could not write for {self._settings.data_timeout:g}s") from None

    async def quit(self) -> None:
        if self._transport.is_closing():
            return
        try:
            self._transport.write(b"QUIT\r\n")
            await self.reply(QUIT_TIMEOUT)
        except (ConnectionError, RuntimeError):
            pass

    def say_quit(self) -> None:
        if not self._transport.is_closing():
            self._transport.write(b"QUIT\r\n")

    def _result(self, address: str, code: int, text: str) -> RecipientResult:
        return RecipientResult(address, code, _reply_line(code, text), self._host.name)


def _mail_command(message: Message, smtp: aiosmtplib.SMTP, dsn: bool) -> str:
    params = []
    if smtp.supports_extension("size"):
        params.append(f"SIZE={message.size}")
    if message.eight_bit and smtp.supports_extension("8bitmime"):
        params.append("BODY=8BITMIME")
    if message.needs_smtputf8:
        params.append("SMTPUTF8")
    if dsn:
        if message.ret:
            params.append(f"RET={message.ret}")
        if message.envid:
            params.append(f"ENVID={xtext(message.envid, message.needs_smtputf8)}")
    return " ".join([f"MAIL FROM:<{message.sender}>", *params])


def _rcpt_command(recipient: Recipient, dsn: bool, utf8: bool) -> str:
    params = []
    if dsn:
        if recipient.notify:
            params.append("NOTIFY=" + ",".join(recipient.notify))
        if recipient.orcpt and ";" in recipient.orcpt:
            kind, _, value = recipient.orcpt.partition(";")
            params.append(f"ORCPT={kind};{xtext(value, utf8)}")
    return " ".join([f"RCPT TO:<{recipient.address}>", *params])


def xtext(value: str, utf8: bool = False) -> str:
    """RFC 3461 §4: `value` (the queue keeps ENVID and the ORCPT address decoded, as
    mtad/paths.py parses them) as xtext; beyond ASCII kept only in an SMTPUTF8 transaction
    (RFC 6533 §3), else as its UTF-8 octets."""
    out = []
    for c in value:
        if "!" <= c <= "~" and c not in "+=" or (utf8 and ord(c) > 0x7F):
            out.append(c)
        else:
            out.extend(f"+{byte:02X}" for byte in c.encode("utf-8"))
    return "".join(out)


def _everyone(message: Message, reply: str, host: Host | None, tls: bool = False) -> Outcome:
    code = int(reply[:3])
    name = host.name if host is not None else None
    return Outcome(tuple(RecipientResult(r.address, code, reply, name) for r in message.recipients), host, tls)


def _reply_line(code: int, text: str, host: Host | None = None) -> str:
    text = " ".join(text.split())[:400]
    return f"{code} {text}" if host is None else f"{code} {text} ({host.name})"


def _why(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())[:200]
