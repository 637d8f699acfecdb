"""Outbound benchmark: submission -> queue -> delivery to a loopback sink, and the same
load through a Postfix relay when Debian's postfix is installed.

    .venv/bin/python bench/smtp_out.py [-c 10] [-m 50] [-s 4096] [--no-postfix] [--keep DIR]

Starts its own `postroom serve` (a config of its own in a temporary directory: a user,
submission on a free loopback port, `[outbound.routes]` for the sink's domain) and a sink:
a minimal SMTP receiver in a process of its own that answers 250 to everything and notes
when it wrote each 250. C clients (STARTTLS, AUTH PLAIN, then M messages of S bytes each on
one connection) submit; each message carries an X-Bench-Id. Prints:
- messages/s: messages the sink took / (its last 250 - the start line, once every client
  has connected, done TLS and logged in);
- the median and p99 of (the sink's 250 - the submission's 250): the queue's latency;
- the submission's own reply time (end of data to 250).
With postfix on the PATH (Debian's postfix), the same load goes through a private Postfix
instance (`postfix -c DIR start`, its own config, queue and data dirs, loopback high port,
STARTTLS with the same certificate, relaying for 127.0.0.0/8 without AUTH: Postfix's AUTH
needs a SASL server) to the same sink, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import queue
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_port, wait_for_port
from postfix_peer import start_postfix, stop_postfix

ROOT = Path(__file__).resolve().parent.parent
POSTROOM = str(Path(sys.executable).parent / "postroom")
USER, PASSWORD = "bench@bench.test", "bench-password-1"
SINK_DOMAIN = "sink.bench"
READY_TIMEOUT = 60.0
DRAIN_TIMEOUT = 300.0



# -- the sink ----------------------------------------------------------------------------


def sink_process(port: int, ready, results) -> None:
    """An SMTP receiver that takes everything; puts (bench id, time of its 250) on `results`."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go on\r\n")
                    bench_id = ""
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        if data.startswith(b"X-Bench-Id: "):
                            bench_id = data[12:].strip().decode()
                    writer.write(b"250 2.0.0 taken\r\n")
                    await writer.drain()
                    results.put((bench_id, time.time()))
                    continue
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(session, "127.0.0.1", port, backlog=512)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        async with server:
            await stop.wait()

    asyncio.run(serve())


# -- the clients -------------------------------------------------------------------------


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    text = b""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        text += line
        if line[3:4] != b"-":
            return int(line[:3]), text


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, text = await reply(reader)
    if got != code:
        raise RuntimeError(f"{what}: {text!r}")


