"""Parse a message once, at delivery: its IMAP envelope, its MIME structure with byte
offsets, and the decoded text the full-text index is built from.

The structure is a tree of BodyPart records (cached in the index, storage/records.py), one
per body part, carrying what IMAP BODYSTRUCTURE needs (RFC 3501 §7.4.2: type, subtype, parameters, id,
description, encoding, size, lines, disposition, language, location) and the byte ranges
of its header and body in the stored file, so that any section (`BODY[1.2.MIME]`,
`BODY[2.TEXT]`) is one slice of the file, never a re-parse. Multipart boundaries follow
RFC 2046 §5.1.1; message/rfc822 parts carry their own envelope and structure.

Malformed input never raises: a missing boundary makes a part a leaf, a missing blank line
makes the whole part header. Nesting is bounded (MAX_DEPTH) and so is the number of parts
(MAX_PARTS), so a hostile message costs linear time.
"""

from __future__ import annotations

import base64
import email.errors
import email.header
import email.utils
import html
import quopri
import re
from collections.abc import Iterator
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from typing import NamedTuple

import msgspec

from storage.fileview import FileView

MAX_DEPTH = 20
MAX_PARTS = 1000
MAX_TEXT_CHARS = 2_000_000  # of decoded text fed to the index per message
PREVIEW_CHARS = 256  # RFC 8970 §3.1: a preview is at most 256 characters
PREVIEW_SCAN = 16_384  # characters of the first text part a preview is made from
PREVIEW_WINDOW = 1024  # characters looked at first for a preview (make_preview)

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_HEADER_PARSER = HeaderParser(policy=compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# A header block every line of which is `name: value` (a name of printable ASCII but the
# colon, as email's feedparser reads one), CRLF-ended or LF-ended throughout.
_PLAIN_HEADERS = re.compile(r"(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n)*|(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\n)*")
_HIDDEN_TAGS = frozenset({"script", "style", "head"})
_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "table",
                         "ul", "ol", "blockquote", "hr", "pre", "section", "article"})
_SPACES = re.compile(r"[ \t\r\f\v]+")
INDEXED_FIELDS = ("subject", "from", "to", "cc", "bcc")
_EPOCH_ORDINAL = 719163  # datetime.date(1970, 1, 1).toordinal()
_COUNT_SLICE = 256 << 10
Buffer = bytes | FileView


class EnvelopeAddress(msgspec.Struct, array_like=True, frozen=True):
    """One address of an ENVELOPE list (RFC 3501 §7.4.2), stored as IMAP lists it: a group
    opens with (None, None, group name, None) and closes with four None. A mailbox without a
    domain has host "" (never None, which would read as a group marker)."""

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """The IMAP ENVELOPE fields as the header has them (unfolded, not decoded), and the
    subject decoded for people. Stored keys are the header names."""

    date: str | None = None
    subject: str | None = None
    from_: tuple[EnvelopeAddress, ...] | None = msgspec.field(name="from", default=None)
    sender: tuple[EnvelopeAddress, ...] | None = None
    reply_to: tuple[EnvelopeAddress, ...] | None = msgspec.field(name="reply-to", default=None)
    to: tuple[EnvelopeAddress, ...] | None = None
    cc: tuple[EnvelopeAddress, ...] | None = None
    bcc: tuple[EnvelopeAddress, ...] | None = None
    in_reply_to: str | None = msgspec.field(name="in-reply-to", default=None)
    message_id: str | None = msgspec.field(name="message-id", default=None)
    subject_text: str | None = None  # the subject with RFC 2047 words decoded


class PartExtension(msgspec.Struct, frozen=True, omit_defaults=True):
    """A multipart's extension data (RFC 3501 §7.4.2, BODYSTRUCTURE only)."""

    disposition: tuple[str, tuple[tuple[str, str], ...]] | None = None
    language: tuple[str, ...] | None = None
    location: str | None = None


