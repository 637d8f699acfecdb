"""Maildir files: unique names, durable writes, flags in the name.

A message file is written to `tmp/`, fsynced, and renamed into `cur/` as
`<unique>,U=<uid>,S=<size>:2,<flags>` (the Maildir "info" suffix; `,S=` as Dovecot writes
it). The UID and size in the name let `store rebuild` recover a mailbox from its files
alone. Standard flags are the Maildir letters D F R S T, sorted, so that any Maildir reader
sees the same state as IMAP clients.

Every directory of the store is 0700 and every message file 0600, whatever the umask:
mail is for the postroom user alone.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import BinaryIO

from wire import metrics

# Flag bits in the index, and their Maildir letters (maildir(5), "info semantics").
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16
SYSTEM_FLAGS = {"\\Seen": SEEN, "\\Answered": ANSWERED, "\\Flagged": FLAGGED, "\\Deleted": DELETED, "\\Draft": DRAFT}
_LETTERS = {DRAFT: "D", FLAGGED: "F", ANSWERED: "R", SEEN: "S", DELETED: "T"}
_LETTER_BITS = {letter: bit for bit, letter in _LETTERS.items()}

_NAME = re.compile(r"^(?P<base>[^,:/]+),U=(?P<uid>\d+),S=(?P<size>\d+):2,(?P<letters>[A-Za-z]*)$")
_counter = itertools.count()
META_FILE = "postroom.json"
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def letters(bits: int) -> str:
    return "".join(letter for bit, letter in sorted(_LETTERS.items(), key=lambda kv: kv[1]) if bits & bit)


def bits_from_letters(text: str) -> int:
    return sum(_LETTER_BITS.get(c, 0) for c in set(text))


def new_base() -> str:
    """A name no other delivery, in this or any process or host, will pick (maildir(5))."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{HOST}"


def file_name(base: str, uid: int, size: int, bits: int) -> str:
    return f"{base},U={uid},S={size}:2,{letters(bits)}"


def parse_file_name(name: str) -> tuple[str, int, int, int] | None:
    """(base, uid, size, flag bits) of a name we wrote; None for anything else."""
    m = _NAME.match(name)
    if not m:
        return None
    return m["base"], int(m["uid"]), int(m["size"]), bits_from_letters(m["letters"])


def make_dirs(mailbox_dir: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        make_private_dirs(mailbox_dir / sub)


def make_private_dirs(path: Path) -> None:
    """`mkdir -p path` with each directory it creates 0700. Path.mkdir(parents=True) gives
    the parents it creates the umask's mode (0755 under the usual 022): the shard and account
    directories were readable by every user of the machine."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)


def write_file(path: Path, data: bytes, mtime: float, *, flush: bool = True, replace: bool = False) -> None:
    """A message file holding `data`, made new (or, with `replace`, in place of one there),
    fsynced unless `flush` is false (a journaled message's: storage/journal.py). Its mtime
    is the message's internal date (as Dovecot keeps it), for `store rebuild`. On failure (a
    full disk) nothing of it stays to hold the space."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL) | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.utime(fd, (mtime, mtime))
        if flush:
            metrics.fsync(fd, "message")
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)


def memory_file(data: bytes, name: str) -> BinaryIO:
    """`data` as a file opened for reading, with a descriptor of its own (a memfd), read as a
    message file is: FETCH through a FileView, POP3's RETR."""
    fd = os.memfd_create(name[:200], os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_meta(mailbox_dir: Path, meta: dict) -> None:
    """`postroom.json` beside tmp/new/cur: the mailbox's name for `store rebuild`."""
    tmp = mailbox_dir / "postroom.json.tmp"
    tmp.write_text(json.dumps(meta, ensure_ascii=False) + "\n")
    os.replace(tmp, mailbox_dir / META_FILE)


def read_meta(mailbox_dir: Path) -> dict | None:
    try:
        return json.loads((mailbox_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        metrics.fsync(fd, "directory")
    finally:
        os.close(fd)
