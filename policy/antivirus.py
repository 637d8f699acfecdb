"""Anti-virus: a message streamed to a running clamd (clamav-daemon) with INSTREAM, and
its verdict as a VirusResult.

`await Scanner(config).scan(chunks)` runs on the event loop: the socket is non-blocking and
each send or receive waits as a coroutine, so no thread is held while clamd works (a hop to
a thread and back cost the loop 0.45-0.5 ms under load, a scan of a 5 KB message about as
much again). At most `at_once` scans of one process talk to clamd together (clamd's own
MaxThreads is 10-12 by default); the others wait their turn before their time starts. The
chunks are read between the sends: a message being read back from its file is read 64 KiB
at a time, one piece at a time.

It never raises for clamd's trouble: clamd down, refusing, too slow, closing mid-stream or
answering an error (e.g. "INSTREAM size limit exceeded", past its StreamMaxLength) is
VirusResult("unscanned", reason=...), and [clamav] on_failure decides what that means.
`[clamav] timeout` bounds the whole scan, connect to verdict, however clamd dribbles.

The protocol (clamd(8), INSTREAM): "zINSTREAM\\0", then chunks, each a 4-byte big-endian
length and that many bytes, then a zero length; clamd answers one line, "stream: OK",
"stream: <signature> FOUND" or "<text> ERROR", ending in NUL. A zero-length chunk ends the
stream, so empty chunks from the caller are never sent. Memory is one chunk at a time, and
at most two pieces (PIECE) of frames waiting to be sent.

The clamd package (the chosen client) gives the error types and the answer parser; its
connection classes block (and its `instream` connects before setting its timeout, times each
socket call rather than the scan, ignores partial writes and reads the answer with an
unbounded readline), so the socket work is done here.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
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
AT_ONCE = 16  # scans of one process talking to clamd at once
_LENGTH = struct.Struct("!L")


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


class _Stage:
    """How far one scan got: what a timeout is reported as."""

    stage = "connecting"  # then "queue_full" while a unix connect waits for room, "streaming"


def _connect_error(where: str, e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return f"connect to {where} timed out"
    # os.strerror: asyncio's sock_connect puts its own words in strerror ("Connect call failed")
    return f"cannot connect to {where}: {os.strerror(e.errno) if e.errno else e.strerror or e}"


class Scanner:
    """Scans messages with the clamd at `config.address`: "unix:/path" or "host:port"
    ("[v6]:port"), an IP literal (a scan never waits on DNS). A bad address is a ValueError
    here, at start-up, not at the first message."""

    def __init__(self, config: ClamAVConfig, *, at_once: int = AT_ONCE):
        self.address = config.address
        self.timeout = float(config.timeout)
        self._path: str | None = None
        self._where: tuple[str, int] | None = None
        if config.address.startswith("unix:"):
            path = config.address[len("unix:"):]
            if not path.startswith("/"):
                raise ValueError(f"[clamav] address {config.address!r}: the socket path must be absolute")
            self._path = path
        else:
            where = parse_listen(config.address)
            self._where = (where.host, where.port)
        self._at_once = at_once
        self._turns: asyncio.Semaphore | None = None  # made in the loop, at the first scan

    async def scan(self, chunks: Iterable[bytes]) -> VirusResult:
        """The verdict on the message made of `chunks` (read lazily, one at a time; not to
        the end when clamd fails first). An error raised by the iterable itself (reading
        the spooled message) is the caller's and passes through."""
        if self._turns is None:
            self._turns = asyncio.Semaphore(self._at_once)
        async with self._turns:
            progress = _Stage()
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._instream(chunks, progress)
            except _SourceError as e:
                raise e.__cause__ from None
            except TimeoutError:
                if progress.stage == "queue_full":
                    reason = f"connect to {self._path} timed out (clamd's connection queue is full)"
                elif progress.stage == "connecting":
                    reason = _connect_error(self._display(), TimeoutError())
                else:
                    reason = f"clamd at {self.address} gave no verdict within {self.timeout:g}s"
                return VirusResult("unscanned", reason=reason)
            except clamd.ConnectionError as e:
                return VirusResult("unscanned", reason=str(e))
            except clamd.ResponseError as e:
                return VirusResult("unscanned", reason=f"clamd at {self.address}: {e}")
            except OSError as e:
                reason = e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e)
                return VirusResult("unscanned", reason=f"clamd at {self.address}: connection lost: {reason}")
        return _verdict(answer, self.address)

    def _display(self) -> str:
        if self._path is not None:
            return self._path
        host, port = self._where
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _instream(self, chunks: Iterable[bytes], progress: _Stage) -> str:
        """Send the chunks; clamd's answer line (without the NUL)."""
        loop = asyncio.get_running_loop()
        sock = await self._connect(progress)
        progress.stage = "streaming"
        try:
            try:
                # The frames go out in sends of about PIECE: a message of a few KB is one
                # send, not four, and clamd's reading thread wakes once for it.
                out = bytearray(b"zINSTREAM\0")
                for chunk in _source(chunks):
                    view = memoryview(chunk)
                    for start in range(0, len(view), PIECE):
                        piece = view[start:start + PIECE]
                        out += _LENGTH.pack(len(piece))
                        out += piece
                        if len(out) >= PIECE:
                            await loop.sock_sendall(sock, out)
                            out = bytearray()
                out += _LENGTH.pack(0)
                await loop.sock_sendall(sock, out)
            except (BrokenPipeError, ConnectionResetError):
                # clamd closes on an error it has already answered (a stream over
                # StreamMaxLength): the answer may still be there to read.
                answer = await _answer(loop, sock)
                if answer:
                    return answer
                raise
            return await _answer(loop, sock)
        finally:
            sock.close()

    async def _connect(self, progress: _Stage) -> socket.socket:
        if self._path is not None:
            return await _connect_unix(self._path, progress)
        host, port = self._where
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except OSError as e:
            sock.close()
            raise clamd.ConnectionError(_connect_error(self._display(), e)) from e
        except BaseException:  # the deadline (a cancel): the socket goes with it
            sock.close()
            raise
        return sock


