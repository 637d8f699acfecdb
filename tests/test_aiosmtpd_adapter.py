"""mtad/aiosmtpd_adapter.py against the installed aiosmtpd: fails when an upgrade changes the
internals it relies on.

First by name: the version is in the range the adapter was checked against (and setup.cfg
pins), and every private method it overrides or calls has the parameters it expects. Then by
use, over a loopback socket: a connection whose serve() reads, writes, upgrades to TLS with
a plaintext line pipelined behind the request (aiosmtpd's connection_made must drop it,
RFC 3207 §4.2), and is closed by the idle timer after saying why.
"""

from __future__ import annotations

import asyncio
import configparser
import importlib.metadata
import inspect
import re
import ssl
from pathlib import Path

import aiosmtpd.smtp

from conf.schema import TLSConfig
from conf.tls import ensure_certificate, server_context
from mtad import aiosmtpd_adapter
from mtad.aiosmtpd_adapter import RELIED_ON, SSL_PROTOCOL_PARAMETERS, SUPPORTED, AiosmtpdConnection

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", text).group().split("."))


def test_installed_aiosmtpd_is_in_the_supported_range():
    low, high = SUPPORTED
    assert low <= _version(importlib.metadata.version("aiosmtpd")) < high


def test_setup_cfg_pins_the_supported_range():
    setup = configparser.ConfigParser()
    setup.read(SETUP_CFG)
    (pin,) = [line for line in setup["options"]["install_requires"].splitlines() if line.startswith("aiosmtpd")]
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", pin))
    low, high = SUPPORTED
    assert (_version(bounds[">="]), _version(bounds["<"])) == (low, high), pin


def test_the_private_methods_have_the_parameters_relied_on():
    smtp = aiosmtpd.smtp.SMTP
    for name, parameters in RELIED_ON.items():
        if parameters is None:
            continue
        method = getattr(smtp, name, None)
        assert callable(method), f"aiosmtpd.smtp.SMTP.{name} is gone"
        assert tuple(inspect.signature(method).parameters) == parameters, name
    assert inspect.iscoroutinefunction(smtp._handle_client)
    assert not inspect.iscoroutinefunction(smtp._timeout_cb)  # a call_later callback
    init = inspect.signature(smtp.__init__).parameters
    assert {"handler", "hostname", "tls_context", "timeout"} <= set(init)
    assert tuple(inspect.signature(aiosmtpd_adapter.sslproto.SSLProtocol).parameters)[:5] == SSL_PROTOCOL_PARAMETERS
    # Everything else it reaches is public: session.peer, loop, tls_context, transport.


def test_the_private_attributes_exist_after_init():
    async def main():
        connection = AiosmtpdConnection(hostname="mx.example.test", tls_context=None, timeout=5)
        for name, parameters in RELIED_ON.items():
            if parameters is None:
                assert hasattr(connection, name) and getattr(connection, name) is None, name
        assert connection.transport is None and connection.disconnected

    asyncio.run(main())


def test_init_sets_what_aiosmtpds_init_sets():
    """AiosmtpdConnection.__init__ replaces SMTP.__init__: the same attributes, so that
    the connection methods of aiosmtpd it still runs find what they read."""
    async def main():
        ours = AiosmtpdConnection(hostname="mx.example.test", tls_context=None, timeout=5)
        theirs = aiosmtpd.smtp.SMTP(None, hostname="mx.example.test", tls_context=None, timeout=5)
        assert set(vars(ours)) - {"_deadline", "_armed_for"} == set(vars(theirs))  # those two: the lazy timer's
        for name in ("_handle_hooks", "_timeout_duration", "hostname", "tls_context", "loop", "session",
                     "transport", "_tls_protocol", "_original_transport", "_handler_coroutine", "_timeout_handle"):
            assert getattr(ours, name) == getattr(theirs, name), name

    asyncio.run(main())


