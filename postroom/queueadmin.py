"""The `queue` commands of the admin CLI: list, show, flush, remove, hold, release.

They work on a live server: the queue's index is shared by every process (storage/queue.py)
and the delivery runner notices a change within a second. `list` prints one message per
line, tab-separated (`cut -f1` gives the ids), oldest first; `--json` prints the same as
one JSON document, for scripts. An unknown id is a user error: one line on stderr, exit 1.
Every change is appended to the audit log.
"""

from __future__ import annotations

import argparse
import json
import time

from storage import DEFERRED, QUEUED, NotQueuedError, Queue, QueuedMessage

PENDING = (QUEUED, DEFERRED)


def queue_list(queue: Queue, args: argparse.Namespace, audit) -> int:
    messages = queue.list()
    if args.json:
        runner = queue.runner_lock().holder()
        print(json.dumps({"runner_pid": runner, "messages": [_as_json(m) for m in messages]}, indent=2))
        return 0
    for message in messages:
        pending = message.pending
        status = "held" if message.held else _status(message)
        print(f"{message.id}\t{_when(message.created)}\t{message.size}\t{message.envelope.sender or '<>'}\t{status}"
              f"\tto={','.join(r.address for r in pending)}")
    return 0


def queue_show(queue: Queue, args: argparse.Namespace, audit) -> int:
    message = _get(queue, args.id)
    if args.json:
        print(json.dumps(_as_json(message), indent=2))
        return 0
    env = message.envelope
    lines = [
        ("id", message.id),
        ("created", _when(message.created)),
        ("size", str(message.size)),
        ("sender", env.sender or "<>"),
        ("origin", env.origin + (f" (user {env.user})" if env.user else "")),
        ("held", "yes" if message.held else "no"),
    ]
    if env.envid is not None:
        lines.append(("envid", env.envid))
    if env.ret is not None:
        lines.append(("ret", env.ret))
    if env.smtputf8 or env.eight_bit:
        lines.append(("body", " ".join(n for n, on in (("SMTPUTF8", env.smtputf8), ("8BITMIME", env.eight_bit)) if on)))
    if message.delay_warned:
        lines.append(("delay warned", "yes"))
    for key, value in lines:
        print(f"{key}: {value}")
    for r in message.recipients:
        print(f"recipient: {r.address}")
        print(f"  state: {r.state}, {r.attempts} attempt(s)")
        if r.state in PENDING:
            print(f"  next attempt: {_when(r.next_attempt)}")
        if r.last_reply:
            print(f"  last reply: {r.last_reply}" + (f" (from {r.remote_mta})" if r.remote_mta else ""))
        if r.notify:
            print(f"  notify: {','.join(r.notify)}")
        if r.orcpt:
            print(f"  orcpt: {r.orcpt}")
    return 0


def queue_flush(queue: Queue, args: argparse.Namespace, audit) -> int:
    if args.id is None:
        count = queue.flush()
        audit("queue.flushed", qid="all", messages=count)
        print(f"flushed {count} message(s)")
        return 0
    message = _get(queue, args.id)
    queue.flush(message.id)
    audit("queue.flushed", qid=message.id, messages=1)
    note = ": it is on hold, and goes once released" if message.held else ""
    print(f"flushed {message.id}{note}")
    return 0


def queue_remove(queue: Queue, args: argparse.Namespace, audit) -> int:
    qid = _id(args.id)
    if not queue.remove(qid):
        raise NotQueuedError(f"no such message in the queue: {args.id}")
    audit("queue.removed", qid=qid)
    print(f"removed {qid}")
    return 0


def queue_hold(queue: Queue, args: argparse.Namespace, audit) -> int:
    qid = _id(args.id)
    if not queue.hold(qid):
        raise NotQueuedError(f"no such message in the queue: {args.id}")
    audit("queue.held", qid=qid)
    print(f"held {qid}")
    return 0


def queue_release(queue: Queue, args: argparse.Namespace, audit) -> int:
    qid = _id(args.id)
    if not queue.release(qid):
        raise NotQueuedError(f"no such message in the queue: {args.id}")
    audit("queue.released", qid=qid)
    print(f"released {qid}")
    return 0


def _id(text: str) -> str:
    return text.strip().upper()  # ids are upper case; a pasted one in lower case is the same


def _get(queue: Queue, text: str) -> QueuedMessage:
    message = queue.get(_id(text))
    if message is None:
        raise NotQueuedError(f"no such message in the queue: {text}")
    return message


def _status(message: QueuedMessage) -> str:
    """"queued" until a recipient was tried and deferred."""
    states = {r.state for r in message.pending}
    return DEFERRED if DEFERRED in states else QUEUED


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _as_json(message: QueuedMessage) -> dict:
    env = message.envelope
    return {
        "id": message.id,
        "created": _when(message.created),
        "size": message.size,
        "sender": env.sender,
        "origin": env.origin,
        "user": env.user,
        "envid": env.envid,
        "ret": env.ret,
        "smtputf8": env.smtputf8,
        "eight_bit": env.eight_bit,
        "held": message.held,
        "delay_warned": message.delay_warned,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_attempt": _when(r.next_attempt) if r.state in PENDING else None,
                "last_reply": r.last_reply,
                "remote_mta": r.remote_mta,
                "notify": list(r.notify),
                "orcpt": r.orcpt,
            }
            for r in message.recipients
        ],
    }
