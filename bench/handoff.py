"""What a writer process would buy at one connection a message (issue 17, item 2):

    .venv/bin/python bench/handoff.py [-m 3000] [--rounds 3] [--dir DIR]

mtad's loop hands each message to its shard's committer, a thread of the same process, and
awaits the flush; after the 250 the committer goes on (LMDB's commit, the file) while the loop
serves the next connection, the two taking turns at one GIL. The proposal is a writer process
per shard, fed over a Unix socket. Before any store change, this measures the two shapes on
the same synthetic message, in turn, in one run:

- `thread`: the loop (uvloop) puts the request on a SimpleQueue; a committer thread takes it,
  builds a record (Python work), writes it in place and fdatasyncs, answers with
  call_soon_threadsafe, then does the after-the-250 work (Python work, LMDB's commit as one
  pwritev of 20 pages and an fdatasync, a 5,000-byte file written and renamed);
- `process`: the same committer in a process of its own, the request and its answer over a
  Unix socket (length-prefixed bytes, the message's 5,000 bytes copied across).

Between two messages the loop does a session's exchanges with a client process over
loopback TCP (seven round trips: greeting, EHLO, MAIL, RCPT, DATA, the data, QUIT) with
Python work after each. The Python work is counted in iterations, calibrated to microseconds
at start, so that time spent waiting for the GIL shows as time (a loop on the clock would
hide it). Printed: messages per second and the hand-off's round trip (request to answer,
p50 / p99) for each, and their ratio in each round. The costs are the timestamps of
bench/RESULTS.md ("2026-12-04, main 8233651"): record 166 us, parse and texts 240 us,
the other loop work about 500 us, LMDB's commit and the file about 600 us each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import uvloop

SIZE = 5000
RECORD_US = 166        # building the record under the writer lock
AFTER_US = 300         # Python work after the 250 (LMDB's commit, settling the file)
LOOP_US = 740          # the loop's Python work a message, spread over the exchanges
EXCHANGES = 7
PAGES = 20             # LMDB pages a delivery's commit writes, flushed after the 250
_LEN = struct.Struct(">I")


class Costs(NamedTuple):
    """Microseconds of Python work a message."""
    record: int
    after: int
    loop: int


def _spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += (i * 7) % 13
    return total


def calibrate() -> float:
    """Iterations of _spin a microsecond, on this machine, uncontended."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        _spin(200_000)
        best = min(best, time.perf_counter() - started)
    return 200_000 / (best * 1e6)


