"""IMAP benchmark: Postroom and Dovecot side by side, or any one IMAP server.

    bench/imap.py [--messages 3000] [--no-dovecot] [--seconds 5]
    bench/imap.py HOST:PORT USER PASS [--fill 100000] [--pid PID] [--idle 1000]

Without HOST:PORT it starts a throwaway Postroom and, when Debian's dovecot-imapd is
installed, a throwaway Dovecot (bench/servers.py: loopback, plaintext), delivers the same
--messages messages to the INBOX of each, and prints each figure for both on one line:
SELECT time; FETCH of 1,000 ENVELOPEs; `UID FETCH 1:* (UID FLAGS)`; SEARCH TEXT of a rare
and of a common word; and commands/s from 10 clients at once, each logged in once and
then sending, for --seconds, a mix of what a mail client sends on an open mailbox (NOOP,
FETCH FLAGS of a few, FETCH ENVELOPE of one, FETCH of a few header fields, STORE of a flag
and its removal). The single-client figures are the best of --rounds runs after one
warm-up, the two servers taken in turn each round; the concurrent figure the best of
--concurrent-rounds runs, in turn: on a machine shared with other work, the best run is
the one least disturbed, for both servers alike.
A small client that reads up to the tagged reply measures the servers, not imaplib.

With HOST:PORT it measures that server only, as before:
- logins/s (LOGIN + LOGOUT on fresh TLS connections, 4 at a time);
- on the mailbox BENCH (filled first with --fill N realistic messages by APPEND over 8
  connections, unless it already holds them; for Postroom, --fill-config FILE fills it
  through the store directly, much faster, and builds the full-text index): SELECT time, `UID FETCH 1:* (UID FLAGS)`
  time, FETCH of 1,000 ENVELOPEs, SEARCH TEXT of a rare and of a common word;
- with --pid (the server's process id, on this machine): the server's RSS growth per
  connection with --idle N connections logged in, BENCH selected and in IDLE.

Times are the median of 5 runs. TLS (implicit, port 993 style) unless --starttls or --plain.
The server must allow as many connections from one address as --idle asks for.
"""

from __future__ import annotations

import argparse
import imaplib
import random
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import COMMON, RARE, Corpus  # noqa: E402 - the same corpus as the store benchmark
from workers import spread  # noqa: E402

import servers  # noqa: E402

MAILBOX = "BENCH"


class Server:
    def __init__(self, address: str, user: str, password: str, *, mode: str, cafile: str | None):
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.user, self.password, self.mode = user, password, mode
        self.context = ssl.create_default_context(cafile=cafile)
        if cafile is None:
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE

    def connect(self) -> imaplib.IMAP4:
        if self.mode == "tls":
            client = imaplib.IMAP4_SSL(self.host, self.port, ssl_context=self.context, timeout=120)
        else:
            client = imaplib.IMAP4(self.host, self.port, timeout=120)
            if self.mode == "starttls":
                client.starttls(ssl_context=self.context)
        return client

    def login(self) -> imaplib.IMAP4:
        client = self.connect()
        client.login(self.user, self.password)
        return client


