"""URLAUTH (RFC 4467) and URLFETCH's binary forms (RFC 5524): GENURLAUTH, RESETKEY,
URLFETCH, and the lookup CATENATE shares (imapd/catenate.py) to read what such a URL names.

A URL names a message, or a part of one, in some user's mailbox; its token (imapd/urls.py)
is made with that mailbox's access key (storage/urlauth.py). Fetching checks, in this order,
that the URL is well formed, not expired, that its access identifier admits the fetching
user, that the owner and the mailbox exist, that the token matches the mailbox's key of now
(none after a RESETKEY until the next GENURLAUTH makes another, which never matches an old
token), the UIDVALIDITY if given, and the message. Any failure is the same NIL (RFC 4467
§6.3): a client learns nothing of why, so nothing of other users' mailboxes.

BINARY (RFC 5524 §4) of a leaf is its body decoded; of a message or a multipart it is the
part with every base64 or quoted-printable leaf inside decoded and marked
`Content-Transfer-Encoding: binary`, and BODYPARTSTRUCTURE with BINARY describes those
decoded bytes (sizes and line counts), as Dovecot answers.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

import msgspec

from imapd import fetch, urls, utf7
from imapd import responses as r
from imapd.answers import bad, no
from imapd.decoding import UnknownEncodingError, decode
from imapd.parser import parse_section
from imapd.syntax import GenUrlAuth, ParseError, ResetKey, Section, UrlFetch
from storage import MailboxNotFoundError, StoreError
from storage.mime import BodyPart

if TYPE_CHECKING:  # imapd.state imports CATENATE's module, which imports this one's lookup
    from imapd.state import SessionState

_CTE = re.compile(rb"^content-transfer-encoding:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.IGNORECASE | re.MULTILINE)
_DECODED = ("base64", "quoted-printable")


# -- the commands ---------------------------------------------------------------------------------

async def genurlauth(session: SessionState, command: GenUrlAuth):
    """RFC 4467 §6.1: each rump URL, of the session's own mailboxes, with its token."""
    made = await session.context.run(_genurlauth, session.context, session.user, command.items)
    if isinstance(made, str):
        raise no("cannot authorize this URL", f"BADURL {made}")
    session.untagged(b"GENURLAUTH " + b" ".join(r.astring(url) for url in made))
    session.log.info("genurlauth", urls=len(made))


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
        if (_owner(context.accounts, url) or "").lower() != user.lower():
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
    """RFC 4467 §6.3 and RFC 5524 §3: one URLFETCH response, a value or NIL per URL."""
    context, user = session.context, session.user
    now = datetime.datetime.now(datetime.timezone.utc)
    parts = [b"URLFETCH"]
    found = 0
    for item in command.items:
        answer = await session.context.run(_urlfetch_one, context, user, item, now)
        found += answer is not None
        parts += [r.astring(item.url), r.NIL if answer is None else answer]
    session.untagged(b" ".join(parts))
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


# -- finding what a URL names --------------------------------------------------------------------

def lookup(store, accounts, user: str, text: str, now: datetime.datetime):
    """(MessageInfo, Section, partial) a URLAUTH URL names, when `user` may fetch it; None
    otherwise, whatever the reason (blocking: a store thread's)."""
    try:
        url = urls.parse(text)
    except urls.UrlError:
        return None
    if url.token is None or urls.expired(url, now) or not urls.may_fetch(url, user):
        return None
    owner = _owner(accounts, url)
    if owner is None:
        return None
    try:
        name = mailbox_name(url.mailbox)
        section = parse_section(url.section.encode("utf-8")) if url.section else Section()
        mailbox_id, key = store.urlauth_key(owner, name)
        if not urls.authorized(url, key) or (url.uidvalidity is not None and url.uidvalidity != mailbox_id):
            return None
        infos = store.fetch(owner, name, [(url.uid, url.uid)]) if url.uid else []
    except (ParseError, StoreError, ValueError, utf7.UTF7Error):
        return None
    return (infos[0], section, url.partial) if infos else None


def _owner(accounts, url: urls.AuthUrl) -> str | None:
    """The account the URL's user names (the store's name for it), None if none."""
    found = accounts.get_user(url.owner_address())
    return str(found.address) if found is not None else None


def mailbox_name(decoded: str) -> str:
    """The mailbox a URL names: percent-decoded already; modified UTF-7 or UTF-8 (RFC 5092 §6)."""
    if not decoded:
        raise ValueError("no mailbox")
    name = utf7.decode(decoded.encode("ascii")) if decoded.isascii() else decoded
    head, sep, tail = name.partition("/")
    return "INBOX" + sep + tail if head.upper() == "INBOX" else name


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
