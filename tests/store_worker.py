"""A child process that works on the store until it is killed (used by the store tests).

    python store_worker.py DATA_DIR SHARDS MODE

MODE "deliver": four threads deliver uniquely numbered messages to alice's INBOX and move
some to Archive; after each call returns it prints `delivered <seq>` or `moved <seq>`, so
the parent knows exactly which operations were acknowledged before the SIGKILL.
MODE "stream": the same, each message written into Store.begin_delivery in pieces of 1 to
4096 bytes; every fifth is aborted halfway instead (and never printed).
MODE "flags": flags every message of alice's INBOX \\Flagged and back, printing `flagged N`.
"""

from __future__ import annotations

import itertools
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import open_data_dir  # noqa: E402
from storage.store import Store  # noqa: E402

ACCOUNT = "alice@example.test"


def message(seq: int) -> bytes:
    body = f"message number {seq} " * (1 + seq % 50)
    return (f"From: bob@example.org\r\nTo: {ACCOUNT}\r\nSubject: seq {seq}\r\nX-Seq: {seq}\r\n"
            f"Message-ID: <{seq}@example.org>\r\n\r\n{body}\r\n").encode()


def stream(store: Store, seq: int):
    raw = message(seq)
    with store.begin_delivery([ACCOUNT]) as delivery:
        at = 0
        while at < len(raw):
            step = 1 + (seq * 7919 + at) % 4096
            delivery.write(raw[at:at + step])
            at += step
            if seq % 5 == 0 and at > len(raw) // 2:
                delivery.abort()
                return None
        return delivery.commit()[0]


def main() -> None:
    data_dir, shards, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = Store(open_data_dir(data_dir, shards))
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    if mode in ("deliver", "stream"):
        start = int(sys.argv[4])
        counter = itertools.count(start)

        def work() -> None:
            while True:
                seq = next(counter)
                if mode == "stream":
                    delivered = stream(store, seq)
                    if delivered is None:
                        continue
                else:
                    delivered = store.deliver([ACCOUNT], message(seq))[0]
                say(f"delivered {seq} {delivered.uidvalidity} {delivered.uid}")
                if seq % 7 == 0:
                    store.move(ACCOUNT, "INBOX", [(delivered.uid, delivered.uid)], "Archive")
                    say(f"moved {seq}")

        threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elif mode == "flags":
        rounds = 0
        while True:
            store.store_flags(ACCOUNT, "INBOX", [(1, 2**32 - 1)], "add", ["\\Flagged"])
            store.store_flags(ACCOUNT, "INBOX", [(1, 2**32 - 1)], "remove", ["\\Flagged"])
            rounds += 1
            say(f"flagged {rounds}")


if __name__ == "__main__":
    main()
