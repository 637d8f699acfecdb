"""COMPRESS=DEFLATE (RFC 4978) over real sockets: a client that speaks raw DEFLATE through
TLS (zlib, as any client does), fed to the server in tiny pieces; mbsync, which turns
COMPRESS on by itself when offered; bounded inflation (a decompression bomb costs the
framer's window, not its size); corrupt data ends the connection with a BYE."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import zlib

from conftest import client_tls_context, write_mbsyncrc
from test_imap_append import imapd_pid, status_kib
from test_imapd import PASSWORD, _read_until, send_mail, server, user  # noqa: F401 - fixtures

__all__ = ["server", "user"]


class DeflateClient:
    """A TLS connection that turns DEFLATE on after `COMPRESS DEFLATE`."""

    def __init__(self, server, user: str):
        address = server.listen("imap.listen_tls")
        self.sock = client_tls_context(server.config).wrap_socket(
            socket.create_connection((address.host, address.port), timeout=30), server_hostname=address.host)
        self.deflate = self.inflate = None
        self.received = b""
        self.read_until(b"\r\n")
        self.send(f'L1 LOGIN "{user}" "{PASSWORD}"\r\n'.encode())
        assert b"COMPRESS=DEFLATE" in self.read_until(b"L1 OK")

    def start(self) -> None:
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self.inflate = zlib.decompressobj(-15)

    def send(self, data: bytes, piece: int = 0) -> None:
        if self.deflate is not None:
            data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        if not piece:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), piece):  # in tiny pieces: a sync flush split anywhere
            self.sock.sendall(data[i:i + piece])
            time.sleep(0.0005)

    def read_until(self, marker: bytes, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.received and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, OSError):
                break
            if not chunk:
                break
            self.received += self.inflate.decompress(chunk) if self.inflate is not None else chunk
        data, self.received = self.received, b""
        return data

    def close(self) -> None:
        self.sock.close()


def test_commands_and_responses_go_compressed(server, user):
    client = DeflateClient(server, user)
    client.send(b"C1 COMPRESS DEFLATE\r\n")
    assert client.read_until(b"C1 ").endswith(b"C1 OK DEFLATE active\r\n")  # in the clear
    client.start()
    message = b"Subject: squeezed\r\n\r\n" + b"compressible line\r\n" * 5000
    client.send(b"A1 APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\nA2 SELECT INBOX\r\n"
                b"A3 FETCH 1 (BODY.PEEK[] RFC822.SIZE)\r\nA4 CAPABILITY\r\nA5 COMPRESS DEFLATE\r\n", piece=7)
    reply = client.read_until(b"A5 NO [COMPRESSIONACTIVE] DEFLATE is active already\r\n")
    assert re.search(rb"A1 OK \[APPENDUID \d+ 1\]", reply)
    assert b"* 1 FETCH (BODY[] {%d}\r\n" % len(message) + message in reply
    assert b"A4 OK" in reply and b"COMPRESS=DEFLATE" not in reply.split(b"A3 OK")[1]
    assert reply.endswith(b"A5 NO [COMPRESSIONACTIVE] DEFLATE is active already\r\n")
    client.send(b"A6 LOGOUT\r\n")
    assert b"A6 OK" in client.read_until(b"A6 OK")
    client.close()


def test_unknown_mechanism_and_before_login(server, user):
    client = DeflateClient(server, user)
    client.send(b"C1 COMPRESS LZ4\r\nC2 NOOP\r\n")
    reply = client.read_until(b"C2 OK")
    assert b"C1 BAD only COMPRESS DEFLATE is supported" in reply  # and nothing compressed
    client.close()
    address = server.listen("imap.listen_tls")
    with client_tls_context(server.config).wrap_socket(socket.create_connection((address.host, address.port)),
                                                       server_hostname=address.host) as sock:
        greeting = _read_until(sock, b"\r\n")
        assert b"COMPRESS" not in greeting
        sock.sendall(b"C1 COMPRESS DEFLATE\r\n")
        assert b"C1 BAD COMPRESS is not allowed before login" in _read_until(sock, b"C1 ")


def test_a_decompression_bomb_costs_the_window_not_its_size(server, user):
    """200 MB of one line, sent as 200 KB of DEFLATE: imapd never holds more than its
    read-ahead of it, and past 1 MiB (framer.ABSURD_LINE) it stops reading and inflating
    and closes; a long line under that is refused as too long and the session goes on."""
    client = DeflateClient(server, user)
    client.send(b"C1 COMPRESS DEFLATE\r\n")
    client.read_until(b"C1 OK")
    client.start()
    pid = imapd_pid(server)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    before = status_kib(pid, "VmRSS")
    compressor = client.deflate
    sent = compressor.compress(b"B0 NOOP " + b"a" * 900_000 + b"\r\nB1 NOOP ")
    chunk = b"a" * (1 << 20)
    for _ in range(200):
        sent += compressor.compress(chunk)
    sent += compressor.compress(b"\r\nB2 NOOP\r\n") + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(sent) < 1 << 20
    try:
        client.sock.sendall(sent)
    except ConnectionError:
        pass  # closed before all of it was read: what it answered is still there to read
    reply = client.read_until(b"* BYE line too long\r\n", timeout=60)
    peak = status_kib(pid, "VmHWM")
    assert b"B0 BAD [TOOBIG] line too long" in reply and b"B2" not in reply
    assert peak - before < 8_000, f"imapd grew from {before} KiB to a peak of {peak} KiB"
    client.close()


def test_corrupt_compressed_data_ends_the_connection(server, user):
    client = DeflateClient(server, user)
    client.send(b"C1 COMPRESS DEFLATE\r\n")
    client.read_until(b"C1 OK")
    client.inflate = zlib.decompressobj(-15)
    client.sock.sendall(b"\xff" * 64)  # not DEFLATE (a reserved block type)
    assert b"* BYE [PARSE] compressed data is corrupt" in client.read_until(b"corrupt\r\n")
    assert client.sock.recv(100) == b""
    client.close()


def test_mbsync_turns_compression_on_and_syncs(server, user, tmp_path):
    for i in range(3):
        send_mail(server, user, subject=f"compressed {i}", body="the same words again\n" * 200)
    local = tmp_path / "Mail"
    local.mkdir()
    rc = write_mbsyncrc(tmp_path / "mbsyncrc", server, user, PASSWORD, local)
    run = subprocess.run(["mbsync", "-D", "-c", str(rc), "sync"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r">>> \d+ COMPRESS DEFLATE", run.stdout), run.stdout[-3000:]
    pulled = list((local / "INBOX" / "new").iterdir()) + list((local / "INBOX" / "cur").iterdir())
    assert len(pulled) == 3
    assert all(b"the same words again\n" * 200 in p.read_bytes().replace(b"\r\n", b"\n") for p in pulled)
