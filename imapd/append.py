"""APPEND's message literal, streamed into the store as it arrives (RFC 3501 §6.3.11).

The framer (imapd/framer.py) asks the session for a sink when a literal begins; for APPEND
after login the session opens one here: the command's head (mailbox, flags, date) is parsed
with a stand-in for the literal, a store delivery begins (Store.begin_delivery), and each
piece of the literal is written into it as the framer reads it. The session then holds no
more than the framer's window of the message, so fifty connections appending 25 MiB each
pin no 50 x 25 MiB. When the whole command has arrived, APPEND commits the delivery (or
answers the error met on the way) and closes it; a command that is never run (a parse
error, a dropped connection) closes it too, and the delivery leaves nothing behind.

Lines end in CRLF in IMAP (RFC 3501 §2.3.1.1) and in the store, where sizes, POP3's
dot-stuffing and BODY[] byte ranges count on it: a bare LF becomes CRLF on the way, also
where a CRLF is split between two pieces. After that the message must still fit
APPENDLIMIT. A message sent as a literal8 (RFC 3516 §4.4) has its binary parts made base64
first (imapd/binary_parts.py). Which literal is which message, MULTIAPPEND's several and
CATENATE's parts: imapd/appending.py.
"""

from __future__ import annotations

import re

from imapd.binary_parts import BinaryConverter
from storage import Delivered, Delivery, DeliveryError, Store, StoreError

_BARE_LF = re.compile(rb"(?<!\r)\n")


class AppendLiteral:
    """A sink for the framer: `write(piece)`, `len()` (octets received, as the literal's
    size counts them), `close()`. Then, in a store thread, `commit()`."""

    def __init__(self, store: Store, account: str, mailbox: str, *, flags: tuple[str, ...],
                 internal_date: float | None, limit: int, binary: bool = False):
        self.received = 0
        # A literal8's binary parts become base64 on the way (imapd/binary_parts.py).
        self._converter = BinaryConverter() if binary else None
        self.size = 0  # of the message, after bare LFs became CRLF
        self.too_big = False
        self.error: BaseException | None = None  # met before the commit, raised by it
        self._limit = limit
        self._cr = False  # the last piece ended in CR
        self._delivery: Delivery | None = None
        try:
            self._delivery = store.begin_delivery([(account, mailbox)], flags=flags, internal_date=internal_date)
        except (StoreError, ValueError) as e:  # a bad flag or name, a full disk: said at the end
            self.error = e

    def __len__(self) -> int:
        return self.received

    def write(self, piece: bytes) -> None:
        self.received += len(piece)
        if self._delivery is None:
            return  # failed or too big: the rest is read and dropped
        if self._converter is not None:
            piece = self._converter.feed(piece)
        self._store_piece(piece)

    def _store_piece(self, piece: bytes) -> None:
        if self._delivery is None:
            return
        if self._cr and piece.startswith(b"\n"):
            fixed = b"\n" + _BARE_LF.sub(b"\r\n", piece[1:])
        else:
            fixed = _BARE_LF.sub(b"\r\n", piece) if b"\n" in piece else piece
        if piece:
            self._cr = piece.endswith(b"\r")
        self.size += len(fixed)
        if self.size > self._limit:
            self.too_big = True
            self.close()
            return
        try:
            self._delivery.write(fixed)
        except StoreError as e:  # the delivery aborted itself
            self.error, self._delivery = e, None

    def finish(self) -> None:
        """The literal has all arrived: what the converter still holds goes in (`too_big`
        may turn true here)."""
        if self._converter is not None:
            self._store_piece(self._converter.end())
            self._converter = None

    def commit(self) -> Delivered:
        """Blocking (a store thread's): the message durable in its mailbox, or the error."""
        self.finish()
        if self.too_big:
            raise MessageTooBigError()
        if self.error is not None:
            raise self.error
        if self._delivery is None:
            raise StoreError("the message was not kept")
        try:
            return self._delivery.commit()[0]
        except DeliveryError as e:
            raise e.errors[0][1] from None
        finally:
            self.close()

    def close(self) -> None:
        """Whatever happens to the command: a delivery not committed leaves nothing."""
        if self._delivery is not None:
            self._delivery.close()
            self._delivery = None


class MessageTooBigError(Exception):
    """The message grew over APPENDLIMIT (a literal8's parts made base64, CATENATE's parts
    joined): answered NO [TOOBIG]."""


class DroppedLiteral:
    """A sink that only counts: the literal of an APPEND that cannot succeed (its head does
    not parse), read so the connection stays in step, and dropped."""

    def __init__(self) -> None:
        self.received = 0

    def __len__(self) -> int:
        return self.received

    def write(self, piece: bytes) -> None:
        self.received += len(piece)

    def close(self) -> None:
        pass


class LiteralStandIn:
    """What the head of an APPEND is parsed with before its literal has arrived."""

    def __init__(self, size: int):
        self._size = size

    def __len__(self) -> int:
        return self._size
