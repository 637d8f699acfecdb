"""DKIM verification (RFC 6376 §6) of every DKIM-Signature of a message that MessageScan
read, with ed25519-sha256 beside rsa-sha256 (RFC 8463).

dkimpy checks the signatures, but it wants the whole message to hash its body. As for
signing (policy/dkim.py), it is given the header section alone: the body hash each
signature asks for was computed as the message streamed by (policy/message_scan.py), and
_StreamedBodyMixin compares it with bh= in place of dkimpy's own body step
(verify_sig_process: the body hash first, as dkimpy does, then dkimpy's header check with
bh= taken out of its tag dict, so it has no body to hash; bh= stays in the signed field).

Keys are fetched through the policy Resolver, all at once, before dkimpy runs; dkimpy gets
them from a dnsfunc that answers from what was fetched. Its RSA check goes to OpenSSL
(policy/dkimpy_speed.py; 210-360 us a 2048-bit signature in all), except for the keys whose
verdict only dkimpy's own pure-Python pow() gives (up to ~6 ms within the bounds below).
Up to INLINE_SIGNATURES signatures are
checked on the event loop: the hop to the caller's `run_blocking` (a thread pool) and back
cost the loop about as much under load (0.45-0.5 ms, measured for the rate tables), and a
thread holds the GIL for pure-Python work anyway. More signatures go to the thread, where
the loop gets the GIL back between them.

dkimpy's work is bounded before it runs, because a pure-Python computation holds the GIL
(and so the event loop) whichever thread it runs in:
- RSA keys are 1024-4096 bits (RFC 8301 §3.2) with a public exponent 3 .. 2^32-1: dkimpy's
  pow() with a 12288-bit modulus and exponent took 4.8 s a signature ("RSA key of N bits").
  Within these limits a signature costs at most ~6 ms, when dkimpy's own check runs.
- A signature field is at most MAX_SIGNATURE_LENGTH bytes, has no whitespace run over
  MAX_WHITESPACE_RUN (dkimpy's b= regex backtracks over folding whitespace: 15 KB of it took
  1.8 s, quadratic; its h= split too) and names at most MAX_SIGNED_FIELDS fields in h=.
- dkimpy is given only the header fields the signatures select (select_fields), parsed here
  in linear time (header_fields): its parser is quadratic in the lines of a folded field
  (320 KB took 2.2 s) and its select_headers scans every field for each name in h= (300 KB of
  fields and as many names took 83 s).

Results (RFC 8601 §2.7.1): pass; fail when the body hash or the signature does not match,
and for rsa-sha1, which RFC 8301 §3.1 says verifiers must not accept ("rsa-sha1 not
accepted"); permerror for a signature that cannot be read, no key or a revoked, malformed,
too small or too large (RFC 8301 §3.2: 1024-4096 bits) or mismatched one (RFC 6376 §6.1.2),
and a signature field past the bounds above; temperror when DNS did not answer for the key.
The fields after the first MAX_SIGNATURES get one permerror result between them ("N more
signatures not checked"), so that the results, our Authentication-Results: field and the log
line stay bounded whatever the header holds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable

import dkim
import dkim.util

from policy import dkimpy_speed
from policy.dkim_body import BodySpec
from policy.evidence import DKIMResult
from policy.message_scan import MAX_SIGNATURES, MessageScan, spec_of
from policy.resolver import NODATA, NXDOMAIN, OK, Resolver

dkimpy_speed.install()

RunBlocking = Callable[..., Awaitable]
# dkimpy logs a failed check at ERROR on the "dkimpy" logger; our results say it instead,
# in the message's one log line. A logger of its own, outside logging's tree, disabled.
QUIET = logging.Logger("postroom.policy.dkimpy", logging.CRITICAL + 1)
_WSP = re.compile(rb"\s+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?")
_LINE_END = re.compile(rb"\r?\n")  # as dkimpy's rfc822_parse splits lines
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")  # as dkimpy's rfc822_parse reads a name
MAX_SIGNED_FIELDS = 64  # names in h=; signers name 5-40 (rspamd's oversigning ~40)
MAX_SIGNATURE_LENGTH = 16 << 10  # a 4096-bit b=, 64 names and the rest fit in ~4 KiB
MAX_WHITESPACE_RUN = 64  # folding is CRLF and a few WSP
INLINE_SIGNATURES = 2  # checked on the loop; most mail has one or two (its author's, an ESP's)
RSA_MAX_BITS = 4096  # RFC 8301 §3.2
RSA_MAX_EXPONENT = (1 << 32) - 1  # keys use 65537 (or 3); pow() with it costs ~6 ms at 4096 bits


class _StreamedBodyMixin:
    """A dkimpy DKIM or ARC object given header fields only (header_fields, select_fields):
    the body hash each signature asks for comes from `digests` (BodySpec -> digest),
    computed as it streamed."""

    def __init__(self, fields: list[tuple[bytes, bytes]], digests: dict[BodySpec, bytes], **kwargs):
        super().__init__(None, **kwargs)
        self.headers = fields  # what dkimpy's set_message would have parsed, in linear time
        self._digests = digests

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        if b"bh" in sig:
            spec = spec_of(sig, default_c=b"simple/simple")  # ARC: dkimpy has set c= already
            computed = self._digests.get(spec) if spec is not None else None
            if computed is None:
                raise dkim.MessageFormatError("no body hash for this signature")
            try:
                expected = base64.b64decode(_WSP.sub(b"", sig[b"bh"]), validate=True)
            except (binascii.Error, ValueError):
                raise dkim.MessageFormatError("bh= is not base64") from None
            if computed != expected:
                raise dkim.ValidationError("body hash mismatch")
            sig = {tag: value for tag, value in sig.items() if tag != b"bh"}
        # dkimpy canonicalizes all of self.headers for each signature: give it this one's
        # fields only (50 ARC seals each canonicalized a 900 KB To: that only the AMS signs).
        every = self.headers
        self.headers = select_fields(every, [include_headers], {})
        try:
            return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        finally:
            self.headers = every


class _StreamedDKIM(_StreamedBodyMixin, dkim.DKIM):
    pass


async def verify_dkim(scan: MessageScan, resolver: Resolver,
                      run_blocking: RunBlocking | None = None) -> list[DKIMResult]:
    """One DKIMResult per DKIM-Signature field, top to bottom (none for an unsigned
    message). `run_blocking(fn, *args)` runs the cryptography of more than INLINE_SIGNATURES
    signatures off the loop; None runs it all here."""
    if scan.header is None or not scan.dkim_values:
        return []
    results: list[DKIMResult | None] = []
    jobs: list[tuple[int, dict[bytes, bytes], str]] = []
    for value in scan.dkim_values[:MAX_SIGNATURES]:
        problem = field_problem(value)
        if problem:
            results.append(DKIMResult("permerror", "", "", reason=f"signature syntax: {problem}"))
            continue
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as e:
            results.append(DKIMResult("permerror", "", "", reason=f"signature syntax: {e}"[:200]))
            continue
        problem = signed_names_problem(tags)
        if problem:
            results.append(_result(tags, "permerror", problem))
            continue
        if _tag(tags, b"a").lower() == "rsa-sha1":
            results.append(_result(tags, "fail", "rsa-sha1 not accepted (RFC 8301)"))
            continue
        name = key_name(tags)
        if name is None:
            results.append(_result(tags, "permerror", "signature syntax: bad d= or s="))
            continue
        jobs.append((len(results), tags, name))
        results.append(None)
    names = sorted({name for _, _, name in jobs})
    answers = dict(zip(names, await asyncio.gather(*(resolver.txt(name) for name in names)), strict=True))
    checks = []
    for index, tags, name in jobs:
        answer = answers[name]
        if answer.status == OK and answer.records:
            checks.append((index, tags, name, answer.records))
        elif answer.status in (NXDOMAIN, NODATA, OK):
            results[index] = _result(tags, "permerror", "no key")
        else:
            results[index] = _result(tags, "temperror", "key lookup failed (DNS)")
    if checks:
        work = [(index, name, records) for index, _, name, records in checks]
        if run_blocking is None or len(work) <= INLINE_SIGNATURES:
            verdicts = _verify_all(scan.header, scan.body_hashes, work)
        else:
            verdicts = await run_blocking(_verify_all, scan.header, scan.body_hashes, work)
        for (index, tags, _, _), (result, reason) in zip(checks, verdicts, strict=True):
            results[index] = _result(tags, result, reason)
    unchecked = len(scan.dkim_values) - MAX_SIGNATURES
    if unchecked > 0:
        results.append(DKIMResult("permerror", "", "", reason=f"{unchecked} more signatures not checked"))
    return [result for result in results if result is not None]


def key_name(tags: dict[bytes, bytes]) -> str | None:
    """`s._domainkey.d` (RFC 6376 §3.6.2.1) in lowercase, or None when s= or d= is not a
    domain name DNS can be asked about."""
    selector, domain = _tag(tags, b"s").lower(), _tag(tags, b"d").lower().rstrip(".")
    name = f"{selector}._domainkey.{domain}"
    if not selector or not domain or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def _verify_all(header: bytes, digests: dict[BodySpec, bytes],
                checks: list[tuple[int, str, tuple[bytes, ...]]]) -> list[tuple[str, str]]:
    """(result, reason) for each signature (index into the DKIM-Signature fields, key
    name, key records): dkimpy's checks, blocking."""
    try:
        fields = header_fields(header)
    except dkim.MessageFormatError as e:  # as dkimpy's parser refuses junk header lines
        return [("permerror", f"header section unreadable: {e}"[:200])] * len(checks)
    signatures = [value for name, value in fields if name.lower() == b"dkim-signature"]
    signed = [_signed_names_at(signatures, index) for index, _, _ in checks]
    verifier = _StreamedDKIM(select_fields(fields, signed, {b"dkim-signature": MAX_SIGNATURES}), digests,
                             logger=QUIET)
    return [_verify_one(verifier, index, name, records) for index, name, records in checks]