class BodyPart(msgspec.Struct, frozen=True, omit_defaults=True):
    """One MIME part: what BODYSTRUCTURE shows of it, and where its header and body lie in
    the stored file. A multipart has `parts` (and `extension`); a leaf has the body fields;
    a message/rfc822 leaf also has the `message` it encloses, parsed."""

    type: str
    subtype: str
    params: tuple[tuple[str, str], ...] = ()
    header: tuple[int, int] = (0, 0)  # byte range of its header, blank line excluded
    body: tuple[int, int] = (0, 0)  # byte range of its body
    parts: tuple[BodyPart, ...] | None = None
    extension: PartExtension | None = None
    id: str | None = None
    description: str | None = None
    encoding: str | None = None
    size: int = 0
    lines: int = 0
    md5: str | None = None
    disposition: tuple[str, tuple[tuple[str, str], ...]] | None = None
    language: tuple[str, ...] | None = None
    location: str | None = None
    message: EnclosedMessage | None = None


class EnclosedMessage(msgspec.Struct, frozen=True):
    """The message inside a message/rfc822 (or message/global) part."""

    envelope: Envelope
    structure: BodyPart


class ParsedMessage(NamedTuple):
    """What parse_message finds: the cached envelope and structure, and the text the
    full-text index is built from (storage/fts.py)."""

    envelope: Envelope
    structure: BodyPart
    sent: float | None  # the Date: header as a timestamp, when it has a zone
    sent_day: int | None  # the Date: header's own calendar day, days since 1970-01-01
    fields: dict[str, str]  # decoded subject, from, to, cc, bcc, by header name
    headers: str  # every top-level header line, decoded
    body: str  # decoded text of the text parts
    preview: str = ""  # RFC 8970 PREVIEW: the start of the first text part (make_preview)


class _Budget:
    def __init__(self) -> None:
        self.parts = 0
        self.text: list[str] = []
        self.text_chars = 0
        self.first_text: str | None = None  # of the first text part: the preview's source

    def add_text(self, text: str) -> None:
        room = MAX_TEXT_CHARS - self.text_chars
        if room > 0:
            self.text.append(text[:room])
            self.text_chars += min(len(text), room)


def parse_message(raw: Buffer) -> ParsedMessage:
    """Never raises: a message the parser cannot make sense of is one opaque part, stored
    and fetchable all the same. `raw` may be bytes or a FileView of the stored file
    (storage/delivery.py): only slices of it are read (a header, the text the index keeps),
    never the whole message at once."""
    try:
        return _parse_message(raw)
    except Exception:  # any message at all must be storable; its bytes are what counts
        opaque = BodyPart(type="application", subtype="octet-stream", header=(0, 0), body=(0, len(raw)),
                          encoding="7BIT", size=len(raw), lines=_count_lines(raw, 0, len(raw)))
        return ParsedMessage(envelope=Envelope(), structure=opaque, sent=None, sent_day=None,
                             fields={name: "" for name in INDEXED_FIELDS}, headers="", body="")


def _parse_message(raw: Buffer) -> ParsedMessage:
    budget = _Budget()
    structure, message = _parse_part(raw, 0, len(raw), ("text", "plain"), 0, budget)
    fields = {name: "\n".join((decode_words if name == "subject" else address_text)(_clean(str(v)))
                               for v in message.get_all(name, []))
              for name in INDEXED_FIELDS}
    headers = "\n".join(f"{name}: {decode_words(_clean(str(value)))}" for name, value in message.items())
    sent, sent_day = _sent(message)
    return ParsedMessage(envelope=envelope(message), structure=structure, sent=sent,
                         sent_day=sent_day, fields=fields, headers=headers, body="\n".join(budget.text),
                         preview=make_preview(budget.first_text or ""))


def make_preview(text: str) -> str:
    """RFC 8970 §3: at most PREVIEW_CHARS characters of what a reader sees first, white
    space (line breaks included) run together; only the start of the text is looked at, up
    to PREVIEW_SCAN characters of it. A window that already gives PREVIEW_CHARS is enough
    (its words run together are the start of the longer one's): splitting 16 KiB of every
    message's text was a third of a delivery's parse."""
    window = PREVIEW_WINDOW
    while True:
        collapsed = " ".join(text[:window].split())
        if len(collapsed) >= PREVIEW_CHARS or window >= PREVIEW_SCAN or window >= len(text):
            return collapsed[:PREVIEW_CHARS]
        window = min(window * 4, PREVIEW_SCAN)


