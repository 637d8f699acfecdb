"""URLAUTH (RFC 4467) and URLFETCH's binary forms (RFC 5524): GENURLAUTH, RESETKEY and
URLFETCH.

A URL names a message, or a part of one, in some user's mailbox; its token (imapd/urls.py)
is made with that mailbox's access key (storage/urlauth.py). What URLFETCH checks before it
answers is imapd/urlaccess.py's (CATENATE shares it); after a RESETKEY a mailbox has no key
until the next GENURLAUTH makes another, which never matches an old token. Any failure is
the same NIL (RFC 4467 §6.3).

BINARY (RFC 5524 §4) of a leaf is its body decoded; of a message or a multipart it is the
part with every base64 or quoted-printable leaf inside decoded and marked
`Content-Transfer-Encoding: binary`, and BODYPARTSTRUCTURE with BINARY describes those
decoded bytes (sizes and line counts), as Dovecot answers.
"""

from __future__ import annotations

import datetime
import re
import urllib.parse
from collections.abc import Callable
from typing import BinaryIO

import msgspec

from imapd import fetch, urls, utf7
from imapd import responses as r
from imapd.answers import Answer, no
from imapd.decoding import UnknownEncodingError, decode
from imapd.state import SessionState
from imapd.syntax import GenUrlAuth, ResetKey, Section, UrlFetch
from imapd.urlaccess import lookup, mailbox_name, owner
from storage import BodyPart, StoreError

