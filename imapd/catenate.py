"""CATENATE (RFC 4469): an APPENDed message made of TEXT literals and URLs to messages, or
parts of messages, in the user's own mailboxes (RFC 5092 IMAP URLs).

The parts are joined in order into one store delivery, as APPEND's plain literal is
(imapd/append.py), and never held whole: a TEXT literal that comes before any URL is written
into the delivery as it arrives; once a URL has come, what the URL names is only read when
the command has all arrived (in a store thread, from the store), so the TEXT literals after
it go to a spool file meanwhile (SpooledTemporaryFile: in memory up to SPOOL_IN_MEMORY, then
on disk) and join the delivery in their place then. The joined message is bounded by
APPENDLIMIT as it grows.

A URL this server cannot or will not resolve (another server, a mailbox or UIDVALIDITY or
UID that does not match, a malformed one) is BadUrlError, answered `NO [BADURL <url>]`
(RFC 4469 §6); nothing of the APPEND is kept.

A URLAUTH-authorized URL (RFC 4467; RFC 4469 §5 allows them) is taken when URLFETCH would
give the session's user what it names (imapd/urlaccess.py's checks: token, access, expiry):
it may name another user's mailbox then.

URLs taken: `/mailbox[;UIDVALIDITY=n][/];UID=n[/;SECTION=s][/;PARTIAL=o[.l]]`, and the same
after `imap://[user@]host`, where the user, if given, must be the session's (RFC 5092 §6:
mailbox, section percent-encoded; a mailbox name is modified UTF-7 or UTF-8).
"""

from __future__ import annotations

import datetime
import re
import tempfile
import urllib.parse
from collections.abc import Iterator

from imapd import fetch, urlaccess, utf7
from imapd.append import AppendLiteral
from imapd.parser import parse_section
from imapd.syntax import CatenateUrl, ParseError, Section
from storage import Store, StoreError

SPOOL_IN_MEMORY = 64 * 1024
_CHUNK = 64 * 1024
_URL = re.compile(
    r"(?:imap://(?:(?P<user>[^@/;]*)(?:;[^@/]*)?@)?[^/]+)?"
    r"/(?P<mailbox>[^;?]*?)(?:;uidvalidity=(?P<uidvalidity>[0-9]{1,10}))?/?"
    r";uid=(?P<uid>[0-9]{1,10})"
    r"(?:/;section=(?P<section>[^/;?]*))?"
    r"(?:/;partial=(?P<origin>[0-9]{1,10})(?:\.(?P<length>[0-9]{1,10}))?)?\Z",
    re.IGNORECASE)