def _signed_names_at(signatures: list[bytes], index: int) -> list[bytes]:
    """h= of the index-th DKIM-Signature as dkimpy reads the fields; [] when dkimpy finds no
    such signature or cannot read it (verify_headerprep then says so)."""
    try:
        return signed_names(dkim.util.parse_tag_value(signatures[index]))
    except (IndexError, dkim.util.InvalidTagValueList):
        return []


def _verify_one(verifier: _StreamedDKIM, index: int, name: str, records: tuple[bytes, ...]) -> tuple[str, str]:
    try:
        prep = verifier.verify_headerprep(index)
    except (dkim.DKIMException, ValueError, KeyError, IndexError) as e:
        return "permerror", f"signature syntax: {e}"[:200]
    if not prep:
        return "permerror", "signature not found"
    sig, include_headers, sig_headers = prep
    record, problem = _usable_key(name, records, sig)
    if record is None:
        return "permerror", problem
    try:
        valid = verifier.verify_sig(sig, include_headers, sig_headers[index], lambda _name, timeout=0: record)
    except dkim.ValidationError as e:
        return "fail", str(e)[:200]
    except dkim.KeyFormatError as e:
        return "permerror", f"key: {e}"[:200]
    except Exception as e:  # noqa: BLE001 - dkimpy raises what its parts raise on junk
        return "permerror", f"{type(e).__name__}: {e}"[:200]
    return ("pass", "") if valid else ("fail", "signature did not verify")