async def _connect_unix(path: str, progress: _Stage) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)  # a unix socket connects at once, or says why not
        except BlockingIOError:
            # A full accept queue (clamd's threads all busy) answers EAGAIN: try again until
            # the deadline, as a busy clamd may take the connection soon.
            sock.close()
            progress.stage = "queue_full"
            await asyncio.sleep(CONNECT_RETRY)
            continue
        except OSError as e:
            sock.close()
            raise clamd.ConnectionError(_connect_error(path, e)) from e
        return sock


async def _answer(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    received = b""
    while b"\0" not in received and b"\n" not in received:
        try:
            data = await loop.sock_recv(sock, MAX_ANSWER)
        except ConnectionResetError:
            data = b""
        if not data:
            break
        received += data
        if len(received) > MAX_ANSWER:
            raise clamd.ResponseError("an answer too long for clamd's")
    return received.split(b"\0", 1)[0].split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def _verdict(answer: str, address: str) -> VirusResult:
    if not answer:
        return VirusResult("unscanned", reason=f"clamd at {address} closed the connection without an answer")
    match = clamd.scan_response.match(answer)
    if match is None or match.group("status") == "ERROR":
        text = answer.rsplit("ERROR", 1)[0].strip() if answer.endswith("ERROR") else answer
        if "size limit exceeded" in text.lower():
            # Past clamd's StreamMaxLength: this message can never be scanned, whatever the
            # retries, and must not be let through unscanned either (policy/decide.py).
            return VirusResult("too_big", reason=f"clamd at {address}: {text[:200]}")
        return VirusResult("unscanned", reason=f"clamd at {address}: {text[:200]}")
    if match.group("status") == "FOUND":
        return VirusResult("infected", signature=match.group("virus"))
    return VirusResult("clean")
