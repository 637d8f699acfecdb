"""POP3 benchmark: Postroom and Dovecot side by side, or RETR throughput of any one server.

    bench/pop3.py [--messages 3000] [--no-dovecot] [--window 1,16] [--rounds 3]
    bench/pop3.py HOST:PORT USER PASS [--fill 10000] [--smtp HOST:PORT | --fill-config FILE]
                  [--window 1,16] [--stls | --plain] [--cafile FILE]

Without HOST:PORT it starts a throwaway Postroom and, when Debian's dovecot-pop3d is
installed, a throwaway Dovecot (bench/servers.py: loopback, plaintext), delivers the same
--messages messages to each, and for each window prints both servers' MB/s on one line
(the best of --rounds sessions, taken in turn: the machine is shared).

With HOST:PORT it fills the maildrop up to --fill messages first if it holds fewer (the realistic corpus of
bench/store.py, 1 KiB to ~200 KiB): by SMTP to USER through --smtp (any server), or for
Postroom through its store with --fill-config (much faster). Then, for each window W of
--window, one session RETRs every message, W commands in flight at a time (1: one after
the other, as fetchmail does; more: PIPELINING, RFC 2449), and QUITs without deleting.
Prints, per window: messages, octets (the LIST sizes), seconds, MB/s and msgs/s.

The client reads with one buffer and finds each terminator after the size LIST announced,
so that it measures the server, not Python line splitting. TLS (implicit, port 995 style)
unless --stls or --plain; without --cafile the certificate is not verified.
"""

from __future__ import annotations

import argparse
import smtplib
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import Corpus  # noqa: E402 - the same corpus as the store benchmark
from workers import spread  # noqa: E402

import servers  # noqa: E402

TERMINATOR = b"\r\n.\r\n"


class Client:
    def __init__(self, address: str, *, mode: str, cafile: str | None, timeout: float = 120):
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        context = ssl.create_default_context(cafile=cafile)
        if cafile is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        self.buffer = bytearray()
        if mode == "tls":
            sock = context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.line()  # greeting
        if mode == "stls":
            self.command(b"STLS")
            self.sock = context.wrap_socket(sock, server_hostname=self.host)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text.split()[0].decode()}: {reply.decode(errors='replace')}")
        return reply

    def multiline(self, text: bytes) -> list[bytes]:
        self.command(text)
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def body(self, at_least: int) -> int:
        """Read one multi-line body whose unstuffed size is `at_least`; its wire length."""
        start = max(0, at_least - 2)
        while (end := self.buffer.find(TERMINATOR, start)) < 0:
            start = max(start, len(self.buffer) - len(TERMINATOR))
            self._fill()
        del self.buffer[: end + len(TERMINATOR)]
        return end + len(TERMINATOR)

    def login(self, user: str, password: str) -> None:
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())


def fill_smtp(smtp: str, user: str, count: int) -> None:
    host, _, port = smtp.rpartition(":")
    corpus, lock = Corpus(), threading.Lock()

    def send(i: int, client: smtplib.SMTP) -> None:
        with lock:  # one seeded generator: the same corpus every run
            message = corpus.message(i, False)
        client.sendmail("bench@example.org", [user], message)

    elapsed = spread(send, count, 8, setup=lambda: smtplib.SMTP(host.strip("[]"), int(port), timeout=120),
                     teardown=lambda client: client.quit())
    print(f"filled with {count} messages by SMTP in {elapsed:.0f} s", flush=True)


def fill_store(config_path: str, user: str, count: int) -> None:
    """Postroom only: delivered through the store in 16 threads."""
    import conf
    from storage import open_data_dir
    from storage.store import Store

    config = conf.load(Path(config_path))
    with Store(open_data_dir(config.server.data_dir, config.storage.shards)) as store:
        corpus, lock = Corpus(), threading.Lock()

        def deliver(i: int) -> None:
            with lock:
                message = corpus.message(i, False)
            store.deliver([user], message)

        elapsed = spread(deliver, count, 16)
        print(f"filled with {count} messages through the store in {elapsed:.0f} s", flush=True)


