"""One pass over a message as the sender's bytes arrive: what the policy checks need of it,
and the bytes to store.

The header section is held (it is at most mtad's MAX_HEADER, 1 MiB; beyond MAX_HEADER_HELD
nothing more is passed on, and the caller refuses the message, as mtad does). Once it is
complete it is passed on without the Authentication-Results: fields that carry our
authserv-id (RFC 8601 §5: a receiver removes results that claim to be its own before adding
its own, or a sender could forge them), then the body goes through as it comes. "Ours" is
judged on the value as a mail reader may show it (`is_ours`: encoded-words decoded, NFKC,
white space and control characters folded), which submission uses as well.

The From: domains for DMARC are every "@domain" a reader may show (`from_domains`), found
by a linear scan, not by a parser that junk can make skip the forged one; a From: that
cannot be read (too many domains, too deep comments) gives no domain, which DMARC refuses.

While the body passes, the hashes that its DKIM-Signature (RFC 6376 §3.7) and
ARC-Message-Signature (RFC 8617 §4.1.2) fields ask for (canonicalization, hash, l=) are
computed (policy/dkim_body.py), so verifying needs the header section and those digests,
never the message: memory is the header and a few chunks whatever the body's size, and the
work is linear in the input (the header end is looked for once over each byte).

Bounds: the body hashes of the first MAX_SIGNATURES DKIM-Signature fields are computed (the
verifier reports the rest as too many), and of the newest ARC-Message-Signature only (RFC
8617 §5.2 validates the newest AMS; older ones are optional and not checked). Header values
are read with regular expressions that look at each character a bounded number of times
(MAX_NESTING passes for comments), never with the stdlib's address parsers (quadratic and
recursive on junk).
"""

from __future__ import annotations

import binascii
import codecs
import re
import unicodedata
from collections.abc import Iterable

import dkim.util
import idna

from policy.dkim_body import MAX_HEADER_HELD, PIECE, BodyHashes, BodySpec
from policy.evidence import MessageFacts

