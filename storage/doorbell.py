"""The delivery runner's doorbell: a datagram socket beside its lock.

The runner (mtad/outbound/runner.py) looks at its queues when their change counter moves,
and waits between looks. Whoever makes mail due (an enqueue, a flush, a release: in any
mtad process, or the CLI) rings once its commit is done, so the runner looks at once rather
than at its next poll, and an idle runner can poll seldom. It is Postfix's way (the qmgr
trigger, public/qmgr): a wake-up that carries nothing, for the queue is the truth. A ring
nobody hears (no runner yet, one starting, a full socket buffer) is lost, and harmless:
the runner's next poll sees the change.

The socket is `<runner lock>.bell` (queue/runner.bell; in a cluster, a node's beside its
runner lock), bound by the runner while it holds the lock, so no two runners bind it. In
the data dir, whose directories only the server's user may enter, only that user (and
root) can ring.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

# sun_path holds 108 bytes with its NUL: a data dir deeper than that has no doorbell (the
# runner polls, and logs why once).
MAX_PATH = 107
_FLAGS = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


def bell_path(lock_path: Path) -> Path:
    """The doorbell of the runner whose lock is `lock_path`."""
    return lock_path.with_suffix(".bell")


def ring(path: Path) -> None:
    """Tell the runner at `path` to look at its queues now. Never raises: a ring is a hint."""
    try:
        with socket.socket(socket.AF_UNIX, _FLAGS) as sock:
            sock.sendto(b"!", os.fsencode(path))
    except OSError:
        pass  # nobody listening (ENOENT, ECONNREFUSED), its buffer full (EAGAIN), a path too long


class Doorbell:
    """The runner's end. Bind it only while holding the runner lock: a socket file left by a
    runner that died is replaced. OSError if it cannot be bound (a path over MAX_PATH)."""

    def __init__(self, lock_path: Path):
        self.path = bell_path(lock_path)
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise OSError(f"{self.path}: longer than a socket's path may be ({MAX_PATH} bytes)")
        self._sock = socket.socket(socket.AF_UNIX, _FLAGS)
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._sock.bind(os.fsencode(self.path))
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        """Take every ring waiting: many rings, one look."""
        while True:
            try:
                self._sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return

    def close(self) -> None:
        """Before the runner lock is let go: the next runner binds its own."""
        if self._sock.fileno() < 0:
            return
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
