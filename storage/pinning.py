"""A shard's pin, as the store sees it: a hook that whoever builds the store may pass in
(cluster mode: postroom/datadir.py passes cluster/pins.py's), so that its node detaches a
shard's volume only once no process has a file of it open. Storage never knows what a
pin is made of; it takes one before it opens anything of a shard and lets go of it once
that is closed:
- the store: while a shard is open (Store: index, writer lock, directory handle), while a
  delivery's message file is open (storage/delivery.py), while a message file is read
  (Store.open_message, `open_pinned` below);
- the outbound queues: while a shard's queue is open, a spool file written or read
  (storage/queue.py).

    pin() -> release       held until release() is called (once; later calls do nothing);
                           NotOwnerError if the shard is being let go (its volume detached)

Without a hook (a single node) nothing is pinned and nothing waits.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Release = Callable[[], None]
Pin = Callable[[], Release]  # one shard's: the store binds the shard's number


def not_pinned() -> None:
    pass


def take(pin: Pin | None) -> Release:
    """A pin from `pin`, or nothing to release when there is no hook."""
    return pin() if pin is not None else not_pinned


class _PinnedFile(io.FileIO):
    """A file of a shard read with the shard pinned: closing it (or its collection) lets go."""

    def __init__(self, path: Path, release: Release):
        self._release = release  # first: a failed open is closed (collected) too
        super().__init__(path, "r")

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self._release = getattr(self, "_release", None), None
            if release is not None:
                release()


def open_pinned(path: Path, pin: Pin | None) -> BinaryIO:
    """`path` opened for reading, as open(path, "rb") does, its shard pinned until it is closed."""
    if pin is None:
        return open(path, "rb")
    release = pin()
    try:
        return io.BufferedReader(_PinnedFile(path, release))
    except BaseException:
        release()
        raise