def median_time(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def logins_per_second(targets: list[Server], count: int = 40, parallel: int = 4) -> float:
    """LOGIN + LOGOUT `count` times, `parallel` at a time, login i at targets[i modulo their
    number]."""
    return count / spread(lambda i: targets[i % len(targets)].login().logout(), count, parallel)


def fill(server: Server, count: int) -> None:
    client = server.login()
    client.create(MAILBOX)
    typ, data = client.select(MAILBOX)
    have = int(data[0])
    client.logout()
    if have >= count:
        return
    corpus, lock = Corpus(), threading.Lock()

    def append(i: int, connection: imaplib.IMAP4) -> None:
        with lock:  # one seeded generator: the same corpus every run
            message = corpus.message(have + i, (have + i) % (count // 10 or 1) == 7)
        typ, data = connection.append(MAILBOX, "(\\Seen)" if (have + i) % 10 else None, None, message)
        if typ != "OK":
            raise SystemExit(f"APPEND failed: {data}")

    elapsed = spread(append, count - have, 8, setup=server.login, teardown=lambda c: c.logout())
    print(f"filled {MAILBOX} with {count - have} messages by APPEND in {elapsed:.0f} s "
          f"({(count - have) / elapsed:.0f} msgs/s)", flush=True)


def fill_store(config_path: str, user: str, count: int) -> None:
    """Postroom only: the same corpus, delivered through the store in 16 threads."""
    import conf
    from storage import open_data_dir
    from storage.store import Store

    config = conf.load(Path(config_path))
    with Store(open_data_dir(config.server.data_dir, config.storage.shards)) as store:
        if MAILBOX not in {m.name for m in store.mailboxes(user)}:
            store.create_mailbox(user, MAILBOX)
        have = store.mailbox(user, MAILBOX).exists
        corpus, lock = Corpus(), threading.Lock()

        def deliver(i: int) -> None:
            with lock:
                message = corpus.message(have + i, (have + i) % (count // 10 or 1) == 7)
            store.deliver([(user, MAILBOX)], message, flags=["\\Seen"] if (have + i) % 10 else [])

        if count > have:
            elapsed = spread(deliver, count - have, 16)
            print(f"filled {MAILBOX} with {count - have} messages through the store in {elapsed:.0f} s", flush=True)
        store.build_index(user)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def idle_memory(server: Server, pid: int, count: int) -> float:
    def idle_session() -> imaplib.IMAP4:
        client = server.login()
        client.select(MAILBOX, readonly=True)
        tag = client._new_tag()
        client.send(tag + b" IDLE\r\n")
        if not client.readline().startswith(b"+"):
            raise SystemExit("IDLE refused")
        return client

    baseline = rss_kib(pid)
    sessions: list[imaplib.IMAP4] = []
    lock = threading.Lock()

    def open_some(n: int) -> None:
        for _ in range(n):
            session = idle_session()
            with lock:
                sessions.append(session)

    threads = [threading.Thread(target=open_some, args=(count // 8 + (i < count % 8),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2)
    grown = rss_kib(pid) - baseline
    for session in sessions:
        try:
            session.shutdown()
        except OSError:
            pass
    return grown / max(1, len(sessions))


class Raw:
    """A minimal IMAP client: sends a command, reads up to its tagged reply (by the tag at
    the start of a line), checks it is OK. Cheap enough per response line that the server,
    not the client, sets the pace."""

    def __init__(self, port: int, user: str, password: str, timeout: float = 120):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.n = 0
        while b"\r\n" not in self.buffer:
            self._fill()
        self.buffer.clear()
        self.command(f'LOGIN "{user}" "{password}"')

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data

    def command(self, text: str) -> bytes:
        self.n += 1
        tag = b"b%d " % self.n
        self.sock.sendall(tag + text.encode() + b"\r\n")
        marker, start = b"\r\n" + tag, 0
        while True:
            if self.buffer.startswith(tag):
                at = -2
            else:
                at = self.buffer.find(marker, start)
            if at != -1 or self.buffer.startswith(tag):
                end = self.buffer.find(b"\r\n", at + 2)
                if end >= 0:
                    break
            start = max(0, len(self.buffer) - len(marker))
            self._fill()
        status = self.buffer[at + 2 + len(tag):end]
        reply = bytes(self.buffer[:end + 2])
        del self.buffer[:end + 2]
        if not status.startswith(b"OK"):
            raise RuntimeError(f"{text}: {status.decode(errors='replace')}")
        return reply

    def close(self) -> None:
        try:
            self.command("LOGOUT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


def single_client(ports: dict[str, int], rounds: int) -> dict[str, dict[str, float]]:
    """The single-client figures of each server, in ms: the best of `rounds` after a warm-up,
    the servers taken in turn each round, so that both see the same moments of a shared
    machine."""
    clients = {name: Raw(port, servers.USER, servers.PASSWORD) for name, port in ports.items()}
    figures: dict[str, dict[str, float]] = {name: {} for name in ports}
    exists = 0
    for client in clients.values():
        reply = client.command("SELECT INBOX")
        exists = int(next(line.split()[1] for line in reply.split(b"\r\n") if line.endswith(b" EXISTS")))

    def timed(label: str, text: str, check=None) -> None:
        for client in clients.values():
            reply = client.command(text)
            if check:
                check(reply)
        times: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(rounds):
            for name, client in clients.items():
                started = time.perf_counter()
                client.command(text)
                times[name].append(time.perf_counter() - started)
        for name in clients:
            figures[name][label] = min(times[name]) * 1000

    def lines_at_least(n: int):
        def check(reply: bytes) -> None:
            if reply.count(b"\r\n* ") + reply.startswith(b"* ") < n:
                raise SystemExit(f"fewer than {n} responses: {reply[:200]!r}")
        return check

    timed(f"SELECT INBOX ({exists} messages), ms", "SELECT INBOX")
    high = min(exists, max(1, exists // 2) + 999)
    low = max(1, high - 999)
    timed("FETCH 1,000 ENVELOPEs, ms", f"FETCH {low}:{high} (ENVELOPE)", lines_at_least(high - low + 1))
    timed("UID FETCH 1:* (UID FLAGS), ms", "UID FETCH 1:* (UID FLAGS)", lines_at_least(exists))
    for word in (RARE, COMMON):
        timed(f"SEARCH TEXT {word}, ms", f"SEARCH TEXT {word}")
    for client in clients.values():
        client.close()
    return figures


def open_sessions(logins: list[tuple[int, str, str]]) -> list[tuple[Raw, int]]:
    """A session per (port, user, password), logged in (4 at a time) and its INBOX
    selected: (session, messages in the INBOX)."""
    sessions: list[tuple[Raw, int] | None] = [None] * len(logins)

    def open_one(i: int) -> None:
        session = Raw(*logins[i])
        reply = session.command("SELECT INBOX")
        sessions[i] = session, int(next(line.split()[1] for line in reply.split(b"\r\n")
                                        if line.endswith(b" EXISTS")))

    try:
        spread(open_one, len(logins), 4)
    except BaseException:
        for opened in sessions:
            if opened is not None:
                opened[0].close()
        raise
    return sessions


def client_mix(sessions: list[tuple[Raw, int]], seconds: float) -> tuple[int, float]:
    """Every session at once sends a mail client's mix of commands for `seconds`: (commands
    answered, seconds taken)."""
    clients = len(sessions)
    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        rng, (session, exists) = random.Random(i), sessions[i]
        barrier.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                n = rng.randint(1, exists - 4)
                for text in ("NOOP", f"FETCH {n}:{n + 4} (FLAGS)", f"FETCH {n} (ENVELOPE)",
                             f"FETCH {n} (BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
                             f"STORE {n} +FLAGS (\\Flagged)", f"STORE {n} -FLAGS (\\Flagged)"):
                    session.command(text)
                    counts[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts), elapsed


def concurrent_clients(port: int, clients: int, seconds: float) -> float:
    """Commands/s of `clients` sessions at once, each logged in and selected first (not
    counted), then a mail client's mix of commands for `seconds`."""
    sessions = open_sessions([(port, servers.USER, servers.PASSWORD)] * clients)
    try:
        commands, elapsed = client_mix(sessions, seconds)
    finally:
        for session, _ in sessions:
            session.close()
    return commands / elapsed


def side_by_side(args) -> None:
    running = servers.start_both(args.messages, with_dovecot=not args.no_dovecot, metrics=args.metrics)
    try:
        results = single_client({server.name: server.imap_port for server in running}, args.rounds)
        label = f"{args.clients} concurrent clients, commands/s"
        for _ in range(args.concurrent_rounds):
            for server in running:
                rate = concurrent_clients(server.imap_port, args.clients, args.seconds)
                results[server.name][label] = max(results[server.name].get(label, 0), rate)
        names = [server.name for server in running]
        width = max(len(label) for label in results[names[0]])
        print(f"{'':{width}}  " + "  ".join(f"{name:>9}" for name in names) +
              ("  postroom/dovecot (time: inverted)" if len(names) == 2 else ""))
        for label in results[names[0]]:
            values = [results[name][label] for name in names]
            line = f"{label:{width}}  " + "  ".join(f"{v:9.1f}" for v in values)
            if len(names) == 2:
                ratio = values[0] / values[1] if label.endswith("/s") else values[1] / values[0]
                line += f"  {ratio:.2f}"
            print(line, flush=True)
    finally:
        for server in running:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", metavar="HOST:PORT", nargs="?", help="one server only (then USER PASS too)")
    parser.add_argument("user", nargs="?")
    parser.add_argument("password", nargs="?")
    parser.add_argument("--messages", type=int, default=3000, help="side by side: messages in each INBOX")
    parser.add_argument("--no-dovecot", action="store_true", help="side by side: Postroom alone")
    parser.add_argument("--metrics", action="store_true", help="side by side: Postroom with [metrics] listen on")
    parser.add_argument("--clients", type=int, default=10, help="side by side: concurrent clients")
    parser.add_argument("--seconds", type=float, default=5, help="side by side: how long the clients run")
    parser.add_argument("--rounds", type=int, default=15, help="side by side: runs of each command (best taken)")
    parser.add_argument("--concurrent-rounds", type=int, default=2,
                        help="side by side: runs of the concurrent load per server, in turn (best taken)")
    parser.add_argument("--fill", type=int, default=100_000, help="messages the BENCH mailbox must hold")
    parser.add_argument("--fill-config", metavar="FILE", help="Postroom's config: fill through its store")
    parser.add_argument("--pid", type=int, help="the server's pid, to measure RSS per idle connection")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    parser.add_argument("--cafile", help="trust this certificate (default: no verification)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_const", dest="mode", const="starttls")
    mode.add_argument("--plain", action="store_const", dest="mode", const="plain")
    args = parser.parse_args()
    if args.server is None:
        return side_by_side(args)
    if args.password is None:
        parser.error("HOST:PORT needs USER and PASS")
    server = Server(args.server, args.user, args.password, mode=args.mode or "tls", cafile=args.cafile)

    print(f"logins: {logins_per_second([server]):.1f}/s (LOGIN + LOGOUT, 4 connections at a time)", flush=True)
    if args.fill_config:
        fill_store(args.fill_config, args.user, args.fill)
    else:
        fill(server, args.fill)
    client = server.login()
    exists = 0

    def select() -> None:
        nonlocal exists
        typ, data = client.select(MAILBOX)
        exists = int(data[0])

    print(f"SELECT {MAILBOX}: {median_time(select) * 1000:.1f} ms ({exists} messages)", flush=True)

    def fetch_flags() -> None:
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
        if typ != "OK" or len(data) < exists:
            raise SystemExit(f"UID FETCH returned {len(data)} of {exists}")

    print(f"UID FETCH 1:* (UID FLAGS): {median_time(fetch_flags) * 1000:.0f} ms", flush=True)
    high = min(exists, max(1, exists // 2) + 999)
    low = max(1, high - 999)

    def fetch_envelopes() -> None:
        typ, data = client.fetch(f"{low}:{high}", "(ENVELOPE)")
        if typ != "OK":
            raise SystemExit(f"FETCH ENVELOPE failed: {data}")

    print(f"FETCH {low}:{high} (ENVELOPE): {median_time(fetch_envelopes) * 1000:.0f} ms", flush=True)
    for word in (RARE, COMMON):
        found = 0

        def search(word: str = word) -> None:
            nonlocal found
            typ, data = client.search(None, "TEXT", word)
            found = len(data[0].split())

        print(f"SEARCH TEXT {word}: {median_time(search) * 1000:.0f} ms ({found} found)", flush=True)
    client.logout()
    if args.pid:
        per = idle_memory(server, args.pid, args.idle)
        print(f"RSS per idle connection (IDLE, {args.idle} connections): {per:.1f} KiB", flush=True)


if __name__ == "__main__":
    main()