class Committer:
    """The shard committer's work on one message, with real files and flushes."""

    def __init__(self, directory: Path, per_us: float, costs: Costs):
        self.directory = directory
        self.record_spin = int(costs.record * per_us)
        self.after_spin = int(costs.after * per_us)
        self.log = os.open(directory / "wal.log", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self.log, bytes(16 << 20), 0)  # grown ahead, as storage/wal.py does
        os.fsync(self.log)
        self.pages = os.open(directory / "index.mdb", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(self.pages, bytes(64 << 20), 0)
        os.fsync(self.pages)
        self.offset = 0
        self.number = 0
        self.page = bytes(4096)

    def record(self, data: bytes) -> int:
        _spin(self.record_spin)
        self.number += 1
        record = _LEN.pack(len(data)) + struct.pack(">I", zlib.crc32(data)) + data
        if self.offset + len(record) > (16 << 20):
            self.offset = 0
        os.pwrite(self.log, record, self.offset)
        self.offset += len(record)
        os.fdatasync(self.log)
        return self.number

    def after(self, number: int, data: bytes) -> None:
        _spin(self.after_spin)
        # LMDB's commit: its pages written and flushed in C, the GIL let go once (py-lmdb).
        self.pages_out(number)
        # The file, as Shard._place_committed makes it: open, write, close, rename.
        tmp = self.directory / f"tmp.{number}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, self.directory / f"m.{number % 1000}")

    def pages_out(self, number: int) -> None:
        """LMDB's commit of PAGES pages and its flush: py-lmdb lets the GIL go once around
        mdb_txn_commit, so here one pwritev and one fdatasync stand for it."""
        offset = ((number * 37) % 15000) * 4096
        os.pwritev(self.pages, [self.page] * PAGES, offset)
        os.fdatasync(self.pages)


def thread_committer(committer: Committer, requests: queue.SimpleQueue) -> None:
    while (item := requests.get()) is not None:
        data, loop, future = item
        number = committer.record(data)
        loop.call_soon_threadsafe(future.set_result, number)
        committer.after(number, data)


def writer_process(directory: str, per_us: float, costs: Costs, sock: socket.socket) -> None:
    committer = Committer(Path(directory), per_us, costs)
    buffered = b""
    while True:
        while len(buffered) < 4 or len(buffered) < 4 + _LEN.unpack_from(buffered)[0]:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            buffered += chunk
        size = _LEN.unpack_from(buffered)[0]
        data, buffered = buffered[4:4 + size], buffered[4 + size:]
        number = committer.record(data)
        sock.sendall(struct.pack(">Q", number))
        committer.after(number, data)


def client_process(port: int, count: int) -> None:
    """The other end of each exchange: answers every line at once."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count * EXCHANGES):
            if not sock.recv(1 << 16):
                return
            sock.sendall(b"250 ok\r\n")


class Answers(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiting: list[asyncio.Future] = []
        self.buffered = b""

    def data_received(self, data: bytes) -> None:
        self.buffered += data
        while len(self.buffered) >= 8:
            number = struct.unpack_from(">Q", self.buffered)[0]
            self.buffered = self.buffered[8:]
            self.waiting.pop(0).set_result(number)


async def drive(shape: str, count: int, per_us: float, costs: Costs, directory: Path) -> tuple[float, list[float]]:
    loop = asyncio.get_running_loop()
    server_sock = socket.socket()
    server_sock.bind(("127.0.0.1", 0))
    server_sock.listen(1)
    port = server_sock.getsockname()[1]
    ctx = get_context("fork")
    client = ctx.Process(target=client_process, args=(port, count), daemon=True)
    client.start()
    conn, _ = await loop.sock_accept(server_sock)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader, writer = await asyncio.open_connection(sock=conn)
    if shape == "thread":
        requests: queue.SimpleQueue = queue.SimpleQueue()
        worker = threading.Thread(target=thread_committer, args=(Committer(directory, per_us, costs), requests))
        worker.start()

        def hand(data: bytes) -> asyncio.Future:
            future = loop.create_future()
            requests.put((data, loop, future))
            return future
    else:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = ctx.Process(target=writer_process, args=(str(directory), per_us, costs, theirs), daemon=True)
        worker.start()
        theirs.close()
        transport, answers = await loop.create_unix_connection(Answers, sock=ours)

        def hand(data: bytes) -> asyncio.Future:
            future = loop.create_future()
            answers.waiting.append(future)
            transport.write(_LEN.pack(len(data)) + data)
            return future
    body = os.urandom(SIZE // 2).hex().encode()
    step = int(costs.loop / EXCHANGES * per_us)
    trips: list[float] = []
    started = time.perf_counter()
    for n in range(count):
        for _ in range(EXCHANGES):
            writer.write(b"MAIL FROM:<a@b>\r\n")
            await reader.read(1 << 16)
            _spin(step)
        sent = time.perf_counter()
        await hand(body[:-8] + n.to_bytes(8, "big"))
        trips.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    if shape == "thread":
        requests.put(None)
        worker.join()
    else:
        transport.close()
        worker.join(10)
    writer.close()
    client.join(10)
    server_sock.close()
    return count / elapsed, trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--record-us", type=int, default=RECORD_US, help=f"Python work before the flush ({RECORD_US})")
    parser.add_argument("--after-us", type=int, default=AFTER_US, help=f"Python work after the 250 ({AFTER_US})")
    parser.add_argument("--loop-us", type=int, default=LOOP_US, help=f"the loop's Python work a message ({LOOP_US})")
    parser.add_argument("--switch-us", type=int, default=0,
                        help="sys.setswitchinterval, in microseconds (default: Python's, 5,000)")
    args = parser.parse_args()
    costs = Costs(args.record_us, args.after_us, args.loop_us)
    if args.switch_us:
        sys.setswitchinterval(args.switch_us / 1e6)
    per_us = calibrate()
    print(f"calibrated: {per_us:.1f} iterations a microsecond; {args.messages} messages a run; Python work "
          f"a message: record {costs.record} us, after the 250 {costs.after} us, loop {costs.loop} us")
    print(f"{'round':>5} {'shape':>8} {'msgs/s':>8} {'trip p50 us':>12} {'trip p99 us':>12}")
    ratios = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for round_ in range(1, args.rounds + 1):
            order = ("thread", "process") if round_ % 2 else ("process", "thread")
            rates = {}
            for shape in order:
                directory = Path(tmp) / f"{shape}-{round_}"
                directory.mkdir()
                rate, trips = uvloop.run(drive(shape, args.messages, per_us, costs, directory))
                trips.sort()
                rates[shape] = rate
                print(f"{round_:>5} {shape:>8} {rate:>8.0f} {trips[len(trips) // 2] * 1e6:>12.0f} "
                      f"{trips[int(len(trips) * 0.99)] * 1e6:>12.0f}", flush=True)
            ratios.append(rates["process"] / rates["thread"])
    print(f"process / thread, msgs/s: {' / '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    sys.exit(main())
