"""COMPRESS=DEFLATE (RFC 4978): raw DEFLATE (RFC 1951, no zlib header) each way once the
tagged OK of `COMPRESS DEFLATE` has gone out. Sans-IO; imapd/protocol.py puts it between
the socket (or TLS) and the framer.

    deflate = Deflate()
    wire = deflate.compress(data)       # what we send, then flush() when a burst ends
    deflate.received(wire_bytes)        # what the client sent, held compressed
    data = deflate.inflate(room)        # at most `room` octets of it, decompressed

Bounded inflation: the client's bytes are kept compressed, and only as many are inflated as
the framer has room for (imapd.protocol asks for up to its read-ahead), so a few KB that
inflate to gigabytes cost the window, not the gigabytes; reading from the socket pauses
while the compressed backlog and the framer's buffer together pass the read-ahead.
Output is flushed with Z_SYNC_FLUSH (RFC 4978 §4: the peer must be able to read each
response without waiting for more); the protocol flushes once per burst of writes, not
per line.
"""

from __future__ import annotations

import zlib

LEVEL = 6
INFLATE_WBITS = -15  # raw deflate (RFC 4978 §4): the client may use the full 32 KiB window
# Our side may use a smaller one: 8 KiB of window and 32 KiB of hash tables (memLevel 6)
# instead of zlib's 256 KiB a connection, for a little less compression.
DEFLATE_WBITS, MEM_LEVEL = -13, 6


class CompressionError(Exception):
    """The client's stream is not valid DEFLATE (or it ended it): the connection ends."""


class Deflate:
    def __init__(self) -> None:
        self._out = zlib.compressobj(LEVEL, zlib.DEFLATED, DEFLATE_WBITS, MEM_LEVEL)
        self._in = zlib.decompressobj(INFLATE_WBITS)
        self._backlog = b""  # received, not yet inflated

    def compress(self, data: bytes) -> bytes:
        return self._out.compress(data)

    def flush(self) -> bytes:
        return self._out.flush(zlib.Z_SYNC_FLUSH)

    def received(self, data: bytes) -> None:
        self._backlog = self._backlog + data if self._backlog else data

    def backlog(self) -> int:
        """Compressed octets received and not yet inflated."""
        return len(self._backlog)

    def inflate(self, room: int) -> bytes:
        """Up to `room` octets of what the client sent, decompressed ("" when nothing more
        can come out of what has arrived)."""
        if room <= 0:
            return b""
        try:
            out = self._in.decompress(self._backlog, room)
        except zlib.error as e:
            raise CompressionError(str(e)) from None
        self._backlog = self._in.unconsumed_tail
        if self._in.eof:  # a final block: the client may not end compression (RFC 4978 §3)
            raise CompressionError("the client ended its DEFLATE stream")
        return out
