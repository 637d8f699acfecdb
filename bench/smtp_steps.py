"""Where one message's time goes, step by step: `bench/smtp_steps.py HOST:PORT [-m 1000]`.

One connection per message, as Postfix's smtp-source sends them (connect and greeting, HELO,
MAIL, RCPT, DATA, the message and its reply, QUIT), and for each step the time from sending
it to reading its whole reply: p50 and mean over M messages of about 5,000 bytes, each with
its own Message-ID. Works against any SMTP server (Postfix, Postroom), on loopback; run it
against both in turn, and compare within one run only (this machine is noisy). Blocking
sockets and no parsing beyond the reply's last line, so that the client costs little.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

BODY = (b"From: bench@example.org\r\nTo: alice@example.test\r\nSubject: steps\r\n\r\n"
        + (b"x" * 76 + b"\r\n") * 62)
STEPS = ("connect+greeting", "helo", "mail", "rcpt", "data", "message", "quit", "whole")


def _reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def run(host: str, port: int, messages: int, recipient: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    for i in range(messages):
        began = time.perf_counter()
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _reply(sock)
            times["connect+greeting"].append(time.perf_counter() - began)
            message = b"Message-ID: <%d.%d.%d@steps.example.org>\r\n" % (os.getpid(), i, time.time_ns()) + BODY
            for step, line in (("helo", b"HELO bench.example.org\r\n"), ("mail", b"MAIL FROM:<bench@example.org>\r\n"),
                               ("rcpt", b"RCPT TO:<%s>\r\n" % recipient.encode()), ("data", b"DATA\r\n"),
                               ("message", message + b".\r\n"), ("quit", b"QUIT\r\n")):
                sent = time.perf_counter()
                sock.sendall(line)
                reply = _reply(sock)
                times[step].append(time.perf_counter() - sent)
                if step == "message" and not reply.startswith(b"250"):
                    raise SystemExit(f"message {i}: {reply!r}")
        times["whole"].append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", metavar="HOST:PORT")
    parser.add_argument("-m", "--messages", type=int, default=1000)
    parser.add_argument("--to", default="alice@example.test")
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    run(host, int(port), min(200, args.messages), args.to)  # warm-up: processes, caches
    times = run(host, int(port), args.messages, args.to)
    for step in STEPS:
        print(f"{step:17} p50 {statistics.median(times[step]) * 1000:7.3f} ms   "
              f"mean {statistics.mean(times[step]) * 1000:7.3f} ms")


if __name__ == "__main__":
    main()
