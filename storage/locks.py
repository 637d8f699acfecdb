"""Exclusive access to an account's maildrop for a POP3 session (RFC 1939 §8: "the POP3
server acquires an exclusive-access lock on the maildrop"), across every process that
shares the data dir.

The lock is `flock(LOCK_EX | LOCK_NB)` on `<account dir>/pop3.lock`, held on an open file
descriptor for as long as the session lasts. The kernel drops it when the descriptor is
closed, whichever way the holder ends (QUIT, a dropped connection, kill -9, a crash): a
dead process can never leave a maildrop locked, and there is no stale-lock guessing. The
file itself is never removed (removing a locked file would let a second session lock a
new one beside it). Two opens of the file in one process conflict too, as two processes do.

The file records the holder's pid and the time of the last successful login, which the
POP3 LOGIN-DELAY policy (RFC 2449 §6.5) reads: the same for every process.

IMAP sessions do not take this lock: POP3 works on a snapshot and tolerates IMAP changes.

`held_flocks` says who holds which flock, from /proc/locks: for the messages that name a
lock's holder (`postroom status`, a cluster agent waiting for a shard's pins).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from storage.maildir import make_private_dirs
from storage.pinning import Release, not_pinned, take
from storage.store import Store

LOCK_NAME = "pop3.lock"


class MaildropLock:
    """A held lock; `release()` (or closing the process) frees it. The lock file is on the
    account's shard: in a cluster the shard stays pinned (storage/pinning.py) while it is held."""

    def __init__(self, fd: int, last_login: float | None, release_pin: Release = not_pinned):
        self._fd: int | None = fd
        self._release_pin = release_pin
        # When the previous session that logged in (and recorded it) did so; None if never.
        self.last_login = last_login

    @property
    def held(self) -> bool:
        return self._fd is not None

    def record_login(self, when: float | None = None) -> None:
        """Note this login's time (for LOGIN-DELAY) and the holder's pid in the file."""
        if self._fd is None:
            return
        text = f"{os.getpid()} {when if when is not None else time.time():.3f}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock
            self._release_pin()

    def __enter__(self) -> MaildropLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_maildrop(store: Store, account: str) -> MaildropLock | None:
    """The account's POP3 lock, or None while another session (of any process) holds it."""
    shard = store.shard(account)
    directory = shard.account_dir(account)
    make_private_dirs(directory)
    release_pin = take(shard.pin)
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
    except BlockingIOError:
        release_pin()
        return None
    except BaseException:
        release_pin()
        raise
    return MaildropLock(fd, _last_login(fd), release_pin)


def _last_login(fd: int) -> float | None:
    try:
        fields = os.pread(fd, 64, 0).split()
        return float(fields[1]) if len(fields) == 2 else None
    except (OSError, ValueError):
        return None


def held_flocks() -> dict[tuple[int, int, int], set[int]] | None:
    """(major, minor, inode) -> pids holding a flock on it, from /proc/locks; None where
    that file is not there (not Linux)."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    held: dict[tuple[int, int, int], set[int]] = {}
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 586 fe:00:3229197 0 EOF"; a waiter has "->" after the number.
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            held.setdefault(key, set()).add(int(fields[4]))
        except ValueError:
            continue
    return held