class _IndexedMessage(Message):
    """compat32's Message, its fields looked up by name in a dict made once (index()):
    email's get() lowercases and compares every field's name at each call, and a delivery's
    parse makes some twenty calls (a fifth of its time). Should the fields change after
    index(), lookups go back to email's own."""

    _index: dict[str, list[tuple[str, str]]] | None = None
    _indexed: tuple[list, int] | None = None

    def index(self) -> None:
        by_name: dict[str, list[tuple[str, str]]] = {}
        for field in self._headers:
            by_name.setdefault(field[0].lower(), []).append(field)
        self._index, self._indexed = by_name, (self._headers, len(self._headers))

    def _fields(self, name: str) -> list[tuple[str, str]] | None:
        """The fields named `name`, or None when the index no longer holds."""
        if self._indexed is None or self._indexed[0] is not self._headers or self._indexed[1] != len(self._headers):
            return None
        return self._index.get(name.lower(), [])

    def get(self, name, failobj=None):
        fields = self._fields(name)
        if fields is None:
            return super().get(name, failobj)
        return self.policy.header_fetch_parse(*fields[0]) if fields else failobj

    def get_all(self, name, failobj=None):
        fields = self._fields(name)
        if fields is None:
            return super().get_all(name, failobj)
        return [self.policy.header_fetch_parse(k, v) for k, v in fields] if fields else failobj


def parse_headers(text: str) -> Message:
    """The header block `text` (unfolded) as email's HeaderParser (compat32) reads it. A
    block of plain `name: value` lines, nearly all mail, is split here: the feedparser's
    line-by-line state machine was a third of a delivery's parse."""
    if not _PLAIN_HEADERS.fullmatch(text):
        return _HEADER_PARSER.parsestr(text)
    message = _IndexedMessage(policy=compat32)
    # Split at the line ends only (str.splitlines would split at \v, \x85, U+2028 too).
    lines = text[:-2].split("\r\n") if text.endswith("\r\n") else text[:-1].split("\n") if text else []
    for line in lines:
        name, value = line.split(":", 1)
        message.set_raw(name, value.lstrip(" \t"))
    message.set_payload("")
    message.index()
    return message


