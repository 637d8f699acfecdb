"""aiosmtpd reduced to a connection: the one module that touches aiosmtpd's internals.

mtad.inbound runs its own SMTP core (mtad/session.py), so of aiosmtpd it wants only the
plumbing: the asyncio stream reader and writer, the idle timer, and the STARTTLS upgrade
whose second connection_made drops the plaintext read before the handshake (RFC 3207 §4.2,
CVE-2011-0411). aiosmtpd offers none of these as API; they are private names of
aiosmtpd.smtp.SMTP, listed in RELIED_ON, and the state SMTP.__init__ gives them, which
AiosmtpdConnection.__init__ sets itself (without the introspection that makes SMTP's own
cost half a millisecond a connection). tests/test_aiosmtpd_adapter.py checks each against
the installed aiosmtpd (and the Python asyncio it uses) and fails when an upgrade changes
one; setup.cfg pins aiosmtpd to SUPPORTED.

A subclass of AiosmtpdConnection writes `serve()`, the whole session, and uses only the
public methods here: read, write, drain, set_timeout, start_tls, the TLS details, close and
abort. aiosmtpd's own command loop, handler hooks and replies are never run.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto  # as aiosmtpd does: the STARTTLS upgrade builds one
import ssl

from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import __ident__ as AIOSMTPD_IDENT

# aiosmtpd versions whose internals this module was checked against: >= 1.4.6 (the
# SMTP-smuggling and STARTTLS-injection fixes), < 1.5. Kept equal to setup.cfg's pin.
SUPPORTED = ((1, 4, 6), (1, 5))

# The private names of aiosmtpd.smtp.SMTP used here, each with the parameters it is called
# or overridden with (methods) or None (attributes set by SMTP.__init__).
RELIED_ON: dict[str, tuple[str, ...] | None] = {
    "_handle_client": ("self",),  # overridden: the task connection_made starts
    "_timeout_cb": ("self",),  # overridden: the idle timer's callback
    "_reset_timeout": ("self", "duration"),  # restarts the idle timer
    "_cb_client_connected": ("self", "reader", "writer"),  # sets _reader and _writer
    "_tls_protocol": None,  # set by start_tls: connection_made reads its _extra
    "_original_transport": None,  # set by start_tls: tells connection_made it is STARTTLS
}
# Set by _cb_client_connected once the connection is up.
STREAMS = ("_reader", "_writer")
# asyncio's own private part of the upgrade, which aiosmtpd also uses.
SSL_PROTOCOL_PARAMETERS = ("loop", "app_protocol", "sslcontext", "waiter", "server_side")


class TLSHandshakeError(Exception):
    """The STARTTLS handshake failed (the client's certificate, protocol or ciphers)."""


class AiosmtpdConnection(SMTP):
    """One connection, driven by `serve()`."""

    def __init__(self, *, hostname: str, tls_context: ssl.SSLContext | None, timeout: float):
        # Not SMTP.__init__: for every connection it builds the tables of its own command
        # loop (its smtp_* and auth_* methods, the handler's hooks) through inspect.getmembers
        # and dir(), half a millisecond of a message's four at one connection a message, for
        # a loop that never runs here. The state its connection methods read (connection_made,
        # connection_lost, eof_received, the idle timer) is set as SMTP.__init__ sets it with
        # no handler, no AUTH and no PROXY; tests/test_aiosmtpd_adapter.py checks that the
        # names are aiosmtpd's own.
        # The running loop (a protocol is made in it), not aiosmtpd's make_loop(): that one
        # looks for it under warnings.catch_warnings(), 2% of a message's CPU at C=1.
        self.loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.__ident__ = AIOSMTPD_IDENT
        self.event_handler = None
        self.data_size_limit = None  # the session (mtad/readers.py) keeps the size limit
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # the idle timer's, in loop.time(): see _reset_timeout
        self._armed_for = 0.0  # what the timer in _timeout_handle was set for
        self._tls_handshake_okay = True
        self._tls_protocol: sslproto.SSLProtocol | None = None
        self._original_transport: asyncio.BaseTransport | None = None
        self.session = None
        self.envelope = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine: asyncio.Task | None = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods: dict = {}
        self._handle_hooks: dict = {}  # connection_made looks for a STARTTLS hook here
        self._ehlo_hook_ver = None
        self._smtp_methods: dict = {}
        self._enforce_call_limit = False

    async def serve(self) -> None:
        """The session, from the connection's start to its end (then the connection is
        closed). Runs as a task that a lost connection cancels."""
        raise NotImplementedError

    def timed_out(self) -> None:
        """The idle timer fired; the connection is closed after this returns."""

    # -- overrides of aiosmtpd's private methods ------------------------------------------

    async def _handle_client(self) -> None:
        # aiosmtpd's command loop, replaced: connection_made starts this as a task.
        await self.serve()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels the timer and makes another at each command (2% of a message's
        # CPU at C=1). Here a command moves the deadline only; the one timer is made again
        # when it fires before the deadline, or when the deadline comes sooner than it.
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None or self._deadline < self._armed_for:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None

    def _arm_timer(self) -> None:
        self._armed_for = self._deadline
        self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:  # the connection was busy since it was set
            self._arm_timer()
            return
        self.timed_out()
        super()._timeout_cb()

    # -- the connection -------------------------------------------------------------------

    @property
    def peer_address(self) -> str:
        """The client's IP address (or the socket's peer name, if not an IP socket)."""
        peer = self.session.peer
        return peer[0] if isinstance(peer, tuple) else str(peer)

    @property
    def peer_port(self) -> int | None:
        """The client's port (logged with its address: which connection is which)."""
        peer = self.session.peer
        return peer[1] if isinstance(peer, tuple) else None

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end of the stream."""
        return await self._reader.read(size)

    def write(self, data: bytes) -> None:
        """Queue `data`, unless the connection is closing (then it is dropped)."""
        if data and not self.closing:
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def set_timeout(self, seconds: float | None) -> None:
        """Restart the idle timer: `seconds`, or the constructor's timeout if None."""
        self._reset_timeout(seconds)

    @property
    def disconnected(self) -> bool:
        """The connection is lost (aiosmtpd's connection_lost has run)."""
        return self.transport is None

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, without flushing what is queued."""
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(self) -> None:
        """aiosmtpd's STARTTLS upgrade (smtp_STARTTLS), minus its reply: the caller has
        said 220 already. Plaintext read before the handshake is dropped by aiosmtpd's
        connection_made. TLSHandshakeError if the handshake fails."""
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter, server_side=True)
        self._original_transport = self.transport
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSHandshakeError() from error
        if self.transport.is_closing():
            # Aborted during the handshake (a stop): asyncio's TLS layer then ends the wait
            # as if it had succeeded, and, its application side never connected, does not
            # pass the connection's loss on: aiosmtpd's idle timer would stay armed.
            self._cancel_timer()
            raise ConnectionResetError("closed during the TLS handshake")

    def tls_version(self) -> str | None:
        """"TLSv1.3" and the like, or None on a plaintext connection."""
        tls = self._tls_object()
        return tls.version() if tls is not None else None

    def tls_cipher(self) -> str:
        tls = self._tls_object()
        cipher = tls.cipher() if tls is not None else None
        return cipher[0] if cipher else "unknown"

    def _tls_object(self) -> ssl.SSLObject | None:
        if self.transport is None:
            return None
        return self.transport.get_extra_info("ssl_object")
