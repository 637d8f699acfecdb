"""policy/antivirus.py against a real clamd (tests/clamd_peer.py: Debian's clamav-daemon with
the one EICAR signature) and against a clamd that never answers."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import tracemalloc

import clamd
import pytest

from clamd_peer import Clamd, SilentClamd
from conf.schema import ClamAVConfig
from conftest import free_port
from policy.antivirus import Scanner
from policy.evidence import VirusResult
from waiting import ticking

EICAR = clamd.EICAR  # the package carries it base64-encoded, so no scanner flags this file
SIGNATURE = "Eicar-Test-Signature"


class _Blocking:
    """A Scanner whose scan() is waited for here, each in an event loop of its own."""

    def __init__(self, scanner: Scanner):
        self.scanner = scanner

    def scan(self, chunks):
        return asyncio.run(self.scanner.scan(chunks))


def scanner(address: str, timeout: float = 5) -> _Blocking:
    return _Blocking(Scanner(ClamAVConfig(enabled=True, address=address, timeout=timeout)))


def message(body: bytes) -> list[bytes]:
    return [b"From: a@example.net\r\nTo: b@example.test\r\nSubject: test\r\n\r\n", body, b"\r\n"]


def test_eicar_in_the_body_is_found_and_named(clamd_server):
    result = scanner(clamd_server.address).scan(message(EICAR))
    assert result.result == "infected"
    assert result.signature.startswith(SIGNATURE)  # clamd adds ".UNOFFICIAL" for a local database


def test_eicar_in_a_base64_attachment_is_found(clamd_server):
    encoded = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    mime = (b"From: a@example.net\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"eicar.com\"\r\n\r\n" + encoded + b"--b1--\r\n")
    assert base64.b64encode(EICAR)[:20] in mime and EICAR not in mime
    assert scanner(clamd_server.address).scan([mime]).result == "infected"


def test_a_clean_message_is_clean(clamd_server):
    assert scanner(clamd_server.address).scan(message(b"Hello, nothing to see.")) == VirusResult("clean")


@pytest.mark.parametrize("cut", [1, 30, 67])
def test_eicar_cut_across_chunks_is_found(clamd_server, cut):
    # The stream is one file to clamd, whatever the chunks.
    chunks = [b"Subject: x\r\n\r\n" + EICAR[:cut], EICAR[cut:] + b"\r\n"]
    assert scanner(clamd_server.address).scan(chunks).result == "infected"


def test_an_empty_chunk_does_not_end_the_stream(clamd_server):
    # INSTREAM's zero-length chunk means "end": sent for an empty chunk, clamd would judge
    # the first part alone and answer OK.
    chunks = [b"Subject: x\r\n\r\n", b"", EICAR, b""]
    assert scanner(clamd_server.address).scan(chunks).result == "infected"


def test_a_big_chunk_is_sent_in_pieces(clamd_server):
    # One 1 MiB chunk with EICAR at its end: cut into PIECE-sized INSTREAM chunks.
    chunk = b"Subject: x\r\n\r\n" + b"a" * (1 << 20) + b"\r\n" + EICAR
    assert scanner(clamd_server.address).scan([chunk]).result == "infected"


def test_memory_is_one_chunk_at_a_time(clamd_server):
    def chunks():
        yield b"Subject: big\r\n\r\n"
        line = b"x" * 78 + b"\r\n"
        for _ in range(128):  # 128 x 64 KiB = 8 MiB, made one chunk at a time
            yield line * 820
    tracemalloc.start()
    try:
        result = scanner(clamd_server.address, timeout=30).scan(chunks())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.result == "clean"
    assert peak < 1 << 20, peak


def test_clamd_stopped_and_killed_mid_test():
    with Clamd() as server:
        scan = scanner(server.address).scan
        assert scan(message(b"first")).result == "clean"
        server.stop()  # SIGTERM: clamd removes its socket
        result = scan(message(EICAR))
        assert result.result == "unscanned"
        assert "No such file" in result.reason and server.socket_path in result.reason
        server.start()
        assert scan(message(EICAR)).result == "infected"
        server.kill()  # SIGKILL: the socket file stays, nobody listens
        result = scan(message(b"third"))
        assert result.result == "unscanned" and "refused" in result.reason


def test_clamd_killed_while_a_message_streams():
    with Clamd() as server:
        def chunks():
            yield b"Subject: x\r\n\r\n" + b"a" * 100_000
            server.kill()
            for _ in range(64):
                yield b"b" * 65536
        started = time.monotonic()
        result = scanner(server.address, timeout=5).scan(chunks())
        assert result.result == "unscanned"
        assert "connection lost" in result.reason or "without an answer" in result.reason, result.reason
        assert time.monotonic() - started < 3


def test_a_silent_clamd_is_unscanned_within_the_timeout(silent_clamd):
    started = time.monotonic()
    result = scanner(silent_clamd.address, timeout=1).scan(message(EICAR))
    elapsed = time.monotonic() - started
    assert result.result == "unscanned"
    assert "no verdict within 1s" in result.reason
    assert 0.9 <= elapsed < 2.5, elapsed
    assert silent_clamd.connections == 1


def test_a_clamd_that_never_reads_is_unscanned_within_the_timeout():
    with SilentClamd(read=False) as fake:
        started = time.monotonic()
        # 16 MiB: far more than the socket buffers hold, so the sends block.
        result = scanner(fake.address, timeout=1).scan(b"y" * 65536 for _ in range(256))
        elapsed = time.monotonic() - started
    assert result.result == "unscanned" and "no verdict within 1s" in result.reason
    assert 0.9 <= elapsed < 2.5, elapsed


def test_a_clamd_that_never_accepts_is_unscanned_within_the_timeout():
    # The clamd package's own client connects before it sets its timeout: it waits here for
    # ever. A timed connect to a full unix socket queue fails at once (EAGAIN): the scanner
    # tries again until its deadline, as a busy clamd may take the connection soon.
    with SilentClamd(accept=False) as fake:
        started = time.monotonic()
        result = scanner(fake.address, timeout=1).scan(message(b"x"))
        elapsed = time.monotonic() - started
    assert result.result == "unscanned"
    assert result.reason == f"connect to {fake.address[len('unix:'):]} timed out (clamd's connection queue is full)"
    assert 0.9 <= elapsed < 2.5, elapsed


def test_a_connection_queue_that_frees_up_is_waited_for():
    with SilentClamd(accept=False) as fake:
        timer = threading.Timer(0.3, fake.free_one)
        timer.start()
        result = scanner(fake.address, timeout=1).scan(message(b"x"))
        timer.join()
    # It got in once there was room (then the fake, silent, gave no verdict).
    assert result.result == "unscanned" and "no verdict within 1s" in result.reason, result.reason


def test_the_timeout_bounds_the_whole_scan_not_each_write():
    # A clamd that reads 256 KiB a second takes 16 s over 4 MiB while no single write
    # waits a second: the deadline is for the scan.
    with SilentClamd(tcp=True, read_rate=256 * 1024) as fake:
        started = time.monotonic()
        result = scanner(fake.address, timeout=1).scan(b"z" * 65536 for _ in range(64))
        elapsed = time.monotonic() - started
    assert result.result == "unscanned" and "no verdict within 1s" in result.reason
    assert 0.9 <= elapsed < 2.5, elapsed


def test_tcp_address():
    with Clamd(tcp=True) as server:
        assert server.address.startswith("127.0.0.1:")
        scan = scanner(server.address).scan
        result = scan(message(EICAR))
        assert result.result == "infected" and result.signature.startswith(SIGNATURE)
        assert scan(message(b"clean")).result == "clean"


def test_tcp_connection_refused():
    address = f"127.0.0.1:{free_port()}"
    result = scanner(address).scan(message(b"x"))
    assert result.result == "unscanned"
    assert result.reason == f"cannot connect to {address}: Connection refused"


def test_over_the_stream_limit_is_too_big_with_clamd_s_reason():
    with Clamd(stream_max="1M") as server:
        scan = scanner(server.address).scan
        assert scan([b"a" * 500_000]).result == "clean"
        result = scan(b"a" * 65536 for _ in range(32))  # 2 MiB
    assert result.result == "too_big"  # never scannable: policy/decide.py refuses it 552
    assert "INSTREAM size limit exceeded" in result.reason


@pytest.mark.parametrize("address", ["unix:clamd.ctl", "localhost:3310", "127.0.0.1", "[::1]"])
def test_a_bad_address_is_refused_at_start(address):
    with pytest.raises(ValueError):
        scanner(address)


def test_an_error_in_the_message_source_is_the_caller_s(clamd_server):
    def chunks():
        yield b"Subject: x\r\n\r\n"
        raise OSError(5, "Input/output error")  # the spool file could not be read
    with pytest.raises(OSError, match="Input/output"):
        scanner(clamd_server.address).scan(chunks())


def test_scans_wait_on_clamd_together_without_holding_the_loop(silent_clamd):
    # Each scan waits on clamd as a coroutine: three at once take one timeout, not three,
    # and the loop serves others (a ticker) meanwhile.
    async def main():
        checker = Scanner(ClamAVConfig(enabled=True, address=silent_clamd.address, timeout=1))
        return await ticking(asyncio.gather(*(checker.scan(message(b"x")) for _ in range(3))))
    started = time.monotonic()
    results, gap = asyncio.run(main())
    assert [r.result for r in results] == ["unscanned"] * 3
    assert time.monotonic() - started < 2.5
    assert gap < 0.25


def test_at_most_at_once_scans_talk_to_clamd(silent_clamd):
    async def main():
        checker = Scanner(ClamAVConfig(enabled=True, address=silent_clamd.address, timeout=0.5), at_once=1)
        return await asyncio.gather(*(checker.scan(message(b"x")) for _ in range(2)))
    connections = silent_clamd.connections
    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert [r.result for r in results] == ["unscanned"] * 2
    assert 0.95 <= elapsed < 2.0, elapsed  # one after the other, each its own 0.5 s
    assert silent_clamd.connections == connections + 2
