"""One pass over a message as the sender's bytes arrive: what the policy checks need of it,
and the bytes to store.

The header section is held (it is at most mtad's MAX_HEADER, 1 MiB; beyond MAX_HEADER_HELD
nothing more is passed on, and the caller refuses the message, as mtad does). Once it is
complete it is passed on without the Authentication-Results: fields that carry our
authserv-id (RFC 8601 §5: a receiver removes results that claim to be its own before adding
its own, or a sender could forge them), then the body goes through as it comes.

While the body passes, the hashes that its DKIM-Signature (RFC 6376 §3.7) and
ARC-Message-Signature (RFC 8617 §4.1.2) fields ask for (canonicalization, hash, l=) are
computed (policy/dkim_body.py), so verifying needs the header section and those digests,
never the message: memory is the header and a few chunks whatever the body's size, and the
work is linear in the input (the header end is looked for once over each byte).

Bounds: the body hashes of the first MAX_SIGNATURES DKIM-Signature fields are computed (the
verifier reports the rest as too many), and of the newest ARC-Message-Signature only (RFC
8617 §5.2 validates the newest AMS; older ones are optional and not checked).
"""

from __future__ import annotations

import email.headerregistry
import email.utils
import re

import dkim.util
import idna

from policy.dkim_body import MAX_HEADER_HELD, PIECE, BodyHashes, BodySpec
from policy.evidence import MessageFacts

MAX_SIGNATURES = 8  # DKIM-Signature fields verified per message
MAX_FROM_FIELDS = 8  # From: fields whose addresses are read (all are counted)
MAX_FROM_PARSED = 2000  # a longer From: value is junk: no address is read from it (the
# stdlib parsers are quadratic on some junk: 8000 quotes took 0.7 s, 2000 take 0.05 s)
ARC_MAX_INSTANCES = 50  # RFC 8617 §4.2.1
# A field name as dkimpy reads it (printable ASCII up to the colon), so that the fields
# found here are the ones dkimpy verifies; WSP before the colon is allowed (obs-optional).
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_WSP_RUN = re.compile(rb"\s+")
_TOKEN_END = re.compile(rb"[\s;()\"]")


class MessageScan:
    """Fed the message as it arrives; see the module doc. `update(chunk)` and `finish()`
    return the bytes to store; then `header`, `facts()` and `body_hashes` describe it."""

    def __init__(self, authserv_id: str):
        self.authserv_id = authserv_id
        self._id = _normal_id(authserv_id.encode("utf-8", "replace"))
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
            # RFC 8601 §5: ours, however written (case, a trailing dot, comments, quoted)
            if lower == b"authentication-results" and _authserv_id(value) == self._id:
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
        """The From: domains (each address of each From: field), and whether Message-ID:
        and Date: are there (RFC 5322 §3.6)."""
        domains = []
        for value in self._from_values[:MAX_FROM_FIELDS]:
            for domain in from_domains(value):
                if domain not in domains:
                    domains.append(domain)
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


def _authserv_id(value: bytes) -> bytes:
    """The authserv-id of an Authentication-Results: value (RFC 8601 §2.2: the first
    `value`, a token or a quoted-string, after optional CFWS), normalized for comparing."""
    text = _WSP_RUN.sub(b" ", value)
    at, depth = 0, 0
    while at < len(text):  # skip CFWS: whitespace and (nested) comments with quoted-pairs
        char = text[at:at + 1]
        if depth:
            if char == b"\\":
                at += 1
            elif char == b"(":
                depth += 1
            elif char == b")":
                depth -= 1
        elif char == b"(":
            depth = 1
        elif char != b" ":
            break
        at += 1
    if text[at:at + 1] == b'"':
        out, at = bytearray(), at + 1
        while at < len(text) and text[at:at + 1] != b'"':
            if text[at:at + 1] == b"\\":
                at += 1
            out += text[at:at + 1]
            at += 1
        return _normal_id(bytes(out))
    match = _TOKEN_END.search(text, at)
    return _normal_id(text[at:match.start() if match else len(text)])


def _normal_id(authserv_id: bytes) -> bytes:
    return authserv_id.strip().lower().rstrip(b".")


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


def from_domains(value: bytes) -> list[str]:
    """The domain of each address in a From: value (lowercase, A-labels), junk tolerated:
    an address without a domain adds nothing."""
    text = value.decode("utf-8", "replace").replace("\r\n", "")
    if len(text) > MAX_FROM_PARSED:  # the stdlib's parsers are slow (and recurse) on long junk
        return []
    # Both stdlib parsers, and every domain either finds: they disagree on junk and on some
    # obsolete syntax (a trailing dot), and for DMARC an extra domain only makes it stricter.
    addresses = []
    try:
        addresses += [a.addr_spec for a in email.headerregistry.HeaderRegistry()("from", text).addresses]
    except Exception:  # noqa: BLE001 - the parser raises many things on junk, RecursionError too
        pass
    try:
        addresses += [address for _, address in email.utils.getaddresses([text])]
    except Exception:  # noqa: BLE001
        pass
    domains = []
    for address in addresses:
        local, at, domain = address.rpartition("@")
        domain = domain.strip().rstrip(".").lower()  # a [literal] is no domain: _a_label drops it
        if at and local and domain:
            domain = _a_label(domain)
            if domain and domain not in domains:
                domains.append(domain)
    return domains


def _a_label(domain: str) -> str:
    """A domain as DNS knows it: U-labels become A-labels (IDNA 2008, UTS 46); "" for one
    that is not a domain name."""
    if domain.isascii():
        return domain if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9])?", domain) else ""
    try:
        return idna.encode(domain, uts46=True).decode().lower()
    except (idna.IDNAError, UnicodeError):
        return ""
