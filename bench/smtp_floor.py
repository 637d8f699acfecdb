"""The floor of a Python MX at one connection a message, beside Postfix (issue 17, item 2):

    .venv/bin/python bench/smtp_floor.py [-m 2000] [--rounds 3]

Four servers on loopback, each driven in turn by Postfix's `smtp-source -m M -l 5000 -s 1`
(a new connection per message, HELO, MAIL, RCPT, DATA, QUIT), the order rotating each round:
- `postfix`: Debian's Postfix as bench/compare_postfix.py runs it, delivering durably into a
  virtual Maildir (its queue file and the Maildir file fsynced);
- `postroom`: `postroom serve` as bench/compare_postfix.py runs it (`[smtp] workers = 2`,
  the chain off), delivering durably into its store;
- `streams`: the plumbing Postroom's MX runs on, alone: asyncio's StreamReader and writer on
  uvloop in one process (what mtad/aiosmtpd_adapter.py hands mtad/session.py), reading a
  line at a time, answering each command with a fixed reply and reading the message's lines
  to the final dot: no parsing, no checks, nothing kept;
- `protocol`: the least a Python server can do: an asyncio.Protocol on uvloop that answers
  each command line with a fixed reply and skips the message's bytes to the final dot.

A run's figure is messages over the time smtp-source took (each server answered 250 for
every message: smtp-source says so otherwise). The two bare servers keep nothing, so their
rates are a ceiling for a Python MX on these transports on this machine, not a comparison
of work done: Postroom's time a message beyond `streams`' is its own work (the session
core, the agent, the store). The ratio of each to Postfix's rate in the same round is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_postfix import SENDER, RECIPIENT, SIZE, PostfixMX, PostroomMX  # noqa: E402
from ports import free_port, wait_for_port  # noqa: E402
from postfix_peer import postfix_available  # noqa: E402

SOURCE_TIMEOUT = 600.0


async def _streams_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection over asyncio's streams, read a line at a time, as Postroom's MX reads
    (mtad/aiosmtpd_adapter.py hands mtad/session.py aiosmtpd's StreamReader and writer)."""
    writer.write(b"220 floor.bench.test ESMTP\r\n")
    try:
        while line := await reader.readuntil(b"\r\n"):
            verb = line[:4].upper()
            if verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                break
            writer.write(_Bare.REPLIES.get(verb, b"500 5.5.2 what\r\n"))
            if verb == b"DATA":
                while await reader.readuntil(b"\r\n") != b".\r\n":
                    pass
                writer.write(b"250 2.0.0 OK\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


class _Bare(asyncio.Protocol):
    """Fixed replies, the message's bytes skipped to the final dot (the dot-stuffing and the
    line limits a real server checks are not looked at)."""

    REPLIES = {b"HELO": b"250 floor.bench.test\r\n", b"EHLO": b"250 floor.bench.test\r\n",
               b"MAIL": b"250 2.1.0 OK\r\n", b"RCPT": b"250 2.1.5 OK\r\n", b"RSET": b"250 2.0.0 OK\r\n",
               b"NOOP": b"250 2.0.0 OK\r\n", b"DATA": b"354 go ahead\r\n"}

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 floor.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    self.buffer = self.buffer[-4:]
                    return
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                self.transport.write(b"250 2.0.0 OK\r\n")
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            verb = line[:4].upper()
            if verb == b"QUIT":
                self.transport.write(b"221 2.0.0 bye\r\n")
                self.transport.close()
                return
            self.transport.write(self.REPLIES.get(verb, b"500 5.5.2 what\r\n"))
            if verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # the final dot may follow at once


def _serve(kind: str, port: int) -> None:
    """Run a bare server of `kind` ("streams" or "protocol") on uvloop until terminated."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    if kind == "streams":
        starting = asyncio.start_server(_streams_session, "127.0.0.1", port)
    else:
        starting = loop.create_server(_Bare, "127.0.0.1", port)
    server = loop.run_until_complete(starting)
    try:
        loop.run_forever()
    finally:
        server.close()


class BareServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.process = multiprocessing.get_context("spawn").Process(target=_serve, args=(name, self.port), daemon=True)
        self.process.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(30)


def drive(server, messages: int) -> float:
    """One smtp-source run; msgs/s over its time (SystemExit if it failed)."""
    command = ["smtp-source", "-m", str(messages), "-l", str(SIZE), "-s", "1", "-f", SENDER, "-t", RECIPIENT,
               "-M", "bench.example.org", f"127.0.0.1:{server.port}"]
    started = time.perf_counter()
    source = subprocess.run(command, capture_output=True, text=True, timeout=SOURCE_TIMEOUT)
    elapsed = time.perf_counter() - started
    if source.returncode != 0 or source.stderr.strip():
        raise SystemExit(f"smtp-source against {server.name} failed ({source.returncode}): {source.stderr[:300]}")
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not postfix_available() or shutil.which("smtp-source") is None:
        raise SystemExit("Debian's postfix (postfix, smtp-source) is not installed: `make bench-peers` installs it")
    work = Path(tempfile.mkdtemp(prefix="smtp-floor-"))
    servers: list = []
    try:
        servers.append(PostfixMX(work))
        servers.append(PostroomMX(work / "postroom", 2, None))
        servers.append(BareServer("streams"))
        servers.append(BareServer("protocol"))
        for server in servers:
            drive(server, 200)  # warm-up: processes spawned, caches filled
        rates: dict[str, list[float]] = {server.name: [] for server in servers}
        for round_ in range(args.rounds):
            order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
            line = []
            for server in order:
                rates[server.name].append(drive(server, args.messages))
                line.append(f"{server.name} {rates[server.name][-1]:.0f}")
            print(f"round {round_ + 1}: " + ", ".join(line) + " msgs/s", flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nsmtp-source -m {args.messages} -l {SIZE} -s 1, median of {args.rounds} rounds in turn:")
    postfix = rates["postfix"]
    for name, values in rates.items():
        ratios = [value / peer for value, peer in zip(values, postfix)]
        keeps = "keeps nothing" if name in ("streams", "protocol") else "durable"
        print(f"  {name:9} {statistics.median(values):6.0f} msgs/s  {statistics.median(ratios):.2f}x Postfix's "
              f"(per round {', '.join(f'{r:.2f}' for r in ratios)})  [{keeps}]")


if __name__ == "__main__":
    main()
