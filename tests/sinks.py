"""Receiving SMTP servers for the outbound tests: aiosmtpd in a thread, on a loopback port.

    with Sink(replies={"bad@example.net": "550 5.1.1 no such user",
                       "later@example.net": ["451 4.3.0 try later", "250 2.0.0 OK"]},
              dsn=True, pipelining=True, tls=cert_pair) as sink:
        ... route example.net to 127.0.0.1:sink.port ...
        sink.wait_for(1)                 # the messages it took, as Received records

`host` and `port`: where it listens (127.0.0.1 and a free port; MX tests put several sinks on
one port of different loopback addresses, as [outbound] port reaches every MX host on one).
Each RCPT gets its recipient's reply (a list is used up one reply per RCPT, its last one
then repeats; default 250); `data_reply` answers the data. What the server offers: SIZE
when `size` is set, 8BITMIME always, SMTPUTF8 unless `smtputf8=False`, STARTTLS with `tls`
(a (cert, key) pair), PIPELINING and DSN when asked. With `dsn`, RET/ENVID and NOTIFY/ORCPT
are taken and recorded; without it they are refused 555, as aiosmtpd refuses any parameter
it does not know. With `auth` (user, password) it offers AUTH, without TLS (loopback).
`data_delay` holds each data phase that long, and `most_busy` counts how many overlapped.
`sessions` records each session's EHLO name and whether it was TLS.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from conftest import free_port

LOOPBACK = "127.0.0.1"
DSN_MAIL = ("RET=", "ENVID=")
DSN_RCPT = ("NOTIFY=", "ORCPT=")


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mail_options: list[str]
    dsn_mail: list[str]  # RET=, ENVID= as sent
    dsn_rcpt: dict[str, list[str]]  # recipient -> NOTIFY=, ORCPT= as sent
    tls: bool
    helo: str
    login: str | None  # the user it logged in as (AUTH), if any


@dataclass
class Session:
    helo: str = ""
    tls: bool = False


class _DSNServer(SMTP):
    """aiosmtpd, taking the RFC 3461 parameters aside when the sink offers DSN."""

    def __init__(self, handler, *, offer_dsn: bool, **kwargs):
        super().__init__(handler, **kwargs)
        self.offer_dsn = offer_dsn
        self.dsn_params: list[str] = []

    def _take(self, arg: str, prefixes: tuple[str, ...]) -> str:
        self.dsn_params = []
        if not self.offer_dsn or not arg:
            return arg
        kept = []
        for token in arg.split(" "):
            if token.upper().startswith(prefixes):
                self.dsn_params.append(token)
            else:
                kept.append(token)
        return " ".join(kept)

    async def smtp_MAIL(self, arg):
        await super().smtp_MAIL(self._take(arg, DSN_MAIL))
        if self.envelope.mail_from is not None:
            self.envelope.dsn_mail = list(self.dsn_params)

    async def smtp_RCPT(self, arg):
        await super().smtp_RCPT(self._take(arg, DSN_RCPT))


class Sink:
    def __init__(self, *, replies: dict[str, str | list[str]] | None = None, data_reply: str | None = None,
                 tls: tuple[Path, Path] | None = None, smtputf8: bool = True, dsn: bool = False,
                 pipelining: bool = False, size: int | None = None, hostname: str = "sink.example.net",
                 host: str = LOOPBACK, port: int | None = None, auth: tuple[str, str] | None = None,
                 data_delay: float = 0.0):
        self.replies = {k.lower(): ([v] if isinstance(v, str) else list(v)) for k, v in (replies or {}).items()}
        self.data_reply = data_reply
        self.pipelining, self.dsn = pipelining, dsn
        self.auth, self.data_delay = auth, data_delay
        self.busy = 0  # transactions in their data phase now
        self.most_busy = 0  # the most there ever were at once
        self.received: list[Received] = []
        self.sessions: list[Session] = []
        self.rcpt_attempts: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.host = host
        self.port = port or free_port()
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        sink = self

        class _Controller(Controller):
            def factory(self):
                return _DSNServer(self.handler, offer_dsn=sink.dsn, **self.SMTP_kwargs)

        kwargs = {"tls_context": context, "require_starttls": False, "enable_SMTPUTF8": smtputf8,
                  "data_size_limit": size or 0, "decode_data": False}
        if auth is not None:
            # Loopback only: AUTH offered without TLS, as the relay tests need.
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        self._controller = _Controller(self, hostname=host, port=self.port, server_hostname=hostname, **kwargs)

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The first `count` messages, once they are all here (AssertionError if not in time)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.received)} of {count} messages at the sink in {timeout}s")
                self._changed.wait(left)
            return list(self.received[:count])

    # -- aiosmtpd handler hooks -----------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        with self._lock:
            self.sessions.append(Session(hostname, server._tls_protocol is not None))
        extra = (["250-PIPELINING"] if self.pipelining else []) + (["250-DSN"] if self.dsn else [])
        return responses[:-1] + extra + responses[-1:]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self._lock:
            self.rcpt_attempts.append(address)
            queue = self.replies.get(address.lower(), ["250 2.1.5 OK"])
            reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            if not hasattr(envelope, "dsn_rcpt"):
                envelope.dsn_rcpt = {}
            envelope.dsn_rcpt[address] = list(server.dsn_params)
        return reply

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode(), auth_data.password.decode()) == self.auth
        # handled=False: aiosmtpd answers a failure itself (535 5.7.8); handled=True would
        # mean this hook had answered, and the client would wait for a reply never sent.
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login.decode() if ok else None)

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply and not self.data_reply.startswith("2"):
            return self.data_reply
        with self._lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            if self.data_delay:
                await asyncio.sleep(self.data_delay)
        finally:
            with self._lock:
                self.busy -= 1
        message = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content),
                           list(envelope.mail_options), list(getattr(envelope, "dsn_mail", [])),
                           dict(getattr(envelope, "dsn_rcpt", {})), server._tls_protocol is not None,
                           session.host_name or "", session.auth_data if session.authenticated else None)
        with self._changed:
            self.received.append(message)
            self._changed.notify_all()
        return self.data_reply or "250 2.0.0 OK queued"


def certificate_for(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate for `hostname` (also localhost, 127.0.0.1): (cert, key)."""
    from conf.schema import TLSConfig
    from conf.tls import ensure_certificate

    cert, key = directory / f"{hostname}.pem", directory / f"{hostname}.key"
    ensure_certificate(TLSConfig(cert=cert, key=key, self_signed=True), hostname)
    return cert, key

