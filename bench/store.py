"""Benchmark of the message store; prints its figures (record them in bench/RESULTS.md).

    .venv/bin/python bench/store.py [--dir DIR] [--messages 100000] [--keep]

1. raw disk: write 4 KiB + fsync + rename per file (files/s): the ceiling for one writer;
2. single-threaded delivery of 4 KiB messages (msgs/s; target >= 50% of raw);
3. 32 threads delivering 4 KiB messages to one shard (msgs/s; target >= 5x raw);
4. a mailbox of N realistic messages (mixed sizes, a third multipart, Zipf-distributed
   words, one rare word in 10 messages): open + list all UIDs and flags (target < 100 ms),
   SEARCH BODY rare word and common word (< 200 ms each), SEARCH UNSEEN (< 50 ms), and the
   index's size on disk as a ratio of the message files' size.

Times of the read-side operations are the median of 5 runs on a warm cache.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import open_data_dir  # noqa: E402
from storage.store import Store  # noqa: E402

RARE = "xylophonist"
COMMON = "report"


def raw_disk(directory: Path, count: int = 2000) -> float:
    (directory / "tmp").mkdir(parents=True)
    (directory / "cur").mkdir()
    data = os.urandom(4096)
    start = time.perf_counter()
    for i in range(count):
        tmp = directory / "tmp" / str(i)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, directory / "cur" / str(i))
    return count / (time.perf_counter() - start)


def four_kib_messages(count: int) -> list[bytes]:
    """Plain-text mail of exactly 4 KiB, its words drawn like real text (see Corpus)."""
    corpus = Corpus(seed=11)
    out = []
    for i in range(count):
        head = (f"From: Sender {i} <sender{i}@example.org>\r\nTo: alice@example.test\r\nSubject: message {i}\r\n"
                f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{i}.bench@example.org>\r\n\r\n").encode()
        out.append((head + corpus.text(900).encode())[:4094] + b"\r\n")
    return out


def single(store: Store, count: int) -> float:
    messages = four_kib_messages(count)
    store.ensure_account("single@example.test")
    start = time.perf_counter()
    for raw in messages:
        store.deliver(["single@example.test"], raw)
    return count / (time.perf_counter() - start)


def concurrent(store: Store, threads: int, per_thread: int) -> tuple[float, int]:
    # 32 accounts of one shard, as a shard's share of a busy MX sees them.
    accounts, n = [], 0
    while len(accounts) < threads:
        candidate = f"user{n}@example.test"
        if store.shard_number(candidate) == 0:
            accounts.append(candidate)
        n += 1
    for account in accounts:
        store.ensure_account(account)
    shard = store.shard(accounts[0])
    commits_before = shard.last_commit()
    barrier = threading.Barrier(threads + 1)
    messages = four_kib_messages(per_thread)

    def work(account: str) -> None:
        barrier.wait()
        for raw in messages:
            store.deliver([account], raw)

    workers = [threading.Thread(target=work, args=(a,)) for a in accounts]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return threads * per_thread / elapsed, shard.last_commit() - commits_before


class Corpus:
    """Realistic-looking mail: Zipf-distributed vocabulary, sizes from 1 KiB to ~200 KiB."""

    def __init__(self, seed: int = 7):
        self.rng = random.Random(seed)
        syllables = ["ka", "lo", "mi", "ne", "ro", "ta", "vi", "su", "pe", "da", "ko", "ri", "an", "el", "or"]
        self.words = [COMMON, "the", "meeting", "project", "please", "thanks", "invoice", "update"]
        while len(self.words) < 30_000:
            self.words.append("".join(self.rng.choice(syllables) for _ in range(self.rng.randint(2, 5))))
        self.weights = [1 / (rank + 1) for rank in range(len(self.words))]

    def text(self, n_words: int) -> str:
        chosen = self.rng.choices(self.words, weights=self.weights, k=n_words)
        lines = [" ".join(chosen[i:i + 12]) for i in range(0, len(chosen), 12)]
        return "\r\n".join(lines)

    def message(self, i: int, rare: bool) -> bytes:
        size_class = self.rng.random()
        n_words = 60 if size_class < 0.5 else 400 if size_class < 0.9 else 3000
        body = self.text(n_words) + (f"\r\nthe {RARE} arrived" if rare else "")
        subject = self.text(6)
        head = (f"From: {self.rng.choice(self.words)} <{self.rng.choice(self.words)}@example.org>\r\n"
                f"To: alice@example.test\r\nSubject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                f"Message-ID: <{i}.corpus@example.org>\r\nMIME-Version: 1.0\r\n")
        if i % 3:
            return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n").encode()
        html = "<html><body><p>" + body.replace("\r\n", "</p><p>") + "</p></body></html>"
        attachment = "" if i % 9 else (
            "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=scan.pdf\r\n\r\n"
            + "\r\n".join("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2" for _ in range(1500))
            + "\r\n")
        return (head + "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                "--b\r\nContent-Type: multipart/alternative; boundary=a\r\n\r\n"
                "--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
                "--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--a--\r\n"
                + attachment + "--b--\r\n").encode()


def fill(store: Store, account: str, count: int) -> float:
    corpus = Corpus()
    rare = set(random.Random(3).sample(range(count), 10))
    messages = [corpus.message(i, i in rare) for i in range(count)]
    next_index = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            seen = ["\\Seen"] if i % 10 else []
            store.deliver([account], messages[i], flags=seen)

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(16)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return count / (time.perf_counter() - start)


def timed(fn, runs: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="where to work (default: a new directory under /var/tmp)")
    parser.add_argument("--messages", type=int, default=100_000, help="size of the big mailbox")
    parser.add_argument("--keep", action="store_true", help="keep the data afterwards")
    parser.add_argument("--skip-big", action="store_true", help="only the delivery figures")
    args = parser.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="postroom-bench-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        raw = raw_disk(base / "raw")
        print(f"raw disk (4 KiB write+fsync+rename):      {raw:8.0f} files/s")
        with Store(open_data_dir(base / "data", 16)) as store:
            one = single(store, 2000)
            print(f"single-threaded delivery, 4 KiB:           {one:8.0f} msgs/s  ({one / raw:.0%} of raw; target 50%)")
            many, commits = concurrent(store, 32, 200)
            print(f"32 threads delivering to one shard, 4 KiB: {many:8.0f} msgs/s  ({many / raw:.1f}x raw; target 5x;"
                  f" {32 * 200 / max(commits, 1):.1f} messages per commit)")

        if args.skip_big:
            return
        big = base / "big"
        account = "alice@example.test"
        with Store(open_data_dir(big, 1)) as store:
            rate = fill(store, account, args.messages)
            print(f"filled a mailbox of {args.messages} realistic messages at {rate:.0f} msgs/s (16 threads)")
            backlog = store.index_backlog(account, "INBOX")
            start = time.perf_counter()
            store.build_index(account)
            print(f"full-text index: {backlog} messages left for the background indexer after the fill, "
                  f"finished in {time.perf_counter() - start:.1f} s")
        with Store(open_data_dir(big, 1)) as store:  # a fresh process-level open
            ms, (_, uids, _) = timed(lambda: store.uids(account, "INBOX"))
            print(f"open + list all UIDs and flags:            {ms:8.1f} ms  ({len(uids)} messages; target < 100 ms)")
            ms, found = timed(lambda: store.search(account, "INBOX", ("body", RARE)))
            print(f"SEARCH BODY rare word ({RARE}):        {ms:8.1f} ms  ({len(found)} found; target < 200 ms)")
            ms, found = timed(lambda: store.search(account, "INBOX", ("body", COMMON)))
            print(f"SEARCH BODY common word ({COMMON}):          {ms:8.1f} ms  ({len(found)} found; target < 200 ms)")
            ms, found = timed(lambda: store.search(account, "INBOX", ("flag", "\\Seen", False)))
            print(f"SEARCH UNSEEN:                             {ms:8.1f} ms  ({len(found)} found; target < 50 ms)")
            shard = store.shard(account)
            index = du(shard.path / "index.lmdb")
            files = du(shard.account_dir(account))
            print(f"index size: {index / 2**20:.0f} MiB for {files / 2**20:.0f} MiB of message files "
                  f"(ratio {index / files:.2f})")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
