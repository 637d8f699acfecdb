"""Inbound SMTP benchmark: works against any SMTP server, so others can be measured too.

    .venv/bin/python bench/smtp_in.py HOST:PORT [-c 50] [-m 100] [-s 4096] [--to alice@example.test[,bob@...]]
                                     [--message FILE] [--sender ADDRESS]
    .venv/bin/python bench/smtp_in.py --compare-postfix [-m 5000] [--concurrencies 1,10,50] [--rounds 1]
                                     [--workers 2] [--policy] [--writer off|on|both]

C connections at once, each sending M messages of S bytes (EHLO once, then MAIL, RCPT,
DATA per message; no pipelining). Prints accepted messages per second and the time from
sending the end of DATA to reading its reply (p50, p99). A plain asyncio client with no
parsing beyond reply codes, so that it costs the server's two cores as little as possible.
Every message has its own Message-ID, so that each is stored (a server that deduplicates
would otherwise store the first and answer the rest from its memory of it).

--compare-postfix: no HOST:PORT; a throwaway Postfix and a throwaway Postroom side by side,
driven by Postfix's smtp-source, counting what reaches the Maildir (bench/compare_postfix.py
says how). There -m is the total number of messages of each run (default 5000).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass


async def reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


PLACEHOLDER = b"<bench@example.org>"


async def connection(host: str, port: int, messages: int, body: bytes, to: str | list[str], latencies: list[float],
                     failures: list[str], run_id: str, tag: int, sender: str = "bench@example.org") -> int:
    """`to`: one recipient per message, or a list: every message to all of them."""
    recipients = [to] if isinstance(to, str) else to
    reader, writer = await asyncio.open_connection(host, port)
    accepted = 0
    try:
        await reply(reader)
        writer.write(b"EHLO bench.example.org\r\n")
        await reply(reader)
        for n in range(messages):
            writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
            if await reply(reader) != 250:
                failures.append("MAIL")
                continue
            refused = False
            for recipient in recipients:
                writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
                refused = refused or await reply(reader) != 250
            if refused:
                failures.append("RCPT")
                writer.write(b"RSET\r\n")
                await reply(reader)
                continue
            writer.write(b"DATA\r\n")
            if await reply(reader) != 354:
                failures.append("DATA")
                continue
            # A Message-ID of its own: the store answers a message it already has (the same
            # Message-ID and bytes, storage/dedupe.py) without storing it again.
            writer.write(body.replace(PLACEHOLDER, f"<{run_id}.{tag}.{n}@bench.example.org>".encode())
                         + b".\r\n")
            start = time.perf_counter()
            code = await reply(reader)
            latencies.append(time.perf_counter() - start)
            if code == 250:
                accepted += 1
            else:
                failures.append(f"end of data {code}")
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()
    return accepted


def message(size: int) -> bytes:
    head = (b"From: Bench <bench@example.org>\r\nTo: <alice@example.test>\r\nSubject: benchmark\r\n"
            b"Message-ID: <bench@example.org>\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again, for the benchmark.\r\n"
    body = head + line * ((size - len(head)) // len(line) + 1)
    return body[:size - 2] + b"\r\n"


@dataclass
class Load:
    """What one load of `connection`s did."""
    concurrency: int
    messages: int  # per connection
    size: int
    accepted: int
    elapsed: float
    latencies: list[float]
    failures: list[str]  # refused replies
    errors: list[str]  # connections that failed

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed

    def line(self) -> str:
        latencies = sorted(self.latencies)
        p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan")
        problems = (f"; {len(self.failures)} refused" if self.failures else "") + \
            (f"; {len(self.errors)} connections failed" if self.errors else "")
        return "\n  ".join([f"C={self.concurrency} M={self.messages} S={self.size}: {self.accepted} accepted in "
                            f"{self.elapsed:.1f} s = {self.rate:.0f} msgs/s; end of DATA to reply p50 {p50:.1f} ms, "
                            f"p99 {p99:.1f} ms{problems}", *self.errors[:3]])


async def load(host: str, port: int | Sequence[int], concurrency: int, messages: int, size: int, to: str,
               body: bytes | None = None, sender: str = "bench@example.org", together: bool = False) -> Load:
    """`concurrency` connections at once, `messages` each. `port`: one, or several (a
    cluster's nodes), connection i going to port i modulo their number. `to`:
    comma-separated recipients, connection i writing to recipient i modulo their number, or,
    `together`, every message to all of them."""
    body = body if body is not None else message(size)
    ports = [port] if isinstance(port, int) else list(port)
    run_id = os.urandom(6).hex()  # and no two runs share one either
    latencies: list[float] = []
    failures: list[str] = []
    start = time.perf_counter()
    recipients = to.split(",")
    results = await asyncio.gather(*(connection(host, ports[i % len(ports)], messages, body,
                                                recipients if together else recipients[i % len(recipients)],
                                                latencies, failures, run_id, i, sender)
                                     for i in range(concurrency)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    return Load(concurrency, messages, size, sum(r for r in results if isinstance(r, int)), elapsed,
                latencies, failures, [repr(r) for r in results if isinstance(r, BaseException)])


async def run(host: str, port: int, concurrency: int, messages: int, size: int, to: str,
              body: bytes | None = None, sender: str = "bench@example.org", together: bool = False) -> float:
    """Prints the run's line; returns its accepted messages per second (see `load`)."""
    done = await load(host, port, concurrency, messages, size, to, body, sender, together)
    print(done.line())
    return done.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", metavar="HOST:PORT", nargs="?")
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("-m", "--messages", type=int, help="messages per connection (100); with "
                        "--compare-postfix, messages per run (5000)")
    parser.add_argument("-s", "--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--to", default="alice@example.test",
                        help="recipient, or several separated by commas (spread over the connections)")
    parser.add_argument("--message", type=argparse.FileType("rb"),
                        help="send this message (CRLF lines, dot-stuffed, its Message-ID written as "
                             f"{PLACEHOLDER.decode()}) instead of a made-up one of --size bytes")
    parser.add_argument("--sender", default="bench@example.org", help="the MAIL FROM address")
    parser.add_argument("--compare-postfix", action="store_true",
                        help="Postfix and Postroom side by side under smtp-source (bench/compare_postfix.py)")
    parser.add_argument("--concurrencies", default="1,10,50", help="with --compare-postfix: smtp-source -s values")
    parser.add_argument("--rounds", type=int, default=1, help="with --compare-postfix: runs of each server per C")
    parser.add_argument("--workers", type=int, default=2, help="with --compare-postfix: Postroom's [smtp] workers")
    parser.add_argument("--policy", action="store_true",
                        help="with --compare-postfix: Postroom's policy chain on (DNS on loopback, clamd)")
    parser.add_argument("--writer", default="off", choices=("off", "on", "both"),
                        help="with --compare-postfix: Postroom's [smtp] writer; both: one of each, in turn")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="with --compare-postfix: Postroom's [server] log_level (Postfix logs every message)")
    args = parser.parse_args()
    if args.compare_postfix:
        from compare_postfix import compare
        compare(args.messages or 5000, [int(c) for c in args.concurrencies.split(",")], args.rounds, args.workers,
                args.policy, args.log_level, args.writer)
        return
    if args.server is None:
        parser.error("HOST:PORT, or --compare-postfix")
    host, _, port = args.server.rpartition(":")
    body = args.message.read() if args.message else None
    asyncio.run(run(host.strip("[]"), int(port), args.concurrency, args.messages or 100,
                    len(body) if body else args.size,
                    args.to, body, args.sender))


if __name__ == "__main__":
    main()