async def client(port: int, messages: int, body: bytes, run_id: str, tag: int, auth: bool,
                 submitted: dict[str, float], reply_times: list[float], gate: Gate) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await expect(reader, 220, "greeting")
        writer.write(b"EHLO client.bench.test\r\n")
        await expect(reader, 250, "EHLO")
        writer.write(b"STARTTLS\r\n")
        await expect(reader, 220, "STARTTLS")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own self-signed server
        await writer.start_tls(context)
        writer.write(b"EHLO client.bench.test\r\n")
        await expect(reader, 250, "EHLO after TLS")
        if auth:
            token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
            writer.write(b"AUTH PLAIN " + token + b"\r\n")
            await expect(reader, 235, "AUTH")
        await gate.ready()
        for n in range(messages):
            bench_id = f"{run_id}.{tag}.{n}"
            writer.write(f"MAIL FROM:<{USER}>\r\n".encode())
            await expect(reader, 250, "MAIL")
            writer.write(f"RCPT TO:<r{tag}@{SINK_DOMAIN}>\r\n".encode())
            await expect(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await expect(reader, 354, "DATA")
            writer.write(body.replace(b"@@ID@@", bench_id.encode()) + b".\r\n")
            start = time.perf_counter()
            await expect(reader, 250, "end of data")
            submitted[bench_id] = time.time()
            reply_times.append(time.perf_counter() - start)
        writer.write(b"QUIT\r\n")
        await reply(reader)
    finally:
        writer.close()


class Gate:
    """The clients' start line: the clock starts once every client has connected, done TLS
    and logged in (argon2id costs ~100 ms a login: set-up, not the throughput measured)."""

    def __init__(self, clients: int):
        self._waiting = clients
        self._open = asyncio.Event()
        self.opened = 0.0

    async def ready(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self.opened = time.time()
            self._open.set()
        await self._open.wait()

    def give_up(self) -> None:
        """A client failed before the line: the others go anyway."""
        self.ready_nowait()

    def ready_nowait(self) -> None:
        self._waiting -= 1
        if self._waiting == 0:
            self.opened = time.time()
            self._open.set()


def message(size: int) -> bytes:
    head = (f"From: Bench <{USER}>\r\nTo: <someone@{SINK_DOMAIN}>\r\nSubject: outbound benchmark\r\n"
            "Message-ID: <@@ID@@@bench.test>\r\nDate: Mon, 30 Nov 2026 12:00:00 +0000\r\n"
            "X-Bench-Id: @@ID@@\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again, for the benchmark.\r\n"
    body = head + line * ((size - len(head)) // len(line) + 1)
    return body[:size - 2] + b"\r\n"


def load(label: str, port: int, args, auth: bool, sink_seen) -> str:
    """Run C clients of M messages against `port`; wait until the sink has them all."""
    run_id = os.urandom(4).hex()
    submitted: dict[str, float] = {}
    reply_times: list[float] = []
    body = message(args.size)

    async def one(i: int, gate: Gate) -> None:
        try:
            await client(port, args.messages, body, run_id, i, auth, submitted, reply_times, gate)
        except BaseException:
            if not gate._open.is_set():
                gate.give_up()
            raise

    async def everyone() -> tuple[list, Gate]:
        gate = Gate(args.concurrency)
        results = await asyncio.gather(*(one(i, gate) for i in range(args.concurrency)), return_exceptions=True)
        return results, gate

    results, gate = asyncio.run(everyone())
    errors = [r for r in results if isinstance(r, BaseException)]
    start = gate.opened
    deadline = time.monotonic() + DRAIN_TIMEOUT
    arrived: dict[str, float] = {}
    while time.monotonic() < deadline:
        arrived = {bench_id: t for bench_id, t in sink_seen() if bench_id.startswith(run_id)}
        if len(arrived) >= len(submitted):
            break
        time.sleep(0.2)
    latencies = sorted(arrived[i] - submitted[i] for i in submitted if i in arrived)
    reply_times.sort()
    total = len(arrived)
    elapsed = (max(arrived.values()) - start) if arrived else float("nan")
    line = (f"{label}: {total}/{len(submitted)} at the sink in {elapsed:.1f} s = {total / elapsed:.0f} msgs/s; "
            f"submission 250 -> sink 250 p50 {_ms(latencies, 0.5)} ms, p99 {_ms(latencies, 0.99)} ms; "
            f"submission reply p50 {_ms(reply_times, 0.5)} ms")
    if errors:
        line += f"; {len(errors)} clients failed, first: {errors[0]!r}"
    return line


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "nan"
    if q == 0.5:
        return f"{statistics.median(values) * 1000:.1f}"
    return f"{values[min(len(values) - 1, int(len(values) * q))] * 1000:.1f}"


# -- the servers under test --------------------------------------------------------------


def start_postroom(work: Path, sink_port: int, log_level: str, workers: int,
                   per_destination: int) -> tuple[subprocess.Popen, int]:
    ports = {name: free_port() for name in ("smtp", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")}
    config = work / "postroom.toml"
    config.write_text(f"""[server]
hostname = "mail.bench.test"
data_dir = "{work / 'var'}"
log_level = "{log_level}"
[tls]
cert = "{work / 'var/tls/cert.pem'}"
key = "{work / 'var/tls/key.pem'}"
self_signed = true
[smtp]
listen = ["127.0.0.1:{ports['smtp']}"]
workers = {workers}
[submission]
listen = ["127.0.0.1:{ports['submission']}"]
listen_tls = ["127.0.0.1:{ports['submissions']}"]
max_connections_per_ip = 200
[imap]
listen = ["127.0.0.1:{ports['imap']}"]
listen_tls = ["127.0.0.1:{ports['imaps']}"]
[pop3]
listen = ["127.0.0.1:{ports['pop3']}"]
listen_tls = ["127.0.0.1:{ports['pop3s']}"]
[dkim]
sign = false
[rates]
# One user sends the whole load: no per-user limit.
user_messages_per_hour = 0
user_messages_per_day = 0
user_recipients_per_hour = 0
user_recipients_per_day = 0
[queue]
per_destination = {per_destination}
[outbound.routes]
"{SINK_DOMAIN}" = "127.0.0.1:{sink_port}"
""")
    cli = [POSTROOM, "--config", str(config)]
    subprocess.run(cli + ["domain", "add", "bench.test"], check=True, capture_output=True)
    subprocess.run(cli + ["user", "add", USER, "--password-stdin"], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)
    log = open(work / "serve.log", "wb")
    process = subprocess.Popen(cli + ["serve"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for_port(ports["submission"], process, READY_TIMEOUT)
    return process, ports["submission"]


def start_relay(work: Path, sink_port: int, cert: Path, key: Path) -> tuple[Path, int]:
    """A private Postfix instance relaying everything to the sink."""
    return start_postfix(work, f"""myhostname = postfix.bench.test
mydestination =
relayhost = [127.0.0.1]:{sink_port}
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtp_tls_security_level = none
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=10)
    parser.add_argument("-m", "--messages", type=int, default=50, help="messages per connection")
    parser.add_argument("-s", "--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("-w", "--workers", type=int, default=2,
                        help="postroom's [smtp] workers (processes taking SMTP and submission; one runs deliveries)")
    parser.add_argument("--per-destination", type=int, default=20,
                        help="postroom's [queue] per_destination (20: Postfix's default_destination_concurrency_limit)")
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out even when installed")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                        help="postroom's (info: a line per delivery, in DIR/serve.log with --keep)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs, queues)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="smtp-out-"))
    work.mkdir(parents=True, exist_ok=True)

    sink_port = free_port()
    ready, results = multiprocessing.Event(), multiprocessing.Queue()
    sink = multiprocessing.Process(target=sink_process, args=(sink_port, ready, results), daemon=True)
    sink.start()
    ready.wait(10)
    sink_log: list[tuple[str, float]] = []

    def sink_seen() -> list[tuple[str, float]]:
        while True:
            try:
                sink_log.append(results.get_nowait())
            except queue.Empty:
                return sink_log

    postroom, postfix_etc = None, None
    lines = []
    try:
        postroom, submission_port = start_postroom(work, sink_port, args.log_level, args.workers,
                                                   args.per_destination)
        lines.append(load("postroom", submission_port, args, True, sink_seen))
        if not args.no_postfix and shutil.which("postfix"):
            cert, key = work / "var/tls/cert.pem", work / "var/tls/key.pem"
            postfix_etc, postfix_port = start_relay(work, sink_port, cert, key)
            lines.append(load("postfix", postfix_port, args, False, sink_seen))
        elif not args.no_postfix:
            lines.append("postfix: not installed (Debian's postfix): no comparison")
    finally:
        if postroom is not None:
            postroom.send_signal(signal.SIGTERM)
            postroom.wait(60)
        if postfix_etc is not None:
            stop_postfix(postfix_etc)
        if sink.is_alive():
            sink.terminate()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"C={args.concurrency} M={args.messages} S={args.size}")
    for line in lines:
        print("  " + line)


if __name__ == "__main__":
    main()