def header_end(raw: Buffer, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the part at raw[start:end]."""
    first = raw[start:start + 2]  # slices, not startswith(): a FileView has no startswith
    if first == b"\r\n" or first[:1] == b"\n":
        # No header at all: the body starts after the empty line.
        return start, start + (2 if first == b"\r\n" else 1)
    if isinstance(raw, FileView):
        span = raw.search(_HEADER_END, start, end, longest=4)
    else:
        m = _HEADER_END.search(raw, start, end)
        span = m.span() if m else None
    if span is None:
        return end, end
    return span[0] + (2 if raw[span[0] : span[0] + 2] == b"\r\n" else 1), span[1]


def _parse_part(raw: Buffer, start: int, end: int, default: tuple[str, str], depth: int,
                budget: _Budget) -> tuple[BodyPart, Message]:
    budget.parts += 1
    hdr_end, body_start = header_end(raw, start, end)
    # Headers may be raw UTF-8 (RFC 6532); invalid bytes become U+FFFD rather than failing.
    # Unfolded first (RFC 5322 §2.2.3: a CRLF before white space is removed, the white space
    # kept): compat32 leaves the fold inside a quoted parameter, and boundary="foo<CRLF> bar"
    # must read as "foo bar" or the multipart is never split.
    text = _FOLD.sub("", bytes(raw[start:hdr_end]).decode("utf-8", "replace"))
    message = parse_headers(text)
    maintype, subtype = _content_type(message, default)
    params = _params(message)
    if maintype == "multipart":
        boundary = message.get_param("boundary")
        if isinstance(boundary, tuple):
            boundary = email.utils.collapse_rfc2231_value(boundary)
        children = _split_multipart(raw, body_start, end, boundary) if boundary and depth < MAX_DEPTH else None
        if children is not None:
            child_default = ("message", "rfc822") if subtype == "digest" else ("text", "plain")
            parts = []
            for child_start, child_end in children:
                if budget.parts >= MAX_PARTS:
                    break
                parts.append(_parse_part(raw, child_start, child_end, child_default, depth + 1, budget)[0])
            disposition, language, location = _extension(message)
            extension = PartExtension(disposition=disposition, language=language, location=location)
            return BodyPart(type=maintype, subtype=subtype, params=params, header=(start, hdr_end),
                            body=(body_start, end), parts=tuple(parts), extension=extension), message
        # A multipart with no usable boundary is presented as an opaque leaf.
        maintype, subtype, params = "application", "octet-stream", ()
    enclosed = None
    if maintype == "message" and subtype in ("rfc822", "global") and depth < MAX_DEPTH:
        inner, inner_message = _parse_part(raw, body_start, end, ("text", "plain"), depth + 1, budget)
        enclosed = EnclosedMessage(envelope=envelope(inner_message), structure=inner)
        budget.add_text(_decoded_headers_text(inner_message))
    elif maintype == "text" and not _is_attachment(message):
        text = _decode_text(message, raw[body_start:min(end, body_start + MAX_TEXT_CHARS * 2)], subtype)
        if budget.first_text is None:
            budget.first_text = text
        budget.add_text(text)
    disposition, language, location = _extension(message)
    part = BodyPart(
        type=maintype, subtype=subtype, params=params, header=(start, hdr_end), body=(body_start, end),
        id=_header(message, "content-id"), description=_header(message, "content-description"),
        encoding=(_header(message, "content-transfer-encoding") or "7BIT").upper(),
        size=end - body_start, lines=_count_lines(raw, body_start, end), md5=_header(message, "content-md5"),
        disposition=disposition, language=language, location=location, message=enclosed,
    )
    return part, message


def _split_multipart(raw: Buffer, start: int, end: int, boundary: str) -> list[tuple[int, int]] | None:
    """Byte ranges of the body parts between `--boundary` delimiter lines (RFC 2046 §5.1.1)."""
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    ranges: list[tuple[int, int]] = []
    part_start = None
    for line_start, line_end, closing in _delimiter_lines(raw, start, end, delimiter):
        if part_start is not None:
            # The CRLF before a delimiter belongs to the delimiter, not to the part.
            part_end = line_start
            if raw[part_end - 2 : part_end] == b"\r\n":
                part_end -= 2
            elif raw[part_end - 1 : part_end] == b"\n":
                part_end -= 1
            ranges.append((part_start, max(part_start, part_end)))
        if closing:
            return ranges
        part_start = line_end
    if part_start is None:
        return None
    ranges.append((part_start, end))  # no close delimiter: the last part runs to the end
    return ranges


def _delimiter_lines(raw: Buffer, start: int, end: int, delimiter: bytes) -> Iterator[tuple[int, int, bool]]:
    """(start, end, whether it closes) of each delimiter line in raw[start:end]: the delimiter
    at the start of a line, "--" after it on the close delimiter, then spaces or tabs and the
    line end (or the end of the part). A search for the delimiter, then a look at its line:
    a regular expression that tries a line start at every byte took 0.5 s for 20 MB."""
    at = start
    while True:
        found = raw.find(delimiter, at, end)
        if found < 0:
            return
        at = found + 1
        if found > 0 and raw[found - 1:found] != b"\n":
            continue
        after = found + len(delimiter)
        closing = after + 2 <= end and raw[after:after + 2] == b"--"
        if closing:
            after += 2
        while after < end:  # white space, a slice at a time (there may be a lot of it)
            piece = raw[after:min(end, after + 4096)]
            after += len(piece) - len(piece.lstrip(b" \t"))
            if piece.lstrip(b" \t"):
                break
        if after == end:
            line_end = end
        elif raw[after:after + 1] == b"\n":
            line_end = after + 1
        elif after + 2 <= end and raw[after:after + 2] == b"\r\n":
            line_end = after + 2
        else:
            continue
        yield found, line_end, closing
        at = line_end


def _content_type(message: Message, default: tuple[str, str]) -> tuple[str, str]:
    value = message.get("content-type")
    if value is None:
        return default
    ctype = message.get_content_type()  # falls back to text/plain on garbage
    if "/" not in str(value).split(";")[0]:
        return ("text", "plain")
    maintype, _, subtype = ctype.partition("/")
    return maintype.lower(), subtype.lower()


def _params(message: Message, header: str = "content-type") -> tuple[tuple[str, str], ...]:
    params = message.get_params(header=header) or []
    out = []
    for name, value in params[1:]:
        if isinstance(value, tuple):
            try:
                value = email.utils.collapse_rfc2231_value(value)
            except (LookupError, UnicodeError, ValueError):  # filename*=idna''... and the like
                value = value[2]
        out.append((name.lower(), _clean(str(value)).encode("utf-8", "replace").decode("utf-8")))
    return tuple(out)


def _count_lines(raw: Buffer, start: int, end: int) -> int:
    if isinstance(raw, bytes):
        lines = raw.count(b"\n", start, end)
    else:  # a FileView has no count(): a slice at a time, so a 25 MB part is never read whole
        lines = sum(raw[i:min(end, i + _COUNT_SLICE)].count(b"\n") for i in range(start, end, _COUNT_SLICE))
    return lines if end == start or raw[end - 1:end] == b"\n" else lines + 1


def _extension(message: Message) -> tuple[tuple | None, tuple[str, ...] | None, str | None]:
    """(disposition, language, location) of a part (RFC 3501 §7.4.2 body extension data)."""
    disposition = message.get("content-disposition")
    dispo = None
    if disposition is not None:
        kind = str(disposition).split(";")[0].strip().lower()
        dispo = (kind, _params(message, "content-disposition")) if kind else None
    language = _header(message, "content-language")
    tags = tuple(t.strip() for t in language.split(",") if t.strip()) if language else None
    return dispo, tags, _header(message, "content-location")


def _is_attachment(message: Message) -> bool:
    disposition = str(message.get("content-disposition", "")).split(";")[0].strip().lower()
    return disposition == "attachment"


def _decode_text(message: Message, body: bytes, subtype: str) -> str:
    # Only what the index keeps is decoded (the caller cuts the part): a 20 MB text part
    # costs no 20 MB string.
    encoding = (_header(message, "content-transfer-encoding") or "").lower()
    try:
        if encoding == "base64":
            data = b"".join(body.split())
            body = base64.b64decode(data[: len(data) // 4 * 4], validate=False)
        elif encoding == "quoted-printable":
            body = quopri.decodestring(body)
    except (ValueError, TypeError):
        pass
    charset = message.get_content_charset() or "utf-8"
    try:
        text = body.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):  # unknown charsets; idna and punycode raise
        text = body.decode("utf-8", "replace")
    # Lone surrogates (utf-7 can make them) cannot be stored as UTF-8.
    text = text.encode("utf-8", "replace").decode("utf-8")
    if subtype == "html":
        text = html_to_text(text)
    return text


def html_to_text(markup: str) -> str:
    """What a reader sees: inline tags vanish, blocks break lines, white space collapses,
    script and style are dropped. One pass with str.find: linear in the input, whatever
    the input (regular expressions over hostile markup can take quadratic time)."""
    lower = markup.lower()
    out: list[str] = []
    i, n = 0, len(markup)
    while i < n:
        start = markup.find("<", i)
        if start < 0:
            out.append(markup[i:])
            break
        out.append(markup[i:start])
        if markup.startswith("<!--", start):
            close = markup.find("-->", start + 4)
            i = n if close < 0 else close + 3
            continue
        end = markup.find(">", start + 1)
        if end < 0:
            break  # an unclosed tag to the end: nothing a reader would see
        tag = markup[start + 1:end].strip().lower()
        name = tag.lstrip("/").split(None, 1)[0].rstrip("/") if tag.lstrip("/") else ""
        if name in _HIDDEN_TAGS and not tag.startswith("/"):
            close = lower.find(f"</{name}", end)
            end = n if close < 0 else markup.find(">", close)
            end = n if end < 0 else end
        elif name in _BLOCK_TAGS:
            out.append("\n")
        i = end + 1
    text = html.unescape("".join(out)).replace("\xa0", " ")
    return "\n".join(line.strip() for line in _SPACES.sub(" ", text).split("\n") if line.strip())


def envelope(message: Message) -> Envelope:
    """The IMAP ENVELOPE fields, raw (as in the header, for IMAP) and decoded (for people)."""
    def value(name: str) -> str | None:
        found = message.get(name)
        return _clean(str(found)) if found is not None else None

    def addresses(name: str) -> tuple[EnvelopeAddress, ...] | None:
        found = value(name)
        return _addresses(found) if found is not None else None

    subject = value("subject")
    from_ = addresses("from")
    # RFC 3501 §7.4.2: a missing Sender or Reply-To is taken from From.
    return Envelope(
        date=value("date"), subject=subject, from_=from_, sender=addresses("sender") or from_,
        reply_to=addresses("reply-to") or from_, to=addresses("to"), cc=addresses("cc"), bcc=addresses("bcc"),
        in_reply_to=value("in-reply-to"), message_id=value("message-id"),
        subject_text=decode_words(subject) if subject is not None else None,
    )


# One plain mailbox, the form most headers hold: `local@domain`, `<local@domain>`,
# `"Any Name" <local@domain>` or `Plain Words <local@domain>`; dot-atoms only, no comment,
# quoted-pair or route. It reads as the general parser below reads it (tests/test_mime.py
# compares the two), at a tenth of the cost: that parser walks the value a character at a
# time in Python, then hands it to the stdlib's, and a delivery parses each of its address
# fields there twice (ENVELOPE, and the text SEARCH matches).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_MAILBOX = re.compile(
    rf'[ \t]*(?:(?:"([^"\\\r\n]*)"[ \t]*|([A-Za-z0-9]+(?: [A-Za-z0-9]+)*) )?<({_ATOM}(?:\.{_ATOM})*)@'
    rf'([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>|({_ATOM}(?:\.{_ATOM})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))[ \t]*')


def _addresses(value: str) -> tuple[EnvelopeAddress, ...]:
    """Address structures as IMAP's ENVELOPE lists them, groups included (RFC 3501 §7.4.2):
    a group opens with (None, None, group name, None) and closes with (None, None, None, None)."""
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple is not None:
        quoted, words, mailbox, host, bare_mailbox, bare_host = simple.groups()
        if bare_mailbox is not None:
            return (EnvelopeAddress(None, None, bare_mailbox, bare_host),)
        return (EnvelopeAddress(quoted or words or None, None, mailbox, host),)
    return _listed_addresses(value)


def _listed_addresses(value: str) -> tuple[EnvelopeAddress, ...]:
    """_addresses() for any value: lists, groups, comments, routes, quoted pairs."""
    out: list[EnvelopeAddress] = []
    start = 0  # of the text not yet handed to getaddresses
    last_comma = -1  # the last top-level comma outside a group, since `start`
    in_group = False
    quoted = angle = False
    comment = 0
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\" and (quoted or comment):
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(c, 0)
        elif c == '"':
            quoted = True
        elif c == "(":
            comment = 1
        elif angle:
            angle = c != ">"
        elif c == "<":
            angle = True
        elif c == "," and not in_group:
            last_comma = i
        elif c == ":" and not in_group:
            if last_comma >= 0:
                out.extend(_mailboxes(value[start:last_comma]))
            name = " ".join(value[last_comma + 1 if last_comma >= 0 else start:i].split())
            out.append(EnvelopeAddress(None, None, email.utils.unquote(name), None))
            in_group, start, last_comma = True, i + 1, -1
        elif c == ";" and in_group:
            out.extend(_mailboxes(value[start:i]))
            out.append(_GROUP_END)
            in_group, start = False, i + 1
        i += 1
    out.extend(_mailboxes(value[start:]))
    if in_group:  # an unterminated group ends with the header
        out.append(_GROUP_END)
    return tuple(out)


_GROUP_END = EnvelopeAddress(None, None, None, None)


# An obsolete source route in an angle-addr (RFC 5322 §4.4 obs-route: "<@a,@b:user@host>"),
# which the stdlib parser drops and ENVELOPE shows as the address's adl (RFC 3501 §7.4.2).
_ROUTE = re.compile(r"<\s*(@[^<>:\"()]*?)\s*:\s*([^<>\"()]*?)\s*>")


def _mailboxes(value: str) -> list[EnvelopeAddress]:
    if "(" in value:
        value = _without_comments(value)
    routes: dict[str, str] = {}
    seen = [0, 0]  # how far quotes were counted, and how many (matches come in order: linear)

    def unroute(match: re.Match) -> str:
        seen[1] += value.count('"', seen[0], match.start())
        seen[0] = match.start()
        if seen[1] % 2:  # inside a quoted display name: text, not an address
            return match.group(0)
        routes.setdefault(match.group(2), " ".join(match.group(1).split()))
        return f"<{match.group(2)}>"

    out: list[EnvelopeAddress] = []
    for name, addr in email.utils.getaddresses([_ROUTE.sub(unroute, value) if "<" in value else value]):
        if not addr and not name:
            continue
        mailbox, at, host = addr.rpartition("@")
        if not at:
            mailbox, host = addr, ""
        out.append(EnvelopeAddress(name or None, routes.get(addr), mailbox or None, host))
    return out


def _without_comments(value: str) -> str:
    """A mailbox list with the comments that are not a name taken out (RFC 5322 §3.4: CFWS
    may sit between any two tokens of an address, and is no part of it). In a name-addr
    (`Name <addr>`) every comment goes, in the address and in the phrase alike; in a bare
    addr-spec, those inside it go and those after it stay, for the stdlib parser to take
    as the name, the old convention (`user@host (Real Name)`). Each comment becomes a space:
    `<user (c)@ (c) domain.org>` is `user@domain.org` with no name, as Dovecot reads it,
    rather than the stdlib's made-up name " (c c)". One pass, however deep the nesting."""
    out: list[str] = []
    pieces: list[tuple[str, bool]] = []  # the current mailbox's text, (piece, is a comment)
    angle = quoted = False
    depth = start = 0

    def piece(end: int, comment: bool) -> None:
        nonlocal start
        if start < end:
            pieces.append((value[start:end], comment))
        start = end

    def mailbox_done() -> None:
        named = any(not comment and "<" in text for text, comment in pieces)
        last_word = max((k for k, (text, comment) in enumerate(pieces) if not comment and text.strip()), default=-1)
        out.extend(" " if comment and (named or k < last_word) else text for k, (text, comment) in enumerate(pieces))
        pieces.clear()

    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\" and (quoted or depth):
            i += 2
            continue
        if quoted:
            quoted = c != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(c, 0)
            if not depth:
                piece(i + 1, True)
        elif c == "(":
            piece(i, False)
            depth = 1
        elif c == '"':
            quoted = True
        elif angle:
            angle = c != ">"
        elif c == "<":
            angle = True
        elif c == ",":
            piece(i, False)
            mailbox_done()
            out.append(",")
            start = i + 1
        i += 1
    piece(n, depth > 0)  # an unclosed comment runs to the end
    mailbox_done()
    return "".join(out)


def address_text(value: str) -> str:
    """An address header as SEARCH FROM/TO/CC/BCC match it (RFC 3501 §6.4.4): each name
    (decoded) with its mailbox@host, and group names; comments, quotes and folding gone, so
    `user@domain.org` finds `<user (c)@ (c) domain.org>`. A value that is not a list of
    addresses (`Foo Bar`, no address at all) is matched as it is written."""
    shown = []
    for address in _addresses(value):
        if address.host is None:  # a group's start, with its name, or its end
            if address.mailbox is not None:
                shown.append(decode_words(address.mailbox))
            continue
        if not address.host or address.mailbox is None:
            return decode_words(value)
        spec = f"{address.mailbox}@{address.host}"
        shown.append(f"{decode_words(address.name)} <{spec}>" if address.name else spec)
    return ", ".join(shown)


def decode_words(value: str) -> str:
    """RFC 2047 encoded-words to text; garbage stays as it is."""
    if "=?" not in value:  # every encoded-word starts so (RFC 2047 §2): nothing to decode
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value


def _decoded_headers_text(message: Message) -> str:
    parts = []
    for name in INDEXED_FIELDS:
        for value in message.get_all(name, []):
            parts.append(decode_words(_clean(str(value))))
    return "\n".join(parts)


def _sent(message: Message) -> tuple[float | None, int | None]:
    """The Date: header as (a timestamp, None without a zone; its own calendar day, as days
    since 1970-01-01: RFC 3501's SENT* keys compare that, "disregarding time and timezone")."""
    value = message.get("date")
    if value is None:
        return None, None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
        day = parsed.date().toordinal() - _EPOCH_ORDINAL
    except (TypeError, ValueError, IndexError, OverflowError):
        return None, None
    if parsed.tzinfo is None:
        return None, day
    try:
        return parsed.timestamp(), day
    except (ValueError, OverflowError):
        return None, day


def _header(message: Message, name: str) -> str | None:
    value = message.get(name)
    return _clean(str(value)) if value is not None else None


def _clean(value: str) -> str:
    """Unfold a header value: CRLF + whitespace becomes the whitespace (RFC 5322 §2.2.3)."""
    if "\n" in value:  # _parse_part has unfolded the header already: nearly never
        value = _FOLD.sub("", value)
    return value.strip()
