"""ARC chain validation (RFC 8617 §5.2) of a message that MessageScan read, with dkimpy's ARC
code given the header section and the streamed body hash of the newest
ARC-Message-Signature (policy/dkim_verify.py's _StreamedBodyMixin, as for DKIM).

Before any DNS or cryptography, the chain's shape is checked here (§5.2 steps 2-3, cheap):
at most 50 sets (§4.2.1), each instance 1..N with exactly one ARC-Seal,
ARC-Message-Signature and ARC-Authentication-Results, and the newest seal not cv=fail.
Then the keys of every seal and of the newest AMS are fetched at once through the Resolver,
and dkimpy validates the newest AMS and every seal (§5.2 steps 4 and 6). Older AMSs are
not validated (step 5 is optional): MessageScan hashes the body for the newest AMS only, so
dkimpy finds each older one without a body hash, before any RSA, and its verdict ignores
them.

dkimpy's work is bounded as for DKIM (policy/dkim_verify.py), with each bound failing the
chain (ARC has no permerror), said in the reason: every ARC-Seal and ARC-Message-Signature
field within MAX_SIGNATURE_LENGTH and MAX_WHITESPACE_RUN, every AMS's h= within
MAX_SIGNED_FIELDS names, every ARC-Authentication-Results within MAX_SIGNATURE_LENGTH, all
ARC fields within MAX_ARC_BYTES (each seal hashes all the sets before it), and the keys of
the seals and of the newest AMS at most 4096 bits with a small exponent. dkimpy is given the
ARC fields and the fields the newest AMS signs only. An older AMS that has a body hash (one
of the same canonicalization as the newest AMS or a DKIM signature) is refused before its
header hash and RSA: its verdict would be ignored.

The result is RFC 8617 §4.4's: pass, fail, or none for a message without ARC fields.
A key DNS did not answer for fails the chain (ARC has no temperror), said in the reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import dkim
import dkim.util

from policy import dkimpy_speed
from policy.dkim_body import BodySpec
from policy.dkim_verify import (
    INLINE_SIGNATURES,
    MAX_SIGNATURE_LENGTH,
    QUIET,
    RunBlocking,
    _StreamedBodyMixin,
    field_problem,
    header_fields,
    key_name,
    rsa_key_problem,
    select_fields,
    signed_names,
    signed_names_problem,
)
from policy.evidence import ARCResult
from policy.message_scan import ARC_MAX_INSTANCES, MessageScan, arc_instance
from policy.resolver import OK, TEMPERROR, Resolver

dkimpy_speed.install()

_SET = ("arc-seal", "arc-message-signature", "arc-authentication-results")
# Each seal hashes every set before it, canonicalized by dkimpy's regexes: 50 seals over
# 700 KB of sets took 1.2 s. A set is ~1-3 KB, so a 50-set chain of real ones fits.
MAX_ARC_BYTES = 256 << 10


class _StreamedARC(_StreamedBodyMixin, dkim.ARC):
    """dkimpy's ARC on the selected fields, checking the newest AMS and the seals only."""

    def __init__(self, fields: list[tuple[bytes, bytes]], digests: dict[BodySpec, bytes], newest: int, **kwargs):
        super().__init__(fields, digests, **kwargs)
        self._newest = newest

    def verify_sig_process(self, sig, include_headers, sig_header, dnsfunc):
        if b"bh" in sig and arc_instance(b"i=" + sig.get(b"i", b"")) != self._newest:
            # RFC 8617 §5.2 step 5 is optional; dkimpy's verdict ignores older AMSs.
            raise dkim.MessageFormatError("older ARC-Message-Signature not checked")
        return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)


