"""IMAP benchmark: works against any IMAP server (Postroom, Dovecot, ...).

    bench/imap.py HOST:PORT USER PASS [--fill 100000] [--pid PID] [--idle 1000]

Prints, each on its own line:
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
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import COMMON, RARE, Corpus  # noqa: E402 - the same corpus as the store benchmark
from workers import spread  # noqa: E402

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


def logins_per_second(server: Server, count: int = 40, parallel: int = 4) -> float:
    return count / spread(lambda i: server.login().logout(), count, parallel)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("server", metavar="HOST:PORT")
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("--fill", type=int, default=100_000, help="messages the BENCH mailbox must hold")
    parser.add_argument("--fill-config", metavar="FILE", help="Postroom's config: fill through its store")
    parser.add_argument("--pid", type=int, help="the server's pid, to measure RSS per idle connection")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    parser.add_argument("--cafile", help="trust this certificate (default: no verification)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_const", dest="mode", const="starttls")
    mode.add_argument("--plain", action="store_const", dest="mode", const="plain")
    args = parser.parse_args()
    server = Server(args.server, args.user, args.password, mode=args.mode or "tls", cafile=args.cafile)

    print(f"logins: {logins_per_second(server):.1f}/s (LOGIN + LOGOUT, 4 connections at a time)", flush=True)
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