class _Echo(AiosmtpdConnection):
    """Says hello, echoes lines; on "STARTTLS" upgrades; on silence says why and is closed."""

    def __init__(self, context: ssl.SSLContext, timeout: float, seen: list):
        super().__init__(hostname="mx.example.test", tls_context=context, timeout=timeout)
        self.seen = seen

    async def serve(self) -> None:
        self.write(f"hello {self.peer_address}\r\n".encode())
        await self.drain()
        line = b""
        while True:
            # A byte at a time: what follows a line stays in aiosmtpd's stream reader.
            byte = await self.read(1)
            if not byte:
                return
            if byte != b"\n":
                line += byte
                continue
            line, command = b"", line.rstrip(b"\r")
            self.seen.append(command)
            if command == b"STARTTLS":
                self.write(b"go ahead\r\n")
                await self.drain()
                await self.start_tls()
                self.write(f"now {self.tls_version()} {self.tls_cipher()}\r\n".encode())
            else:
                self.write(command + b" " + str(self.tls_version()).encode() + b"\r\n")
            await self.drain()

    def timed_out(self) -> None:
        self.seen.append(b"timed out")
        self.write(b"bye\r\n")


def test_a_connection_over_loopback(tmp_path):
    tls = TLSConfig(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem", self_signed=True)
    ensure_certificate(tls, "localhost")
    client_context = ssl.create_default_context(cafile=str(tls.cert))
    seen: list[bytes] = []

    async def main():
        server = await asyncio.get_running_loop().create_server(
            lambda: _Echo(server_context(tls), 0.5, seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"hello 127.0.0.1\r\n"
            writer.write(b"plain\r\n")
            assert await reader.readline() == b"plain None\r\n"
            # Pipelined behind STARTTLS, in the same segment: must never be read.
            writer.write(b"STARTTLS\nINJECTED\r\n")
            assert await reader.readline() == b"go ahead\r\n"
            await writer.start_tls(client_context, server_hostname="localhost")
            now = await reader.readline()
            assert now.startswith(b"now TLSv1.") and not now.endswith(b" unknown\r\n"), now
            writer.write(b"secret\r\n")
            assert re.fullmatch(rb"secret TLSv1\.[23]\r\n", await reader.readline())
            # Silent past the timeout: told why, then closed.
            assert await asyncio.wait_for(reader.readline(), 5) == b"bye\r\n"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert seen == [b"plain", b"STARTTLS", b"secret", b"timed out"]


class _Timed(AiosmtpdConnection):
    """Each line restarts the idle timer: "long" for 30 s, anything else for the default."""

    def __init__(self, timeout: float, seen: list):
        super().__init__(hostname="mx.example.test", tls_context=None, timeout=timeout)
        self.seen = seen

    async def serve(self) -> None:
        while True:
            line = await self._reader.readline()
            if not line:
                return
            self.set_timeout(30.0 if line == b"long\r\n" else None)
            self.write(b"ok\r\n")

    def timed_out(self) -> None:
        self.seen.append(self.loop.time())


def test_the_idle_timer_follows_the_last_command():
    """The timer is moved, not made again, at each command: a connection busy for longer
    than the timeout stays open, and one gone quiet is closed a timeout after its last
    command; a shorter timeout after a longer one is kept too."""
    async def main():
        seen: list[float] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Timed(0.4, seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(8):  # 1.2 s of commands, 0.15 s apart: three timeouts' worth
                writer.write(b"noop\r\n")
                assert await reader.readline() == b"ok\r\n"
                await asyncio.sleep(0.15)
            assert seen == [], "timed out while busy"
            writer.write(b"long\r\n")
            assert await reader.readline() == b"ok\r\n"
            await asyncio.sleep(0.6)  # past the default: the timer fires, finds 30 s to go, waits on
            assert seen == [], "timed out within the long timeout"
            writer.write(b"short again\r\n")
            assert await reader.readline() == b"ok\r\n"
            last = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the timer
            assert len(seen) == 1 and 0.35 <= seen[0] - last <= 1.5, seen[0] - last
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
