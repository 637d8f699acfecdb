"""A read-only view of a message file with the few bytes methods the MIME parser uses.

A big message is parsed from its file (storage/delivery.py) rather than from a copy in
memory. Mapping the file would do, but every page the parser touches then counts as the
daemon's resident memory until the mapping goes: twenty 25 MB messages parsed at once showed
as 140 MiB of RSS that was only page cache. This view reads what is asked with pread, a
window of WINDOW bytes at a time (the parser mostly walks forward, so one window serves many
calls), and holds no more than one window.

len(view), view[a:b] (bytes), view.find(sub, start, end), view.search(pattern, start, end)
for a pattern whose matches are at most `longest` bytes long.
"""

from __future__ import annotations

import os
import re

WINDOW = 256 << 10
_MARGIN = 4096  # a window is read again when less than this is left after what is asked


class FileView:
    def __init__(self, fd: int, size: int):
        self._fd, self._size = fd, size
        self._start, self._data = 0, b""

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a FileView is read by slices")
        start, stop, _ = key.indices(self._size)
        if stop <= start:
            return b""
        if self._start <= start and stop <= self._start + len(self._data):
            return self._data[start - self._start:stop - self._start]
        if stop - start <= WINDOW // 2:  # small reads go through the window
            self._load(start, stop - start)
            return self._data[start - self._start:stop - self._start]
        return self._read(start, stop - start)

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self._size if end is None else min(end, self._size)
        at = max(0, start)
        while at < end:
            self._load(at, len(sub))
            limit = min(end, self._start + len(self._data))
            found = self._data.find(sub, at - self._start, limit - self._start)
            if found >= 0:
                return self._start + found
            if limit >= end:
                return -1
            at = max(at + 1, limit - len(sub) + 1)  # a match may straddle the window's end
        return -1

    def search(self, pattern: re.Pattern, start: int, end: int, longest: int) -> tuple[int, int] | None:
        """The span of the leftmost match of `pattern` in view[start:end], for a pattern none
        of whose matches is longer than `longest` bytes (windows overlap by that much)."""
        at = max(0, start)
        end = min(end, self._size)
        while at < end:
            self._load(at, longest)
            limit = min(end, self._start + len(self._data))
            m = pattern.search(self._data, at - self._start, limit - self._start)
            if m is not None:
                return self._start + m.start(), self._start + m.end()
            if limit >= end:
                return None
            at = max(at + 1, limit - longest + 1)
        return None

    def _load(self, at: int, ahead: int) -> None:
        """A window holding view[at:at + ahead] (or up to the end of the file), and more."""
        window_end = self._start + len(self._data)
        if self._start <= at and (at + ahead <= window_end - _MARGIN or window_end == self._size):
            return
        self._start = at
        self._data = self._read(at, min(max(WINDOW, ahead + _MARGIN), self._size - at))

    def _read(self, start: int, size: int) -> bytes:
        data = os.pread(self._fd, size, start)
        while len(data) < size:  # a short read of a regular file: rare, but allowed
            more = os.pread(self._fd, size - len(data), start + len(data))
            if not more:
                raise OSError(f"message file shorter than {start + size} bytes")
            data += more
        return data
