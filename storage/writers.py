"""Where a process writes new message files before the index knows them, and how the
files of a dead process are found.

Each process that delivers to a shard writes into its own directory `<shard>/tmp/<writer>/`
and holds `flock(LOCK_EX)` on `<shard>/tmp/<writer>.lock` for as long as it lives. A message
file is written there, fsynced, the directory fsynced, the index committed, and only then is
the file renamed into its mailbox's `cur/` (storage/settle.py). So `cur/` only ever holds
messages the index knows, and what a crash leaves behind is all in the directories of dead
writers: files the index knows (committed, not yet renamed) are finished, the others
(never acknowledged) are discarded, by the next process to open the shard.

A writer is dead when its lock can be taken: the kernel drops a flock when its holder ends,
however it ends (kill -9 included), so there is no guessing from pids or ages. The lock file
is created before the directory and removed after it; a directory without its lock file is
therefore dead too. A live writer checks, once it holds its lock, that the file it locked
is still the one at the path (a recovering process may have judged it dead and removed it
in between), and starts again if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.maildir import fsync_dir

LOCK_SUFFIX = ".lock"


class WriterDir:
    """This process's directory for new files in one shard; created on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._path: Path | None = None
        self._lock_fd: int | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._create()
        return self._path

    def owns(self, name: str) -> bool:
        return self._path is not None and self._path.name == name

    def close(self) -> None:
        """Release the lock. The directory stays: renames out of it may not be durable yet,
        so the next process to open the shard finishes it and removes it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _create(self) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            name = f"{os.getpid()}-{secrets.token_hex(6)}"
            lock_path = self.root / (name + LOCK_SUFFIX)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                still_ours = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_ours = False
            if not still_ours:  # judged dead and removed before we held it: a new name
                os.close(fd)
                continue
            path = self.root / name
            path.mkdir(mode=0o700)
            fsync_dir(self.root)  # the directory must outlast a crash before any file in it counts
            self._lock_fd = fd
            return path


@contextmanager
def dead_writers(root: Path, *, skip: WriterDir | None = None) -> Iterator[tuple[list[Path], set[str]]]:
    """(the directories of writers that are gone, the names of those alive). The dead are
    locked for the duration, so that nobody else recovers them at the same time; on exit
    each is removed with its lock file, if the caller emptied it."""
    held: list[tuple[Path, int | None]] = []
    alive: set[str] = set()
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        names = []
    locks = {n[: -len(LOCK_SUFFIX)] for n in names if n.endswith(LOCK_SUFFIX)}
    directories = {n for n in names if not n.endswith(LOCK_SUFFIX)}
    try:
        for name in sorted(locks | directories):
            if skip is not None and skip.owns(name):
                alive.add(name)
                continue
            fd = None
            if name in locks:
                fd = _try_lock(root / (name + LOCK_SUFFIX))
                if fd is None:
                    alive.add(name)
                    continue
            held.append((root / name, fd))
        yield [path for path, _ in held], alive
    finally:
        for path, fd in held:
            _remove(path, fd)


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # removed meanwhile by another recovering process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _remove(path: Path, fd: int | None) -> None:
    """A recovered writer's directory (if it is empty now) and then its lock file."""
    try:
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            return  # something could not be settled: keep it, and its lock, for next time
        lock = path.with_name(path.name + LOCK_SUFFIX)
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
    finally:
        if fd is not None:
            os.close(fd)