def _usable_key(name: str, records: tuple[bytes, ...], sig: dict[bytes, bytes]) -> tuple[bytes | None, str]:
    """The first key record that dkimpy can use for this signature (RFC 6376 §6.1.2: a
    verifier may try each), or None and why not."""
    problem = "no key"
    algorithm = _WSP.sub(b"", sig.get(b"a", b"")).lower()
    for record in records:
        try:
            tags = dkim.util.parse_tag_value(record)
        except dkim.util.InvalidTagValueList:
            problem = "key record syntax"
            continue
        if not _WSP.sub(b"", tags.get(b"p", b"")):
            problem = "key revoked"  # an empty p= (RFC 6376 §3.6.1)
            continue
        try:
            key, bits, ktag, _ = dkim.evaluate_pk(name, record)
        except Exception as e:  # noqa: BLE001 - KeyFormatError, binascii.Error, nacl errors
            problem = f"bad key: {e}"[:200]
            continue
        if ktag == b"rsa" and (too_costly := rsa_key_problem(key, bits)):
            problem = too_costly
            continue
        if not algorithm.startswith(ktag + b"-"):
            problem = f"key is k={ktag.decode()} for a={algorithm.decode(errors='replace')}"
            continue
        hashes = tags.get(b"h")
        if hashes is not None and algorithm.split(b"-")[-1] not in _WSP.sub(b"", hashes).lower().split(b":"):
            problem = "key does not allow this hash (h=)"
            continue
        return record, ""
    return None, problem