MAX_SIGNATURES = 8  # DKIM-Signature fields verified per message
MAX_FROM_DOMAINS = 16  # different words after an "@" read in all From: fields; more: unreadable
MAX_ENCODED_WORDS = 64  # RFC 2047 encoded-words decoded in one field value; more: unreadable
MAX_NESTING = 8  # comment depth read in From: and Authentication-Results:; deeper: unreadable
MAX_DOMAIN_RUN = 256  # characters after an "@" read for a domain name (one has at most 253)
ARC_MAX_INSTANCES = 50  # RFC 8617 §4.2.1
# A field name as dkimpy reads it (printable ASCII up to the colon), so that the fields
# found here are the ones dkimpy verifies; WSP before the colon is allowed (obs-optional).
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WSP_RUN = re.compile(rb"\s+")
# RFC 2047 §2 encoded-word (an RFC 2231 "*language" after the charset allowed), with the
# white space before a next one, which is not shown (§6.2). Each try stops at a "?": linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=(?:\s+(?==\?))?")
_SLOW_CODECS = frozenset({"idna", "punycode"})  # quadratic decoders, never a mail charset
_QUOTED_SPECIAL = re.compile(r'\\[()"\\]')
_COMMENT = re.compile(r"\([^()]*\)")  # an innermost comment, once quoted-pairs are read
_FIRST_WORD = re.compile(r" *([^ (]*)")
_SPACES = re.compile(r"  +")
# An "@" and what follows it that may spell a domain name: no space, ASCII control or ASCII
# special (RFC 5322 §3.2.3), so "-", ".", "_", letters, digits and any non-ASCII character.
_AT_RUN = re.compile(r"@ *([^\x00-\x2c/:-@\[-^`{-\x7f]+)")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class MessageScan:
    """Fed the message as it arrives; see the module doc. `update(chunk)` and `finish()`
    return the bytes to store; then `header`, `facts()` and `body_hashes` describe it."""

    def __init__(self, authserv_id: str):
        self.authserv_id = authserv_id
        self._id = _normal_id(_shown(authserv_id))
        self._held: bytearray | None = bytearray()
        self._scanned = 0  # no header end starts before this position in _held
        self.header: bytes | None = None  # the original header section, each field with its CRLF
        self.header_too_long = False  # over MAX_HEADER_HELD: nothing was passed on
        self.removed = 0  # Authentication-Results: fields with our authserv-id, removed
        # Each DKIM-Signature value as dkimpy reads it (raw, folded), top to bottom.
        self.dkim_values: list[bytes] = []
        self.arc_fields: list[tuple[bytes, bytes]] = []  # (lowercase name, raw value) of ARC fields
        self.newest_ams: tuple[int, bytes] | None = None  # (i=, raw value) of the newest AMS
        self._from_values: list[bytes] = []
        self._has_message_id = False
        self._has_date = False
        self._hashes: BodyHashes | None = None
        self._digests: dict[BodySpec, bytes] | None = None

    # -- feeding ------------------------------------------------------------------------

    def update(self, chunk: bytes | bytearray | memoryview) -> bytes:
        """The bytes of the message to store so far that were not returned yet."""
        if self._digests is not None:
            raise RuntimeError("the message is finished")
        if self._hashes is not None:
            self._hashes.update(chunk)
            return bytes(chunk)
        if self._held is None:
            return b""  # the header was too long: the message is refused, nothing is kept
        if len(chunk) > PIECE:  # held bytes grow by small pieces: the header end is found early
            view = memoryview(chunk)
            out = [self.update(view[start:start + PIECE]) for start in range(0, len(view), PIECE)]
            return b"".join(out)
        self._held += chunk
        if self._held.startswith(b"\r\n"):  # no header field at all
            return self._split(0, 2)
        end = self._held.find(b"\r\n\r\n", self._scanned)
        if end >= 0:
            return self._split(end + 2, end + 4)
        if len(self._held) > MAX_HEADER_HELD:
            self._held = None
            self.header_too_long = True
        else:
            self._scanned = max(0, len(self._held) - 3)
        return b""

    def finish(self) -> bytes:
        """The end of the message: what is still held (a message that is all header)."""
        if self._digests is not None:
            return b""
        out = b""
        if self._hashes is None and self._held is not None:
            held, self._held = bytes(self._held), None
            out = self._take_header(held)
        self._digests = self._hashes.digests() if self._hashes is not None else {}
        self._hashes = None
        return out

    @property
    def body_hashes(self) -> dict[BodySpec, bytes]:
        """Each BodySpec's digest, once finished."""
        if self._digests is None:
            raise RuntimeError("body hashes are known once the message is finished")
        return self._digests

    def _split(self, header_end: int, body_start: int) -> bytes:
        held, self._held = self._held, None
        out = self._take_header(bytes(held[:header_end]))
        body = memoryview(held)[body_start:]
        self._hashes.update(body)
        return out + bytes(held[header_end:body_start]) + bytes(body)

    def _take_header(self, header: bytes) -> bytes:
        """Keep the header section, read what the checks need, and return it without the
        forged Authentication-Results: fields."""
        self.header = header
        kept = []
        dkim_specs = []
        newest_ams = None
        for name, raw, value in _fields(header):
            lower = name.lower() if name is not None else None
            # RFC 8601 §5: ours, however written (see is_ours)
            if lower == b"authentication-results" and _claims(value, self._id):
                self.removed += 1
                continue
            kept.append(raw)
            if lower == b"dkim-signature":
                self.dkim_values.append(value)
                if len(self.dkim_values) <= MAX_SIGNATURES:
                    spec = body_spec(value, default_c=b"simple/simple")
                    if spec is not None:
                        dkim_specs.append(spec)
            elif lower in (b"arc-seal", b"arc-message-signature", b"arc-authentication-results"):
                self.arc_fields.append((lower, value))
                if lower == b"arc-message-signature":
                    instance = arc_instance(value)
                    if instance is not None and (newest_ams is None or instance > newest_ams[0]):
                        newest_ams = (instance, value)
            elif lower == b"from":
                self._from_values.append(value)
            elif lower == b"message-id":
                self._has_message_id = True
            elif lower == b"date":
                self._has_date = True
        specs = list(dkim_specs)
        if newest_ams is not None and newest_ams[0] <= ARC_MAX_INSTANCES:
            self.newest_ams = newest_ams
            spec = body_spec(newest_ams[1], default_c=b"relaxed/relaxed")
            if spec is not None:
                specs.append(spec)
        self._hashes = BodyHashes(specs)
        return header if not self.removed else b"".join(kept)

    # -- what the header says -----------------------------------------------------------

    def facts(self) -> MessageFacts:
        """The From: domains (see from_domains: none when the From: fields cannot be read),
        and whether Message-ID: and Date: are there (RFC 5322 §3.6)."""
        domains = from_domains(self._from_values) or []
        return MessageFacts(from_domains=tuple(domains), from_fields=len(self._from_values),
                            has_message_id=self._has_message_id, has_date=self._has_date)


