"""FETCH data items of one message (RFC 3501 §6.4.5, §7.4.2), rendered as bytes from what
the store cached at delivery — the envelope and the MIME structure with byte offsets
(storage/mime.py) — and from the byte ranges of the message file a section needs. A
message is never parsed again here.

    render(info, items, open_file) -> b'UID 5 FLAGS (\\Seen) BODY[1] {12}\\r\\n...'

is the content of `* <seq> FETCH (...)`, items in the order asked. The file is opened at
most once per call, and only when an item needs the message's bytes; every section reads
only its own byte range (a 20 MB message's BODY[HEADER] reads the header).

Section rules, following Dovecot where RFC 3501 leaves room:
- Part numbers walk multiparts; a non-multipart part (the message itself included) is its
  own part 1; a number after a message/rfc822 part walks the enclosed message, so
  `2.HEADER` / `2.TEXT` / `2.1` address the message inside part 2.
- HEADER, HEADER.FIELDS(.NOT) and TEXT after a part number need a message/rfc822 part;
  `n.MIME` is the part's own header. Header sections end with the blank line when the
  part has one (§6.4.5: not for a message with no body and no blank line). Header lines
  come out exactly as stored, continuation lines included.
- A section that does not exist is the empty string (RFC 3501 defines no error for it;
  Dovecot answers an empty string too). Empty data goes out as `""`, as Crispin
  recommends, rather than Dovecot's `{0}`; any other section data is a literal, bytes
  exactly as stored, NUL included.
- `<origin.count>` answers `BODY[spec]<origin>` with at most `count` octets; an origin
  beyond the end gives "".
- RFC822, RFC822.HEADER and RFC822.TEXT are BODY[], BODY.PEEK[HEADER] and BODY[TEXT]
  under their own names.

BODYSTRUCTURE follows RFC 3501 §7.4.2 with Dovecot's choices: a text part without a
charset parameter shows ("charset" "us-ascii") (the RFC 2045 default), a multipart
without parts shows an empty text/plain part, a missing domain shows "MISSING_DOMAIN"
(host NIL would mean a group).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

from imapd.decoding import decode
from imapd.responses import NIL, astring, date_time, flag_list, nstring, number, string
from imapd.syntax import FetchItem, Section
from storage import BodyPart, MessageInfo
from storage import imap_envelope as envelope

SEEN_SETTING = frozenset({"RFC822", "RFC822.TEXT"})  # and BODY[...] without PEEK
_RFC822_SECTIONS = {"RFC822": Section(), "RFC822.HEADER": Section(text="HEADER"),
                    "RFC822.TEXT": Section(text="TEXT")}
_MESSAGE_SUBTYPES = ("rfc822", "global")
_EMPTY_ENVELOPE = b"(" + b" ".join([NIL] * 10) + b")"


# Items answered from the index alone, never from the message file: a FETCH of only these
# reads no file, so it is done in big batches (imapd.selected). An item not listed here is
# taken to need the file.
INDEX_ITEMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ", "ENVELOPE", "BODYSTRUCTURE"})


def index_only(items: Iterable[FetchItem]) -> bool:
    """Whether these items are all answered from the index (BODY without a section is the
    structure; with one it is the file's bytes)."""
    return all(item.name in INDEX_ITEMS or (item.name == "BODY" and item.section is None) for item in items)


def sets_seen(items: Iterable[FetchItem]) -> bool:
    """Whether fetching these items sets \\Seen (RFC 3501 §6.4.5): BODY[...] without PEEK,
    RFC822 and RFC822.TEXT. The session stores the flag and adds FLAGS to the response if
    it was not asked for."""
    return any(item.name in SEEN_SETTING or (item.name in ("BODY[]", "BINARY[]") and not item.peek)
               for item in items)


def render(info: MessageInfo, items: Iterable[FetchItem], open_file: Callable[[], BinaryIO], *,
           recent: bool = False) -> bytes:
    """The FETCH data of one message, `ITEM value ITEM value ...`, without the parentheses.
    `open_file` gives the message's bytes (Store.open_message); it is called at most once,
    only if an item needs them, and the file is closed before returning. `recent` adds
    \\Recent to FLAGS (a session's notion, not the store's). ValueError for an item name
    that is not a FETCH item."""
    pieces: list[bytes] = []
    reader = _Reader(open_file)
    try:
        for item in items:
            if pieces:
                pieces.append(b" ")
            _render_item(info, item, reader, recent, pieces)
    finally:
        reader.close()
    return b"".join(pieces)  # the only copy of section data


def _render_item(info: MessageInfo, item: FetchItem, reader: _Reader, recent: bool, out: list[bytes]) -> None:
    name = item.name
    if name == "UID":
        out.append(b"UID %d" % info.uid)
    elif name == "FLAGS":
        out.append(b"FLAGS " + flag_list(info.flags + (("\\Recent",) if recent else ())))
    elif name == "INTERNALDATE":
        out.append(b"INTERNALDATE " + date_time(info.internal_date))
    elif name == "RFC822.SIZE":
        out.append(b"RFC822.SIZE %d" % info.size)
    elif name == "MODSEQ":
        out.append(b"MODSEQ (%d)" % info.modseq)  # RFC 7162 §3.1.4.1
    elif name == "EMAILID":
        out.append(b"EMAILID (" + info.email_id.encode("ascii") + b")")  # RFC 8474 §5.1
    elif name == "THREADID":
        out.append(b"THREADID NIL")  # RFC 8474 §5.2: threads are not kept
    elif name == "PREVIEW":
        out.append(b"PREVIEW " + nstring(info.preview))  # RFC 8970 §3: NIL when LAZY found none made
    elif name == "SAVEDATE":
        saved = info.saved if info.saved is not None else info.internal_date
        out.append(b"SAVEDATE " + date_time(saved))  # RFC 8514 §3
    elif name == "ENVELOPE":
        text = info.envelope_text  # rendered at delivery; None in a record from before that
        out.append(b"ENVELOPE " + (text.encode() if text is not None else envelope(info.envelope)))
    elif name == "BODY" and item.section is None:
        out.append(b"BODY " + body_structure(info.structure, extended=False))
    elif name == "BODYSTRUCTURE":
        out.append(b"BODYSTRUCTURE " + body_structure(info.structure, extended=True))
    elif name in _RFC822_SECTIONS:
        out.append(name.encode("ascii") + b" ")
        _append_data(out, _section_data(info, _RFC822_SECTIONS[name], None, reader))
    elif name == "BODY[]" and item.section is not None:
        label = b"BODY[" + section_spec(item.section) + b"]"
        if item.partial is not None:
            label += b"<%d>" % item.partial[0]
        out.append(label + b" ")
        _append_data(out, _section_data(info, item.section, item.partial, reader))
    elif name == "BINARY[]" and item.section is not None:
        label = b"BINARY[" + section_spec(item.section) + b"]"
        data = _binary_data(info, item.section, reader)
        if item.partial is not None:
            label += b"<%d>" % item.partial[0]
            data = data[item.partial[0]:item.partial[0] + item.partial[1]]
        out.append(label + b" ")
        _append_data(out, data, binary=True)
    elif name == "BINARY.SIZE" and item.section is not None:
        size = len(_binary_data(info, item.section, reader))
        out.append(b"BINARY.SIZE[" + section_spec(item.section) + b"] %d" % size)
    else:
        raise ValueError(f"not a FETCH item: {name}")


def _binary_data(info: MessageInfo, section: Section, reader: _Reader) -> bytes:
    """BINARY[part]: the part's body decoded (imapd.decoding); the whole message, or a
    multipart or message part, as stored (RFC 3516 §4.2: only a leaf has an encoding to
    undo). UnknownEncodingError for an encoding it cannot undo."""
    if not section.part:
        return reader.read(0, info.size)
    part = find_part(info.structure, section.part)
    if part is None:
        return b""
    data = reader.read(*part.body)
    if part.parts is not None or part.message is not None:
        return data
    return decode(data, part.encoding)


def _append_data(out: list[bytes], data: bytes, binary: bool = False) -> None:
    if data:
        # RFC 3516 §4.2: decoded data with a NUL goes out as a literal8.
        out.append(b"~{%d}\r\n" % len(data) if binary and b"\0" in data else b"{%d}\r\n" % len(data))
        out.append(data)
    else:
        out.append(b'""')


def section_spec(section: Section) -> bytes:
    """The section as the response names it: `1.2.HEADER.FIELDS (From "X-Odd(")`."""
    spec = b".".join(b"%d" % n for n in section.part)
    if section.text:
        spec += (b"." if spec else b"") + section.text.encode("ascii")
    if section.text.startswith("HEADER.FIELDS"):
        spec += b" (" + b" ".join(astring(f) for f in section.fields) + b")"
    return spec


# -- sections -----------------------------------------------------------------------------


class _Reader:
    """Byte ranges of one message file, opened on first use."""

    def __init__(self, open_file: Callable[[], BinaryIO]):
        self._open = open_file
        self._file: BinaryIO | None = None

    def read(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        if self._file is None:
            self._file = self._open()
        self._file.seek(start)
        return self._file.read(end - start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def find_part(structure: BodyPart, path: tuple[int, ...]) -> BodyPart | None:
    """The part a section's part numbers name (RFC 3501 §6.4.5), None if there is none."""
    part = structure
    for depth, number_ in enumerate(path):
        more = depth + 1 < len(path)
        children = part.parts
        if children is not None:
            if not 1 <= number_ <= len(children):
                return None
            part = children[number_ - 1]
        elif number_ != 1 or (more and part.message is None):
            return None  # a leaf is only its own part 1; only a message goes deeper
        if more and part.message is not None:
            part = part.message.structure
    return part


def section_data(info: MessageInfo, section: Section, partial: tuple[int, int] | None,
                 open_file: Callable[[], BinaryIO]) -> bytes:
    """BODY[section]<partial>'s bytes (CATENATE's URLs read them too: imapd/catenate.py)."""
    reader = _Reader(open_file)
    try:
        return _section_data(info, section, partial, reader)
    finally:
        reader.close()


def _section_data(info: MessageInfo, section: Section, partial: tuple[int, int] | None, reader: _Reader) -> bytes:
    part = find_part(info.structure, section.part)
    if part is None:
        return b""
    text = section.text
    if section.part and text not in ("", "MIME"):  # HEADER..., TEXT: of an enclosed message
        inner = part.message
        if inner is None:
            return b""
        part = inner.structure
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        (start, header_end), body_start = part.header, part.body[0]
        names = {f.encode("utf-8").lower() for f in section.fields}
        data = (filter_header(reader.read(start, header_end), names, keep=text == "HEADER.FIELDS")
                + reader.read(header_end, body_start))  # the blank line, if the part has one
        return data if partial is None else data[partial[0]:partial[0] + partial[1]]
    if text == "":
        start, end = (0, info.size) if not section.part else part.body
    elif text == "TEXT":
        start, end = part.body
    elif text == "HEADER":
        start, end = part.header[0], part.body[0]
    elif text == "MIME" and section.part:
        start, end = part.header[0], part.body[0]
    else:
        return b""
    if partial is not None:
        start = min(start + partial[0], end)
        end = min(start + partial[1], end)
    return reader.read(start, end)


def filter_header(header: bytes, names: set[bytes], keep: bool) -> bytes:
    """The header lines (with their continuation lines) whose field name is in `names`
    (lower case) when `keep`, else those whose name is not; bytes as they are."""
    out: list[bytes] = []
    include = not keep  # continuation lines before any field belong to no named field
    lines = header.split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if i < last:
            line += b"\n"
        elif not line:
            break
        if line[:1] in (b" ", b"\t"):
            if include:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        include = (name in names) == keep
        if include:
            out.append(line)
    return b"".join(out)


# -- ENVELOPE and BODYSTRUCTURE -----------------------------------------------------------


def body_structure(part: BodyPart, *, extended: bool) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not) of a cached structure (RFC 3501 §7.4.2)."""
    if part.parts is not None:
        children = b"".join(body_structure(child, extended=extended) for child in part.parts)
        fields = [string(part.subtype)]
        if extended:
            ext = part.extension
            fields += [_params(part.params)]
            fields += ([_disposition(ext.disposition), _language(ext.language), nstring(ext.location)]
                       if ext is not None else [NIL, NIL, NIL])
        return b"(" + (children or _empty_part(extended)) + b" " + b" ".join(fields) + b")"
    kind, subtype = part.type, part.subtype
    params = part.params
    if kind == "text" and not any(name.lower() == "charset" for name, _ in params):
        params = (*params, ("charset", "us-ascii"))
    fields = [string(kind), string(subtype), _params(params), nstring(part.id),
              nstring(part.description), string(part.encoding or "7BIT"), number(part.size)]
    if kind == "message" and subtype in _MESSAGE_SUBTYPES:
        inner = part.message
        if inner is not None:
            fields += [envelope(inner.envelope), body_structure(inner.structure, extended=extended)]
        else:  # nested beyond storage.mime.MAX_DEPTH: not parsed
            fields += [_EMPTY_ENVELOPE, _empty_part(extended)]
        fields.append(number(part.lines))
    elif kind == "text":
        fields.append(number(part.lines))
    if extended:
        fields += [nstring(part.md5), _disposition(part.disposition),
                   _language(part.language), nstring(part.location)]
    return b"(" + b" ".join(fields) + b")"


def _empty_part(extended: bool) -> bytes:
    return b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 0 0' + (b" NIL NIL NIL NIL)" if extended
                                                                           else b")")


def _params(params: tuple[tuple[str, str], ...]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(string(value) for pair in params for value in pair) + b")"


def _disposition(disposition: tuple[str, tuple[tuple[str, str], ...]] | None) -> bytes:
    if not disposition:
        return NIL
    kind, params = disposition
    return b"(" + string(kind) + b" " + _params(params) + b")"


def _language(tags: tuple[str, ...] | None) -> bytes:
    if not tags:
        return NIL
    return b"(" + b" ".join(string(tag) for tag in tags) + b")"
