"""Anti-virus: a message streamed to a running clamd (clamav-daemon) with INSTREAM, and
its verdict as a VirusResult.

`Scanner(config).scan(chunks)` blocks (socket I/O): the caller runs it in a thread. It never
raises for clamd's trouble: clamd down, refusing, too slow, closing mid-stream or answering
an error (e.g. "INSTREAM size limit exceeded", past its StreamMaxLength) is
VirusResult("unscanned", reason=...), and [clamav] on_failure decides what that means.
`[clamav] timeout` bounds the whole scan, connect to verdict, however clamd dribbles.

The protocol (clamd(8), INSTREAM): "zINSTREAM\\0", then chunks, each a 4-byte big-endian
length and that many bytes, then a zero length; clamd answers one line, "stream: OK",
"stream: <signature> FOUND" or "<text> ERROR", ending in NUL. A zero-length chunk ends the
stream, so empty chunks from the caller are never sent. Memory is one chunk at a time.

The clamd package (the chosen client) gives the connection classes, their error types and
the answer parser; its own `instream` is not used for a message: it connects before
setting its timeout (a connect to a hung listener could wait forever), times each socket
call rather than the scan, cuts the stream into 1 KiB writes with `send` (whose partial
writes it ignores) and reads the answer with an unbounded readline. `_StreamClient` below
replaces those parts and nothing else.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterable, Iterator

import clamd

from conf.schema import ClamAVConfig
from conf.values import parse_listen
from policy.evidence import VirusResult

# One INSTREAM chunk at most; clamd takes any size up to its StreamMaxLength, this only
# keeps each write, and what it holds of a caller's big chunk, bounded.
PIECE = 256 * 1024
MAX_ANSWER = 4096  # clamd's answer is one short line; more is not clamd
CONNECT_RETRY = 0.05  # seconds between connects to a clamd whose queue is full
_LENGTH = struct.Struct("!L")


class _StreamClient:
    """INSTREAM under one deadline (time.monotonic()), for either kind of clamd socket."""

    deadline: float
    clamd_socket: socket.socket

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def instream_chunks(self, chunks: Iterable[bytes]) -> str:
        """Send the chunks; clamd's answer line (without the NUL)."""
        self._init_socket()
        try:
            try:
                self._send(b"zINSTREAM\0")
                for chunk in _source(chunks):
                    view = memoryview(chunk)
                    for start in range(0, len(view), PIECE):
                        piece = view[start:start + PIECE]
                        self._send(_LENGTH.pack(len(piece)))
                        self._send(piece)
                self._send(_LENGTH.pack(0))
            except (BrokenPipeError, ConnectionResetError):
                # clamd closes on an error it has already answered (a stream over
                # StreamMaxLength): the answer may still be there to read.
                answer = self._answer()
                if answer:
                    return answer
                raise
            return self._answer()
        finally:
            self.clamd_socket.close()

    def _send(self, data: bytes | memoryview) -> None:
        self.clamd_socket.settimeout(self._remaining())
        self.clamd_socket.sendall(data)

    def _answer(self) -> str:
        received = b""
        while b"\0" not in received and b"\n" not in received:
            self.clamd_socket.settimeout(self._remaining())
            try:
                data = self.clamd_socket.recv(MAX_ANSWER)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            received += data
            if len(received) > MAX_ANSWER:
                raise clamd.ResponseError("an answer too long for clamd's")
        return received.split(b"\0", 1)[0].split(b"\n", 1)[0].decode("utf-8", "replace").strip()


class _SourceError(Exception):
    """What the caller's chunks raised (its spool file unreadable), kept apart from the
    socket's errors: it is not clamd's trouble and goes back to the caller as it was."""


def _source(chunks: Iterable[bytes]) -> Iterator[bytes]:
    iterator = iter(chunks)
    while True:
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            raise _SourceError() from e
        yield chunk


class _UnixClient(_StreamClient, clamd.ClamdUnixSocket):
    def _init_socket(self) -> None:
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._remaining())
                sock.connect(self.unix_socket)
            except BlockingIOError:
                # A unix socket with a full accept queue (clamd's threads all busy) answers
                # EAGAIN at once rather than letting a timed connect wait: wait here.
                sock.close()
                time.sleep(min(CONNECT_RETRY, max(0.0, self.deadline - time.monotonic())))
                if time.monotonic() >= self.deadline:
                    raise clamd.ConnectionError(f"connect to {self.unix_socket} timed out "
                                                "(clamd's connection queue is full)") from None
                continue
            except OSError as e:
                sock.close()
                raise clamd.ConnectionError(_connect_error(self.unix_socket, e)) from e
            self.clamd_socket = sock
            return


class _NetworkClient(_StreamClient, clamd.ClamdNetworkSocket):
    def _init_socket(self) -> None:
        try:
            # create_connection: IPv6 too (the package's client is AF_INET only).
            self.clamd_socket = socket.create_connection((self.host, self.port), timeout=self._remaining())
        except OSError as e:
            where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
            raise clamd.ConnectionError(_connect_error(where, e)) from e


def _connect_error(where: str, e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return f"connect to {where} timed out"
    return f"cannot connect to {where}: {e.strerror or e}"


class Scanner:
    """Scans messages with the clamd at `config.address`: "unix:/path" or "host:port"
    ("[v6]:port"), an IP literal (a scan never waits on DNS). A bad address is a ValueError
    here, at start-up, not at the first message."""

    def __init__(self, config: ClamAVConfig):
        self.address = config.address
        self.timeout = float(config.timeout)
        if config.address.startswith("unix:"):
            path = config.address[len("unix:"):]
            if not path.startswith("/"):
                raise ValueError(f"[clamav] address {config.address!r}: the socket path must be absolute")
            self._client = lambda: _UnixClient(path)
        else:
            where = parse_listen(config.address)
            self._client = lambda: _NetworkClient(where.host, where.port)

    def scan(self, chunks: Iterable[bytes]) -> VirusResult:
        """The verdict on the message made of `chunks` (read lazily, one at a time; not to
        the end when clamd fails first). An error raised by the iterable itself (reading
        the spooled message) is the caller's and passes through."""
        client = self._client()
        client.deadline = time.monotonic() + self.timeout
        try:
            answer = client.instream_chunks(chunks)
        except _SourceError as e:
            raise e.__cause__ from None
        except TimeoutError:
            return VirusResult("unscanned", reason=f"clamd at {self.address} gave no verdict within {self.timeout:g}s")
        except clamd.ConnectionError as e:
            return VirusResult("unscanned", reason=str(e))
        except clamd.ResponseError as e:
            return VirusResult("unscanned", reason=f"clamd at {self.address}: {e}")
        except OSError as e:
            reason = e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e)
            return VirusResult("unscanned", reason=f"clamd at {self.address}: connection lost: {reason}")
        return _verdict(answer, self.address)


def _verdict(answer: str, address: str) -> VirusResult:
    if not answer:
        return VirusResult("unscanned", reason=f"clamd at {address} closed the connection without an answer")
    match = clamd.scan_response.match(answer)
    if match is None or match.group("status") == "ERROR":
        text = answer.rsplit("ERROR", 1)[0].strip() if answer.endswith("ERROR") else answer
        return VirusResult("unscanned", reason=f"clamd at {address}: {text[:200]}")
    if match.group("status") == "FOUND":
        return VirusResult("infected", signature=match.group("virus"))
    return VirusResult("clean")