def _fields(header: bytes):
    """(name, raw field with its CRLF, value) for each field of `header`, continuation
    lines included; name None for a line that is not a field (an mbox "From " line, junk).
    A name may have WSP before its colon (RFC 5322 §4.5.3 obs-optional): mail readers take
    "From : x" as a From: field, so the checks must too (dkimpy cannot read such a header
    section: each signature is then a permerror)."""
    start = 0
    name, value_start = None, 0
    field_start = 0
    while start < len(header):
        end = header.find(b"\r\n", start)
        end = len(header) if end < 0 else end + 2
        if header[start:start + 1] not in (b" ", b"\t") or start == 0:
            if start > field_start:
                yield name, header[field_start:start], header[value_start:start]
            field_start = start
            match = _FIELD_NAME.match(header, start, end)
            name, value_start = (match.group(1), match.end()) if match else (None, start)
        start = end
    if start > field_start:
        yield name, header[field_start:start], header[value_start:start]


def is_ours(value: bytes, authserv_id: str) -> bool:
    """Whether an Authentication-Results: value (RFC 8601 §2.2) can be read as one that
    `authserv_id` added: its authserv-id, the first word before the first ";" once the value
    is read as a mail reader may show it (see `_views`: encoded-words decoded, NFKC, white
    space and control characters folded), with comments skipped, quotes dropped, any case
    and a trailing dot. A value too odd to read (comments nested deeper than MAX_NESTING,
    more than MAX_ENCODED_WORDS encoded-words) counts as ours: RFC 8601 §5 lets a border MTA
    remove any such field, and keeping one a reader may take for ours is what must not
    happen."""
    return _claims(value, _normal_id(_shown(authserv_id)))