def rsa_key_problem(key: dict, bits: int) -> str:
    """Why dkimpy must not be given this RSA key (dkimpy's parse: modulus, publicExponent),
    or "": over RFC 8301 §3.2's 4096 bits, or an exponent that makes pow() cost seconds."""
    if bits > RSA_MAX_BITS:  # too small is dkimpy's own KeyFormatError, after a cheap pow()
        return f"RSA key of {bits} bits, over {RSA_MAX_BITS} (RFC 8301)"
    exponent = key.get("publicExponent", 0)
    if not 3 <= exponent <= RSA_MAX_EXPONENT:
        return f"RSA public exponent of {exponent.bit_length()} bits, over 32" if exponent > 3 \
            else "RSA public exponent under 3"
    return ""


def field_problem(value: bytes) -> str:
    """Why a signature field's value (DKIM-Signature, ARC-Seal, ARC-Message-Signature) is
    refused before dkimpy reads it, or "": its regexes backtrack over long whitespace runs."""
    if len(value) > MAX_SIGNATURE_LENGTH:
        return f"field over {MAX_SIGNATURE_LENGTH} bytes"
    if any(len(run) > MAX_WHITESPACE_RUN for run in _WSP.findall(value)):
        return f"a whitespace run over {MAX_WHITESPACE_RUN} bytes"
    return ""


def signed_names(tags: dict[bytes, bytes]) -> list[bytes]:
    """h= as dkimpy reads it (split at colons with the WSP around them, lowercased)."""
    return [name.strip().lower() for name in tags.get(b"h", b"").split(b":")]


def signed_names_problem(tags: dict[bytes, bytes]) -> str:
    count = tags.get(b"h", b"").count(b":") + 1
    return f"too many signed fields ({count}, over {MAX_SIGNED_FIELDS})" if count > MAX_SIGNED_FIELDS else ""


def header_fields(section: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) of each field as dkimpy's rfc822_parse reads the header section (a line
    end is CRLF or LF; a line starting with WSP continues the field; a `From ` line is
    skipped; anything else raises MessageFormatError), in linear time: dkimpy adds each
    folded line to the value with +=, quadratic in the lines of one field. Tuples of bytes,
    which the garbage collector stops tracking, where dkimpy makes a list for each field
    (200,000 fields: 0.36 s here, 0.9 s in dkimpy)."""
    fields: list[tuple[bytes, bytes]] = []
    folds: dict[int, list[bytes]] = {}  # field index -> its value's lines, for folded fields only
    for line in _LINE_END.split(section):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not fields:
                raise dkim.MessageFormatError("the header section starts with a folded line")
            folds.setdefault(len(fields) - 1, [fields[-1][1]]).append(line)
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            fields.append((match.group(1), line[match.end():]))
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line[:80]!r}")
    for index, lines in folds.items():
        fields[index] = (fields[index][0], b"\r\n".join(lines))
    return [(name, value + b"\r\n") for name, value in fields]


def select_fields(fields: list[tuple[bytes, bytes]], signed: Iterable[list[bytes]],
                  keep_top: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The fields dkimpy needs to check signatures whose h= names are `signed`, in header
    order: of each name, as many of the bottom-most instances as one h= lists it (RFC 6376
    §5.4.2: instances are taken bottom-up), one more From (dkimpy also checks an added From),
    and the top-most keep_top[name]. dkimpy's select_headers picks from these what it would
    pick from all the fields, in O(names x kept) in place of O(names x fields)."""
    wanted: Counter[bytes] = Counter()
    for names in signed:
        counts = Counter(names)
        if b"from" in counts:
            counts[b"from"] += 1
        for name, count in counts.items():
            wanted[name] = max(wanted[name], count)
    positions: dict[bytes, list[int]] = defaultdict(list)
    for index, (name, _) in enumerate(fields):
        lower = name.lower()
        if lower in wanted or lower in keep_top:
            positions[lower].append(index)
    keep: set[int] = set()
    for name, found in positions.items():
        keep.update(found[:keep_top.get(name, 0)])
        if wanted[name]:
            keep.update(found[-wanted[name]:])
    return [fields[index] for index in sorted(keep)]


def _tag(tags: dict[bytes, bytes], name: bytes) -> str:
    return _WSP.sub(b"", tags.get(name, b"")).decode("ascii", "replace")


def _result(tags: dict[bytes, bytes], result: str, reason: str) -> DKIMResult:
    domain = _tag(tags, b"d").lower()
    identity = _tag(tags, b"i") or (f"@{domain}" if domain else "")
    return DKIMResult(result, domain, _tag(tags, b"s").lower(), algorithm=_tag(tags, b"a").lower(),
                      identity=identity, signature=_tag(tags, b"b")[:8], reason=reason)
