"""A full disk, made by a test: one file that takes every byte left on a file system.

Used by tests/test_disk_full.py, tests/test_queue.py and tests/test_journal_hostile.py, each
on a small file system of its own (a loop-mounted or tmpfs one), never the machine's.
"""

from __future__ import annotations

import os
from pathlib import Path


def fill(directory: Path) -> Path:
    """A file `filler` in `directory` that takes every byte left on its file system."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):  # down to the last crumbs
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return path