def retrieve_all(client: Client, sizes: list[int], window: int) -> int:
    """RETR 1..N with `window` commands in flight; the wire octets read."""
    sent = received = wire = 0
    total = len(sizes)
    while received < total:
        batch = []
        while sent < total and sent - received < window:
            sent += 1
            batch.append(b"RETR %d\r\n" % sent)
        if batch:
            client.sock.sendall(b"".join(batch))
        reply = client.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"RETR {received + 1}: {reply.decode(errors='replace')}")
        wire += client.body(sizes[received])
        received += 1
    return wire


def one_session(port: int, window: int) -> tuple[int, int, float]:
    """RETR every message of USER's maildrop on `port` (plaintext): messages, octets, seconds."""
    client = Client(f"127.0.0.1:{port}", mode="plain", cafile=None)
    client.login(servers.USER, servers.PASSWORD)
    sizes = [int(line.split()[1]) for line in client.multiline(b"LIST")]
    started = time.perf_counter()
    retrieve_all(client, sizes, window)
    elapsed = time.perf_counter() - started
    client.command(b"QUIT")
    client.sock.close()
    return len(sizes), sum(sizes), elapsed


def side_by_side(args) -> int:
    running = servers.start_both(args.messages, with_dovecot=not args.no_dovecot)
    try:
        for server in running:
            one_session(server.pop3_port, 16)  # warm: the page cache, Dovecot's index
        for window in (int(w) for w in args.window.split(",")):
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for server in running:
                    count, octets, elapsed = one_session(server.pop3_port, window)
                    best[server.name] = max(best.get(server.name, 0), octets / 1e6 / elapsed)
            line = f"RETR of {count} ({octets / 1e6:.1f} MB), window={window:<2}: " + ", ".join(
                f"{name} {rate:.1f} MB/s" for name, rate in best.items())
            if len(best) == 2:
                line += f"; postroom/dovecot {best['postroom'] / best['dovecot']:.2f}"
            print(line, flush=True)
    finally:
        for server in running:
            server.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", metavar="HOST:PORT", nargs="?", help="one server only (then USER PASS too)")
    parser.add_argument("user", nargs="?")
    parser.add_argument("password", nargs="?")
    parser.add_argument("--messages", type=int, default=3000, help="side by side: messages in each maildrop")
    parser.add_argument("--no-dovecot", action="store_true", help="side by side: Postroom alone")
    parser.add_argument("--rounds", type=int, default=3, help="side by side: sessions per window and server")
    parser.add_argument("--fill", type=int, default=10_000, help="messages the maildrop should hold (default 10000)")
    parser.add_argument("--smtp", metavar="HOST:PORT", help="fill by SMTP to USER through this server")
    parser.add_argument("--fill-config", metavar="FILE", help="Postroom's config: fill through its store")
    parser.add_argument("--window", default="1,16", help="RETR commands in flight, comma-separated runs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stls", action="store_const", const="stls", dest="mode")
    mode.add_argument("--plain", action="store_const", const="plain", dest="mode")
    parser.add_argument("--cafile", help="trust this certificate (default: no verification)")
    args = parser.parse_args()
    if args.address is None:
        return side_by_side(args)
    if args.password is None:
        parser.error("HOST:PORT needs USER and PASS")
    connection_mode = args.mode or "tls"

    def session() -> Client:
        client = Client(args.address, mode=connection_mode, cafile=args.cafile)
        client.login(args.user, args.password)
        return client

    client = session()
    have = int(client.command(b"STAT").split()[1])
    client.command(b"QUIT")
    if have < args.fill:
        if args.fill_config:
            fill_store(args.fill_config, args.user, args.fill - have)
        elif args.smtp:
            fill_smtp(args.smtp, args.user, args.fill - have)
        else:
            parser.error(f"the maildrop holds {have} messages: give --smtp or --fill-config to fill it")
    for window in (int(w) for w in args.window.split(",")):
        client = session()
        started = time.perf_counter()
        sizes = [int(line.split()[1]) for line in client.multiline(b"LIST")]
        listed = time.perf_counter() - started
        started = time.perf_counter()
        retrieve_all(client, sizes, window)
        elapsed = time.perf_counter() - started
        client.command(b"QUIT")
        octets = sum(sizes)
        print(f"{connection_mode} window={window}: RETR {len(sizes)} messages, {octets / 1e6:.1f} MB "
              f"in {elapsed:.2f} s = {octets / 1e6 / elapsed:.1f} MB/s, {len(sizes) / elapsed:.0f} msgs/s "
              f"(LIST took {listed * 1000:.0f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