def without_forged_results(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """`header` without the Authentication-Results: fields that claim to be ours (is_ours),
    and how many went: for mail that does not pass through a MessageScan (submission, whose
    users could otherwise hand their recipients a "dkim=pass" in our name)."""
    ours = _normal_id(_shown(authserv_id))
    kept, removed = [], 0
    for name, raw, value in _fields(header):
        if name is not None and name.lower() == b"authentication-results" and _claims(value, ours):
            removed += 1
            continue
        kept.append(raw)
    return (b"".join(kept), removed) if removed else (header, 0)


def _claims(value: bytes, ours: str) -> bool:
    views = _views(value)
    if views is None:
        return True
    for view in views:
        stripped = _without_comments(_unquoted(view))
        if stripped is None:
            return True
        for text in (view.replace('"', " "), stripped):
            word = _FIRST_WORD.match(text.split(";", 1)[0]).group(1)
            if word and _normal_id(word) == ours:
                return True
    return False


def _normal_id(authserv_id: str) -> str:
    return authserv_id.strip().lower().rstrip(".")


def body_spec(value: bytes, *, default_c: bytes) -> BodySpec | None:
    """What a DKIM-Signature or ARC-Message-Signature value asks of the body, as dkimpy
    will read it; None when the signature cannot be read (the verifier says why)."""
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return None
    return spec_of(tags, default_c=default_c)


def spec_of(tags: dict[bytes, bytes], *, default_c: bytes) -> BodySpec | None:
    c = _WSP_RUN.sub(b"", tags.get(b"c", default_c)).lower()
    parts = c.split(b"/")
    if len(parts) > 2:
        return None
    body = parts[1] if len(parts) == 2 else b"simple"
    if body not in (b"simple", b"relaxed"):
        return None
    algorithm = _WSP_RUN.sub(b"", tags.get(b"a", b"")).lower()
    if algorithm in (b"rsa-sha256", b"ed25519-sha256"):
        name = "sha256"
    elif algorithm == b"rsa-sha1":
        name = "sha1"
    else:
        return None
    limit = None
    if b"l" in tags:
        length = _WSP_RUN.sub(b"", tags[b"l"])
        if not re.fullmatch(rb"\d{1,76}", length):
            return None
        limit = int(length)
    return BodySpec(body.decode(), name, limit)


def arc_instance(value: bytes) -> int | None:
    """The i= of an ARC field, as dkimpy finds it (the first `i=` tag)."""
    match = dkim.ARC.INSTANCE_RE.search(_WSP_RUN.sub(b" ", value))
    if match is None or len(match.group(1)) > 6:
        return None
    return int(match.group(1))


def from_domains(values: Iterable[bytes]) -> list[str] | None:
    """The domain of every "@domain" a mail reader may show in these From: values
    (lowercase, A-labels, in the order found), or None when they cannot be read.

    Not a parser: every "@" in the value is followed, wherever it is (an address, a display
    name, a comment, a quoted string, an encoded-word), in each view of the value (`_views`)
    as it is and with comments, quoting and the white space around "@" and "." taken out, so
    that no reading of junk (an unterminated quote, a comment in the domain, a forged address
    after decoys) hides a domain from DMARC: an extra domain only makes it stricter. What
    follows an "@" is read up to the first character that cannot be in a domain name; one
    that is no name (an address literal, junk) adds nothing. Unreadable: comments nested
    deeper than MAX_NESTING, more than MAX_ENCODED_WORDS encoded-words in a value, or more
    than MAX_FROM_DOMAINS different words after an "@" in all (RFC 7489 §6.6.1 allows
    refusing such a From; evaluating some of them only would let decoys hide the forgery)."""
    seen: set[str] = set()
    domains: list[str] = []
    for value in values:
        views = _views(value)
        if views is None:
            return None
        for view in views:
            stripped = _without_comments(_unquoted(view))
            if stripped is None:
                return None
            # Spaces are made single first: "x @ y" and "x . y" are then joined by replace
            # (a regex that scans a run of spaces from each of its positions is quadratic).
            stripped = _SPACES.sub(" ", stripped)
            stripped = stripped.replace(" @", "@").replace("@ ", "@").replace(" .", ".").replace(". ", ".")
            for text in (view, stripped):
                for run in dict.fromkeys(_AT_RUN.findall(text)):  # C speed whatever the count
                    run = run[:MAX_DOMAIN_RUN].lower()
                    if run in seen:
                        continue
                    if len(seen) == MAX_FROM_DOMAINS:
                        return None
                    seen.add(run)
                    domain = _domain_at(run)
                    if domain and domain not in domains:
                        domains.append(domain)
    return domains


def _domain_at(run: str) -> str:
    """The domain name that `run` (what follows an "@") starts with, as an A-label; "" for none."""
    if not run.isascii():
        for at, char in enumerate(run):  # at most MAX_DOMAIN_RUN characters
            if not char.isascii() and unicodedata.category(char)[0] not in "LMN":
                run = run[:at]  # a symbol, punctuation: the name ends before it
                break
    return _a_label(run.rstrip("."))


# -- header text as a mail reader may show it -------------------------------------------

def _views(value: bytes) -> list[str] | None:
    """A field value as mail readers may show it: unfolded and `_shown`, and also with its
    RFC 2047 encoded-words decoded (readers decode them wherever they are, not only where
    §5 allows them); None with more than MAX_ENCODED_WORDS of them."""
    text = value.decode("utf-8", "replace")
    views = [_shown(text)]
    if "=?" in text:
        decoded, count = _ENCODED_WORD.subn(_decoded_word, text, count=MAX_ENCODED_WORDS + 1)
        if count > MAX_ENCODED_WORDS:
            return None
        views.append(_shown(decoded))
    return views


def _shown(text: str) -> str:
    """NFKC (a fullwidth "＠" or "．" is "@" or "."), IDNA's ideographic full stop as ".",
    every white space character (NBSP, U+3000, \\x1c-\\x1f, CR, LF) as a space, and other
    control and format characters (NUL, zero-width ones, U+FFFD for a byte that is not
    UTF-8) removed: what a reader does not show cannot tell two values apart."""
    text = unicodedata.normalize("NFKC", text)
    table: dict[int, str | None] = {0x3002: "."}  # UTS 46 maps it to "."; NFKC does not
    for char in set(text):
        if char.isspace():
            table[ord(char)] = " "
        elif char == "\ufffd" or unicodedata.category(char)[0] == "C":
            table[ord(char)] = None
    return text.translate(table)


def _decoded_word(match: re.Match) -> str:
    """One RFC 2047 encoded-word's text; the word as it is when its encoding is broken."""
    charset, encoding, data = match.group(1).split("*", 1)[0], match.group(2).lower(), match.group(3)
    raw = data.encode("utf-8", "replace")
    try:
        if encoding == "q":
            octets = binascii.a2b_qp(raw, header=True)
        else:
            octets = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        return match.group(0)
    try:
        if codecs.lookup(charset).name in _SLOW_CODECS:
            raise LookupError(charset)
        return octets.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError, TypeError):
        return octets.decode("utf-8", "replace")


def _unquoted(text: str) -> str:
    """Quoted-pairs (RFC 5322 §3.2.1) read as their character (an escaped parenthesis,
    quote or backslash as a space: it neither opens nor closes anything), quotes as spaces."""
    return _QUOTED_SPECIAL.sub(" ", text).replace("\\", "").replace('"', " ")


def _without_comments(text: str) -> str | None:
    """`text` with its comments (RFC 5322 §3.2.2, nested) as spaces, innermost first, one
    linear pass per level; None when they nest deeper than MAX_NESTING. An unclosed "("
    stays as it is."""
    for _ in range(MAX_NESTING):
        text, found = _COMMENT.subn(" ", text)
        if not found:
            return text
    return None if _COMMENT.search(text) else text


def _a_label(domain: str) -> str:
    """A domain as DNS knows it: U-labels become A-labels (IDNA 2008, UTS 46); "" for one
    that is not a domain name (empty or overlong labels, characters no name has)."""
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode().lower()
        except (idna.IDNAError, UnicodeError):
            return ""
    domain = domain.lower()
    if len(domain) > 253 or not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        return ""
    return domain
