"""Queue ids: 16 characters of RFC 4648 base32hex (0-9, A-V), sortable by creation time and
unique across processes.

The first 11 characters are the creation time in microseconds (55 bits: good until the
year 3111), the last 5 are 25 random bits. Within a process the time part only ever goes
up, even when the clock steps back, so one process's ids sort in the order it made them;
two processes collide only if they pick the same microsecond and the same random bits
(one chance in 33 million per shared microsecond), and the spool file's O_EXCL turns even
that into an error rather than a mixup. Upper case and digits only: an id reads aloud,
greps, and is a safe file name. Like Postfix's long queue ids, it is in the logs and in
the 250 reply.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUV"  # base32hex: the digits' order is ASCII order
TIME_CHARS, RANDOM_CHARS = 11, 5
LENGTH = TIME_CHARS + RANDOM_CHARS
_ID = re.compile(r"[0-9A-V]{16}")

_lock = threading.Lock()
_last = 0  # the time part of this process's last id (microseconds)


def new_id(now: float | None = None) -> str:
    global _last
    micros = int((time.time() if now is None else now) * 1_000_000)
    with _lock:
        micros = max(micros, _last + 1)
        _last = micros
    return _encode(micros, TIME_CHARS) + _encode(secrets.randbits(5 * RANDOM_CHARS), RANDOM_CHARS)


def is_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def created_of(qid: str) -> float:
    """The time an id was made (seconds), read back from the id."""
    return int(qid[:TIME_CHARS], 32) / 1_000_000


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, digit = divmod(value, 32)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))