class BadUrlError(Exception):
    """A CATENATE URL that names nothing this user may read: NO [BADURL url]."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


class CatenateMessage:
    """One CATENATE message on its way: its parts in order, into one AppendLiteral."""

    def __init__(self, store: Store, account: str, mailbox: str, *, flags: tuple[str, ...],
                 internal_date: float | None, limit: int):
        self.literal = AppendLiteral(store, account, mailbox, flags=flags, internal_date=internal_date, limit=limit)
        self._pending: list[CatenateUrl | tempfile.SpooledTemporaryFile] = []  # after a URL, in order
        self._taken = 0  # CATENATE parts accounted for
        self._spooled = 0  # octets in the spools: APPENDLIMIT counts them before they join
        self._limit = limit
        self._spools: list[tempfile.SpooledTemporaryFile] = []
        self.closed = False

    def text(self, new: tuple, size: int) -> TextPart:
        """The sink for a TEXT literal that follows `new`, the parts parsed since the last
        TEXT literal (URLs, which take their place first)."""
        self._add(new)
        self._taken += 1
        spool = None
        if self._pending:
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
            self._spools.append(spool)
            self._pending.append(spool)
        return TextPart(self, spool)

    def parts(self, parts: tuple) -> None:
        """The message's parts, all of them (the command has arrived): those after the last
        TEXT literal streamed take their place."""
        self._add(parts[self._taken:])

    def _add(self, parts: tuple) -> None:
        for part in parts:
            self._taken += 1
            if isinstance(part, CatenateUrl):
                self._pending.append(part)
            else:  # a TEXT literal that was not streamed (bytes): it joins in its place
                spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
                self._spools.append(spool)
                self._pending.append(spool)
                TextPart(self, spool).write(bytes(part))

    def spooled(self, count: int) -> bool:
        """`count` more octets went to a spool: whether the message still fits."""
        self._spooled += count
        if self._spooled + self.literal.size > self._limit:
            self.literal.too_big = True
            self.literal.close()
        return not self.literal.too_big

    def resolve(self, store: Store, account: str, accounts=None) -> None:
        """Blocking (a store thread's): the URLs read and the spools joined into the
        delivery, in order. BadUrlError for a URL that names nothing."""
        for item in self._pending:
            if self.literal.too_big:
                return
            if isinstance(item, CatenateUrl):
                try:
                    for chunk in url_data(store, account, item.url, accounts):
                        self.literal.write(chunk)
                        if self.literal.too_big:
                            return
                except StoreError:  # expunged since it was found
                    raise BadUrlError(item.url) from None
            else:
                item.seek(0)
                while chunk := item.read(_CHUNK):
                    self.literal.write(chunk)
        self._pending = []
        self._close_spools()

    def close(self) -> None:
        self.closed = True
        self.literal.close()
        self._close_spools()

    def _close_spools(self) -> None:
        for spool in self._spools:
            spool.close()
        self._spools = []


class TextPart:
    """The framer's sink for one TEXT literal: into the delivery, or its spool."""

    def __init__(self, message: CatenateMessage, spool):
        self.message = message
        self.received = 0
        self._spool = spool

    def __len__(self) -> int:
        return self.received

    def write(self, piece: bytes) -> None:
        self.received += len(piece)
        if self._spool is None:
            self.message.literal.write(piece)
        elif not self.message.literal.too_big and self.message.spooled(len(piece)):
            self._spool.write(piece)

    def close(self) -> None:
        self.message.close()  # a command dropped: the whole message goes


def url_data(store: Store, account: str, url: str, accounts=None) -> Iterator[bytes]:
    """What a CATENATE URL names, in chunks (blocking: a store thread's). BadUrlError for a
    URL that names nothing. `accounts` (storage.Accounts) is needed for URLAUTH URLs."""
    if ";urlauth=" in url.lower():
        if accounts is None:
            raise BadUrlError(url)
        found = urlaccess.lookup(store, accounts, account, url, datetime.datetime.now(datetime.timezone.utc))
        if found is None:
            raise BadUrlError(url)
        info, section, partial = found
        return _data(store, info, section, partial)
    m = _URL.match(url)
    if m is None:
        raise BadUrlError(url)
    if m.group("user") and urllib.parse.unquote(m.group("user")).lower() not in (
            account.lower(), account.split("@")[0].lower()):
        raise BadUrlError(url)
    try:
        name = _mailbox_name(m.group("mailbox"))
        section = parse_section(urllib.parse.unquote(m.group("section")).encode("utf-8")) \
            if m.group("section") else Section()
        mailbox = store.mailbox(account, name)
        if m.group("uidvalidity") and int(m.group("uidvalidity")) != mailbox.uidvalidity:
            raise BadUrlError(url)
        uid = int(m.group("uid"))
        infos = store.fetch(account, name, [(uid, uid)]) if uid else []
    except (ParseError, StoreError, ValueError, utf7.UTF7Error):
        raise BadUrlError(url) from None
    if not infos:
        raise BadUrlError(url)
    info = infos[0]
    partial = None
    if m.group("origin") is not None:
        partial = (int(m.group("origin")), int(m.group("length")) if m.group("length") else 2**32)
    return _data(store, info, section, partial)


def _data(store: Store, info, section: Section, partial: tuple[int, int] | None) -> Iterator[bytes]:
    span = _byte_range(info, section)
    if span is None:  # HEADER.FIELDS(.NOT), an empty section: small, made by fetch
        data = fetch.section_data(info, section, partial, lambda: store.open_message(info))
        return iter([data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)])
    start, end = span
    if partial is not None:
        start = min(start + partial[0], end)
        end = min(start + partial[1], end)
    return _read_range(store, info, start, end)


def _byte_range(info, section: Section) -> tuple[int, int] | None:
    """Where BODY[section] lies in the message file, for the sections that are one range of
    it (as imapd.fetch reads them); None for the others. A whole message or body is read a
    chunk at a time, never held whole."""
    part = fetch.find_part(info.structure, section.part)
    if part is None:
        return None
    if section.part and section.text in ("HEADER", "TEXT"):
        if part.message is None:
            return None
        part = part.message.structure
    if section.text == "":
        return (0, info.size) if not section.part else part.body
    if section.text == "TEXT":
        return part.body
    if section.text == "HEADER" or (section.text == "MIME" and section.part):
        return part.header[0], part.body[0]
    return None


def _read_range(store: Store, info, start: int, end: int) -> Iterator[bytes]:
    with store.open_message(info) as f:
        f.seek(start)
        while start < end:
            chunk = f.read(min(_CHUNK, end - start))
            if not chunk:
                return
            start += len(chunk)
            yield chunk


def _mailbox_name(encoded: str) -> str:
    raw = urllib.parse.unquote_to_bytes(encoded)
    if not raw:
        raise ValueError("no mailbox")
    name = utf7.decode(raw) if raw.isascii() else raw.decode("utf-8")
    head, sep, tail = name.partition("/")
    return "INBOX" + sep + tail if head.upper() == "INBOX" else name

