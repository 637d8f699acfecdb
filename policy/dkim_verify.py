"""DKIM verification (RFC 6376 §6) of every DKIM-Signature of a message that MessageScan
read, with ed25519-sha256 beside rsa-sha256 (RFC 8463).

dkimpy checks the signatures, but it wants the whole message to hash its body. As for
signing (policy/dkim.py), it is given the header section alone: the body hash each
signature asks for was computed as the message streamed by (policy/message_scan.py), and
_StreamedBodyMixin compares it with bh= in place of dkimpy's own body step
(verify_sig_process: the body hash first, as dkimpy does, then dkimpy's header check with
bh= taken out of its tag dict, so it has no body to hash; bh= stays in the signed field).

Keys are fetched through the policy Resolver, all at once, before dkimpy runs; dkimpy gets
them from a dnsfunc that answers from what was fetched. Its RSA is pure Python (~6 ms a
signature), so the checks run through the caller's `run_blocking` (a thread pool) and never
hold up the event loop.

Results (RFC 8601 §2.7.1): pass; fail when the body hash or the signature does not match,
and for rsa-sha1, which RFC 8301 §3.1 says verifiers must not accept ("rsa-sha1 not
accepted"); permerror for a signature that cannot be read, no key or a revoked, malformed,
too small (RFC 8301 §3.2: under 1024 bits) or mismatched one (RFC 6376 §6.1.2), and for the
signatures after the first MAX_SIGNATURES ("too many signatures"); temperror when DNS did
not answer for the key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable

import dkim
import dkim.util

from policy.dkim_body import BodySpec
from policy.evidence import DKIMResult
from policy.message_scan import MAX_SIGNATURES, MessageScan, spec_of
from policy.resolver import NODATA, NXDOMAIN, OK, Resolver

RunBlocking = Callable[..., Awaitable]
# dkimpy logs a failed check at ERROR on the "dkimpy" logger; our results say it instead,
# in the message's one log line. A logger of its own, outside logging's tree, disabled.
QUIET = logging.Logger("postroom.policy.dkimpy", logging.CRITICAL + 1)
_WSP = re.compile(rb"\s+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?")


class _StreamedBodyMixin:
    """A dkimpy DKIM or ARC object given the header section only: the body hash each
    signature asks for comes from `digests` (BodySpec -> digest), computed as it streamed."""

    def __init__(self, header_section: bytes, digests: dict[BodySpec, bytes], **kwargs):
        super().__init__(header_section, **kwargs)
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
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)


class _StreamedDKIM(_StreamedBodyMixin, dkim.DKIM):
    pass


async def verify_dkim(scan: MessageScan, resolver: Resolver,
                      run_blocking: RunBlocking | None = None) -> list[DKIMResult]:
    """One DKIMResult per DKIM-Signature field, top to bottom (none for an unsigned
    message). `run_blocking(fn, *args)` runs the cryptography off the loop; None runs it
    here (tests)."""
    if scan.header is None or not scan.dkim_values:
        return []
    results: list[DKIMResult | None] = []
    jobs: list[tuple[int, dict[bytes, bytes], str]] = []
    for index, value in enumerate(scan.dkim_values):
        try:
            tags = dkim.util.parse_tag_value(value)
        except dkim.util.InvalidTagValueList as e:
            results.append(DKIMResult("permerror", "", "", reason=f"signature syntax: {e}"[:200]))
            continue
        if index >= MAX_SIGNATURES:
            results.append(_result(tags, "permerror", "too many signatures"))
            continue
        if _tag(tags, b"a").lower() == "rsa-sha1":
            results.append(_result(tags, "fail", "rsa-sha1 not accepted (RFC 8301)"))
            continue
        name = key_name(tags)
        if name is None:
            results.append(_result(tags, "permerror", "signature syntax: bad d= or s="))
            continue
        results.append(None)
        jobs.append((index, tags, name))
    names = sorted({name for _, _, name in jobs})
    answers = dict(zip(names, await asyncio.gather(*(resolver.txt(name) for name in names))))
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
        if run_blocking is None:
            verdicts = _verify_all(scan.header, scan.body_hashes, work)
        else:
            verdicts = await run_blocking(_verify_all, scan.header, scan.body_hashes, work)
        for (index, tags, _, _), (result, reason) in zip(checks, verdicts):
            results[index] = _result(tags, result, reason)
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
        verifier = _StreamedDKIM(header + b"\r\n", digests, logger=QUIET)
    except Exception as e:  # noqa: BLE001 - dkimpy's parser refuses junk header lines
        return [("permerror", f"header section unreadable: {e}"[:200])] * len(checks)
    return [_verify_one(verifier, index, name, records) for index, name, records in checks]


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
            _, _, ktag, _ = dkim.evaluate_pk(name, record)
        except Exception as e:  # noqa: BLE001 - KeyFormatError, binascii.Error, nacl errors
            problem = f"bad key: {e}"[:200]
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


def _tag(tags: dict[bytes, bytes], name: bytes) -> str:
    return _WSP.sub(b"", tags.get(name, b"")).decode("ascii", "replace")


def _result(tags: dict[bytes, bytes], result: str, reason: str) -> DKIMResult:
    domain = _tag(tags, b"d").lower()
    identity = _tag(tags, b"i") or (f"@{domain}" if domain else "")
    return DKIMResult(result, domain, _tag(tags, b"s").lower(), algorithm=_tag(tags, b"a").lower(),
                      identity=identity, signature=_tag(tags, b"b")[:8], reason=reason)