async def verify_arc(scan: MessageScan, resolver: Resolver, run_blocking: RunBlocking | None = None) -> ARCResult:
    """The chain's validation. `run_blocking(fn, *args)` runs the cryptography of a chain
    of more than one set off the loop (dkim_verify.INLINE_SIGNATURES); None runs it here."""
    if scan.header is None or not scan.arc_fields:
        return ARCResult("none")
    sets: dict[int, dict[str, list[bytes]]] = {}
    for name, value in scan.arc_fields:
        instance = arc_instance(value)
        if instance is None or instance < 1:
            return ARCResult("fail", reason=f"{name.decode()} without a valid i=")
        if instance > ARC_MAX_INSTANCES:
            return ARCResult("fail", reason=f"more than {ARC_MAX_INSTANCES} ARC sets")
        sets.setdefault(instance, {}).setdefault(name.decode(), []).append(value)
    newest = max(sets)
    for instance in range(1, newest + 1):
        counts = Counter({kind: len(values) for kind, values in sets.get(instance, {}).items()})
        if any(counts[kind] != 1 for kind in _SET):
            return ARCResult("fail", newest, f"ARC set i={instance} is missing a field or has one twice")
    size = sum(len(value) for _, value in scan.arc_fields)
    if size > MAX_ARC_BYTES:
        return ARCResult("fail", newest, f"ARC fields of {size} bytes, over {MAX_ARC_BYTES}")
    for instance in range(1, newest + 1):
        for kind in ("ARC-Seal", "ARC-Message-Signature"):
            problem = field_problem(sets[instance][kind.lower()][0])
            if problem:
                return ARCResult("fail", newest, f"{kind} i={instance}: {problem}")
        if len(sets[instance]["arc-authentication-results"][0]) > MAX_SIGNATURE_LENGTH:
            return ARCResult("fail", newest, f"ARC-Authentication-Results i={instance}: "
                                             f"field over {MAX_SIGNATURE_LENGTH} bytes")
        tags = _tags(sets[instance]["arc-message-signature"][0])
        if tags is not None and (problem := signed_names_problem(tags)):
            return ARCResult("fail", newest, f"ARC-Message-Signature i={instance}: {problem}")
    seals = {i: _tags(sets[i]["arc-seal"][0]) for i in range(1, newest + 1)}
    if seals[newest] is not None and seals[newest].get(b"cv", b"").strip().lower() == b"fail":
        return ARCResult("fail", newest, f"ARC-Seal i={newest} says cv=fail")
    newest_ams = _tags(sets[newest]["arc-message-signature"][0])
    wanted = [tags for tags in seals.values()] + [newest_ams]
    names = sorted({name for tags in wanted if tags is not None and (name := key_name(tags)) is not None})
    answers = dict(zip(names, await asyncio.gather(*(resolver.txt(name) for name in names)), strict=True))
    records = {name: answer.records[0] for name, answer in answers.items() if answer.status == OK and answer.records}
    unanswered = sorted(name for name, answer in answers.items() if answer.status == TEMPERROR)
    signed = signed_names(newest_ams) if newest_ams is not None else []
    if run_blocking is None or newest + 1 <= INLINE_SIGNATURES:  # every seal, the newest AMS
        result, reason = _verify_chain(scan.header, scan.body_hashes, records, newest, signed)
    else:
        result, reason = await run_blocking(_verify_chain, scan.header, scan.body_hashes, records, newest, signed)
    if result == "fail" and unanswered:
        reason = f"{reason}; no DNS answer for {', '.join(unanswered)}"
    return ARCResult(result, newest, reason)


def _verify_chain(header: bytes, digests: dict[BodySpec, bytes], records: dict[str, bytes],
                  newest: int, signed: list[bytes]) -> tuple[str, str]:
    """dkimpy's validation, blocking: (result, reason). `signed`: the newest AMS's h=."""
    def dnsfunc(name, timeout=0):
        return records.get(name.decode("ascii", "replace").lower().rstrip("."), b"")
    for name, record in records.items():  # parsing a key is pure Python too: here, off the loop
        problem = _key_problem(name, record)
        if problem:
            return "fail", f"key {name}: {problem}"
    try:
        fields = header_fields(header)
        every = {name.encode(): len(fields) for name in _SET}
        chain = _StreamedARC(select_fields(fields, [signed], every), digests, newest, logger=QUIET)
        cv, _, reason = chain.verify(dnsfunc=dnsfunc)
    except Exception as e:  # noqa: BLE001 - dkimpy raises what its parts raise on junk
        return "fail", f"{type(e).__name__}: {e}"[:200]
    if cv == dkim.CV_Pass:
        return "pass", ""
    if cv == dkim.CV_None:
        return "none", str(reason)[:200]
    return "fail", str(reason)[:200]  # CV_Fail, or None: a seal reported cv=fail


def _key_problem(name: str, record: bytes) -> str:
    """Why an RSA key must not reach dkimpy (rsa_key_problem), or "" (dkimpy judges the rest)."""
    try:
        key, bits, ktag, _ = dkim.evaluate_pk(name, record)
    except Exception:  # noqa: BLE001 - dkimpy reports an unusable key itself
        return ""
    return rsa_key_problem(key, bits) if ktag == b"rsa" else ""


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return None
