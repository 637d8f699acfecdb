"""A message's bytes as DATA sends them, a chunk at a time (sans-IO).

RFC 5321 §4.5.2: a line that begins with "." gets one more; §2.3.8: lines end in CRLF, so
a bare LF or bare CR becomes CRLF (as aiosmtplib does for a whole message); §4.1.1.4: the
data ends with CRLF "." CRLF, after a CRLF added when the message lacks its last one.
State carried across chunks: whether the next byte starts a line, and a CR held back at a
chunk's end until the next byte says whether it is half of a CRLF. Each chunk is scanned a
constant number of times: linear in the message, whatever its chunking.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


class DotStuffer:
    def __init__(self) -> None:
        self._line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        data = b"\r" + chunk if self._held_cr else chunk
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return b""
        data = _LINE_END.sub(b"\r\n", data).replace(b"\r\n.", b"\r\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        """The rest, then the terminating "." line."""
        tail = b"\r\n" if self._held_cr or not self._line_start else b""
        self._held_cr, self._line_start = False, True
        return tail + b".\r\n"