_CTE = re.compile(rb"^content-transfer-encoding:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.IGNORECASE | re.MULTILINE)
_DECODED = ("base64", "quoted-printable")


# -- the commands ---------------------------------------------------------------------------------

async def genurlauth(session: SessionState, command: GenUrlAuth):
    """RFC 4467 §6.1: each rump URL, of the session's own mailboxes, with its token."""
    made = await session.run_store(_genurlauth, session.context, session.user, command.items)
    if isinstance(made, str):
        raise no("cannot authorize this URL", f"BADURL {_shown(made)}")
    session.untagged(b"GENURLAUTH " + b" ".join(r.astring(url) for url in made))
    session.log.info("genurlauth", urls=len(made))


def _shown(url: str) -> str:
    """A URL as a response code can carry it: printable ASCII without `]`, bounded."""
    return "".join(ch if " " < ch < "\x7f" and ch != "]" else urllib.parse.quote(ch) for ch in url[:200])


def _genurlauth(context, user: str, items: tuple[tuple[str, str], ...]) -> list[str] | str:
    """The URLs made, or the first URL that cannot be (blocking)."""
    made = []
    for text, mechanism in items:
        try:
            url = urls.parse(text)
        except urls.UrlError:
            return text
        if url.token is not None or mechanism.upper() not in urls.MECHANISMS:
            return text
        if (owner(context.accounts, url) or "").lower() != user.lower():
            return text  # §6.1: only the owner makes URLs to a mailbox
        try:
            mailbox_id, key = context.store.urlauth_key(user, mailbox_name(url.mailbox), create=True)
        except (StoreError, ValueError, utf7.UTF7Error):
            return text
        if key is None or (url.uidvalidity is not None and url.uidvalidity != mailbox_id):
            return text
        made.append(f"{url.rump}:INTERNAL:{urls.token(key, url.rump)}")
    return made


async def resetkey(session: SessionState, command: ResetKey):
    """RFC 4467 §6.2: new keys (here: none until the next GENURLAUTH) for one mailbox or all."""
    if any(m.upper() not in urls.MECHANISMS for m in command.mechanisms):
        raise no("only the INTERNAL mechanism is supported")
    await session.run_store(session.context.store.urlauth_reset, session.user, command.mailbox)
    session.log.info("resetkey", mailbox=command.mailbox or "*")


async def urlfetch(session: SessionState, command: UrlFetch):
    """RFC 4467 §6.3 and RFC 5524 §3: one URLFETCH response, a value or NIL per URL. The
    response goes out a URL at a time, drained in between: a hundred URLs of big messages
    are never held together."""
    context, user = session.context, session.user
    now = datetime.datetime.now(datetime.timezone.utc)
    session.conn.write(b"* URLFETCH")
    found = 0
    for item in command.items:
        try:
            answer = await session.run_store(_urlfetch_one, context, user, item, now)
        except Answer:  # the store is unavailable: this URL is NIL, the line stays whole
            answer = None
        found += answer is not None
        session.conn.write(b" " + r.astring(item.url) + b" " + (r.NIL if answer is None else answer))
        await session.conn.drain()
    session.conn.write(b"\r\n")
    session.log.info("urlfetch", urls=len(command.items), found=found)


def _urlfetch_one(context, user: str, item, now: datetime.datetime) -> bytes | None:
    found = lookup(context.store, context.accounts, user, item.url, now)
    if found is None:
        return None
    info, section, partial = found
    store = context.store
    try:
        with store.open_message(info) as f:
            if not item.extended:
                return r.literal(fetch.section_data(info, section, partial, lambda: _Shared(f)))
            return _extended(info, section, partial, f, item)
    except (StoreError, OSError):
        return None  # expunged since it was found


def _extended(info, section: Section, partial, f: BinaryIO, item) -> bytes | None:
    """RFC 5524 §3: `(BODYPARTSTRUCTURE ... BODY ... BINARY ...)` in that order."""
    part = info.structure if not section.part else fetch.find_part(info.structure, section.part)
    if part is None:
        return None
    converted = None
    if item.binary:
        try:
            converted = _binary(info, part, section, f)
        except UnknownEncodingError:
            converted = None
    out = []
    if item.bodypartstructure:
        shown = converted[1] if converted is not None else part
        out.append(b"BODYPARTSTRUCTURE " + fetch.body_structure(shown, extended=True))
    if item.body:
        data = fetch.section_data(info, section, partial, lambda: _Shared(f))
        out.append(b"BODY " + r.literal(data))
    if item.binary:
        if converted is None:
            out.append(b"BINARY NIL")
        else:
            data = converted[0] if partial is None else converted[0][partial[0]:partial[0] + partial[1]]
            out.append(b"BINARY " + (b"~" + r.literal(data) if b"\0" in data else r.literal(data)))
    return r.plist(out)


class _Shared:
    """The open message file handed to fetch.section_data, which closes what it opens:
    the file stays open for the next item."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def seek(self, offset: int) -> int:
        return self._f.seek(offset)

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def close(self) -> None:
        pass


# -- RFC 5524 BINARY of any part ------------------------------------------------------------------

def _binary(info, part: BodyPart, section: Section, f: BinaryIO) -> tuple[bytes, BodyPart]:
    """BINARY of the part a URL names, and the part as those bytes make it."""
    read = _reader(f)
    if section.text:  # HEADER, TEXT, MIME...: no encoding of their own to undo
        data = fetch.section_data(info, section, None, lambda: _Shared(f))
        return data, part
    if not section.part:
        return _entity(part, read)
    return _body(part, read)


def _reader(f: BinaryIO) -> Callable[[int, int], bytes]:
    def read(start: int, end: int) -> bytes:
        if end <= start:
            return b""
        f.seek(start)
        return f.read(end - start)
    return read


def _entity(part: BodyPart, read) -> tuple[bytes, BodyPart]:
    """A part's header and body, its leaves decoded."""
    header = read(*part.header)
    if part.parts is None and part.message is None and (part.encoding or "").lower() in _DECODED:
        header = _CTE.sub(b"Content-Transfer-Encoding: binary", header, count=1)
    body, shown = _body(part, read)
    return header + read(part.header[1], part.body[0]) + body, shown


def _body(part: BodyPart, read) -> tuple[bytes, BodyPart]:
    start, end = part.body
    if part.parts is not None:
        out, children, pos = [], [], start
        for child in part.parts:
            out.append(read(pos, child.header[0]))
            data, shown = _entity(child, read)
            out.append(data)
            children.append(shown)
            pos = child.body[1]
        out.append(read(pos, end))
        return b"".join(out), msgspec.structs.replace(part, parts=tuple(children))
    if part.message is not None:
        inner = part.message.structure
        data, shown = _entity(inner, read)
        data = read(start, inner.header[0]) + data + read(inner.body[1], end)
        return data, msgspec.structs.replace(part, size=len(data), lines=data.count(b"\n"),
                                             message=msgspec.structs.replace(part.message, structure=shown))
    data = read(start, end)
    if (part.encoding or "").lower() not in _DECODED:
        return data, part
    data = decode(data, part.encoding)
    return data, msgspec.structs.replace(part, size=len(data), lines=data.count(b"\n"))
