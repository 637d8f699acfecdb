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

The result is RFC 8617 §4.4's: pass, fail, or none for a message without ARC fields.
A key DNS did not answer for fails the chain (ARC has no temperror), said in the reason.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import dkim
import dkim.util

from policy.dkim_body import BodySpec
from policy.dkim_verify import QUIET, RunBlocking, _StreamedBodyMixin, key_name
from policy.evidence import ARCResult
from policy.message_scan import ARC_MAX_INSTANCES, MessageScan, arc_instance
from policy.resolver import OK, TEMPERROR, Resolver

_SET = ("arc-seal", "arc-message-signature", "arc-authentication-results")


class _StreamedARC(_StreamedBodyMixin, dkim.ARC):
    pass


async def verify_arc(scan: MessageScan, resolver: Resolver, run_blocking: RunBlocking | None = None) -> ARCResult:
    """The chain's validation. `run_blocking(fn, *args)` runs the cryptography off the
    loop; None runs it here (tests)."""
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
    seals = {i: _tags(sets[i]["arc-seal"][0]) for i in range(1, newest + 1)}
    if seals[newest] is not None and seals[newest].get(b"cv", b"").strip().lower() == b"fail":
        return ARCResult("fail", newest, f"ARC-Seal i={newest} says cv=fail")
    wanted = [tags for tags in seals.values()] + [_tags(sets[newest]["arc-message-signature"][0])]
    names = sorted({name for tags in wanted if tags is not None and (name := key_name(tags)) is not None})
    answers = dict(zip(names, await asyncio.gather(*(resolver.txt(name) for name in names))))
    records = {name: answer.records[0] for name, answer in answers.items() if answer.status == OK and answer.records}
    unanswered = sorted(name for name, answer in answers.items() if answer.status == TEMPERROR)
    if run_blocking is None:
        result, reason = _verify_chain(scan.header, scan.body_hashes, records)
    else:
        result, reason = await run_blocking(_verify_chain, scan.header, scan.body_hashes, records)
    if result == "fail" and unanswered:
        reason = f"{reason}; no DNS answer for {', '.join(unanswered)}"
    return ARCResult(result, newest, reason)


def _verify_chain(header: bytes, digests: dict[BodySpec, bytes],
                  records: dict[str, bytes]) -> tuple[str, str]:
    """dkimpy's validation, blocking: (result, reason)."""
    def dnsfunc(name, timeout=0):
        return records.get(name.decode("ascii", "replace").lower().rstrip("."), b"")
    try:
        chain = _StreamedARC(header + b"\r\n", digests, logger=QUIET)
        cv, _, reason = chain.verify(dnsfunc=dnsfunc)
    except Exception as e:  # noqa: BLE001 - dkimpy raises what its parts raise on junk
        return "fail", f"{type(e).__name__}: {e}"[:200]
    if cv == dkim.CV_Pass:
        return "pass", ""
    if cv == dkim.CV_None:
        return "none", str(reason)[:200]
    return "fail", str(reason)[:200]  # CV_Fail, or None: a seal reported cv=fail


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return None
