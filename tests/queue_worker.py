"""A child process that works on the outbound queue until it is killed (tests/test_queue.py).

    python queue_worker.py DATA_DIR MODE [ARG]

MODE "enqueue" (ARG: the first sequence number): four threads queue uniquely numbered
messages, each written in pieces of 1 to 8192 bytes, some over the queue's in-memory size;
every fifth is aborted halfway instead. After each commit returns it prints
`queued <seq> <qid>`: what the parent may count on.
MODE "record": prints `ready` once the queue is open, then takes due messages and records, for each recipient in turn, a deferral, then
a delivery or a bounce; after each record() returns it prints `recorded <qid> <address>
<state>`, and then `finished <qid>` when that was the message's last recipient.
MODE "hold-open" (ARG: a sequence number): begins a message, writes more than the in-memory
part, prints `writing <qid>`, then waits for a line on stdin before it commits and prints
`queued <seq> <qid>`.
MODE "runner": tries the runner lock; prints `acquired` or `refused`, then waits for stdin
to close.
MODE "changes" (ARG: a count): holds and releases one message ARG times, printing `changed`.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage import (  # noqa: E402
    BOUNCED,
    DEFERRED,
    DELIVERED,
    Queue,
    QueuedRecipient,
    QueueEnvelope,
    Result,
    open_data_dir,
)

SHARDS = 2


def message(seq: int) -> bytes:
    """Message `seq`: from 200 bytes to ~200 KB, so some stay in memory until commit."""
    body = f"line {seq} of the queued message\r\n" * (1 + (seq * 37) % 6000)
    return f"From: a@example.test\r\nTo: b@remote.test\r\nX-Seq: {seq}\r\n\r\n{body}".encode()


def envelope(seq: int) -> QueueEnvelope:
    recipients = tuple(QueuedRecipient(f"r{i}-{seq}@remote.test", notify=("FAILURE",) if i else ())
                       for i in range(1 + seq % 3))
    return QueueEnvelope(sender=f"s{seq}@example.test", recipients=recipients, envid=f"E{seq}", ret="HDRS")


def prepend(seq: int) -> bytes:
    return f"X-Prepended: {seq}\r\n".encode()


def enqueue(queue: Queue, seq: int) -> str | None:
    raw = message(seq)
    with queue.begin(envelope(seq)) as entry:
        at = 0
        while at < len(raw):
            step = 1 + (seq * 7919 + at) % 8192
            entry.write(raw[at:at + step])
            at += step
            if seq % 5 == 0 and at > len(raw) // 2:
                entry.abort()
                return None
        return entry.commit(prepend(seq))


def main() -> None:
    data_dir, mode = sys.argv[1], sys.argv[2]
    queue = Queue(open_data_dir(data_dir, SHARDS))
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    if mode == "enqueue":
        counter = itertools.count(int(sys.argv[3]))

        def work() -> None:
            while True:
                seq = next(counter)
                qid = enqueue(queue, seq)
                if qid is not None:
                    say(f"queued {seq} {qid}")

        threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elif mode == "record":
        say("ready")
        while True:
            due = queue.due(time.time() + 3600, 50)
            if not due:
                time.sleep(0.01)
                continue
            for msg in due:
                for recipient in msg.pending:
                    attempts = recipient.attempts
                    if recipient.state == "queued":
                        queue.record(msg.id, [Result(recipient.address, DEFERRED, "451 4.3.0 try later",
                                                     "mx.remote.test", time.time() + 1)])
                        say(f"recorded {msg.id} {recipient.address} {DEFERRED}")
                        attempts += 1
                    final = DELIVERED if attempts % 2 == 0 else BOUNCED
                    after = queue.record(msg.id, [Result(recipient.address, final,
                                                         "250 ok" if final == DELIVERED else "550 no",
                                                         "mx.remote.test")])
                    say(f"recorded {msg.id} {recipient.address} {final}")
                    if after is None:
                        say(f"finished {msg.id}")
    elif mode == "hold-open":
        seq = int(sys.argv[3])
        raw = message(seq)
        entry = queue.begin(envelope(seq))
        entry.write(raw[: len(raw) // 2])
        say(f"writing {entry.id}")
        sys.stdin.readline()
        entry.write(raw[len(raw) // 2:])
        qid = entry.commit(prepend(seq))
        say(f"queued {seq} {qid}")
        sys.stdin.readline()
    elif mode == "runner":
        lock = queue.runner_lock()
        say("acquired" if lock.acquire() else "refused")
        sys.stdin.read()
    elif mode == "changes":
        (msg,) = queue.list()
        for _ in range(int(sys.argv[3])):
            queue.hold(msg.id)
            queue.release(msg.id)
            say("changed")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
