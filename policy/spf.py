"""SPF (RFC 7208): is the client address allowed to send for the MAIL FROM domain, or for
the HELO name when the sender is null (RFC 7208 §2.3: postmaster@<HELO name>)?

pyspf evaluates the record; its DNS is ours: a subclass of `spf.query` replaces its one
lookup method, `dns()`, with answers from the shared Resolver. pyspf's lookups block, so it
never makes one: it runs on the answers known so far and stops at the first it lacks, the
Resolver asks for it on the event loop, and pyspf runs again (see check_spf). A run is
CPU alone (28 us for a one-term record) and runs on the loop: a hop to a thread cost more
(0.45-0.5 ms of the loop's time under load, measured for the rate tables) than the
evaluation it moved. But pyspf bounds the lookups, not the addresses an answer holds, and
each run starts over: ten mx terms of ten names of 100 addresses each took 112 runs and 4.1
s of CPU, 99 ms the longest run. So an evaluation gets INLINE_BUDGET of the loop's time;
past it, its runs go to the caller's `run_blocking` (a thread, where the GIL's switch
interval still lets the loop serve the other sessions). pyspf keeps RFC 7208 §4.6.4's limits:
10 terms that cause DNS lookups (include, a, mx, ptr, exists, redirect), 10 MX and PTR
names, and 2 void lookups (our `dns()` counts those, as pyspf's does). The whole evaluation
is bounded in time (MAX_TIME, §4.6.4 says at least 20 s): no lookup is asked after it, and
each lookup is bounded by `[dns] timeout`, so a silent DNS server gives temperror after
one timeout.

The result is one of RFC 7208 §2.6's seven words, with pyspf's explanation as the reason
(the header comment when it has none), cleaned of control characters: a domain's exp=
text is the sender's to choose and may end up in a reply or a header.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable

import spf

from policy.evidence import SPF_RESULTS, SPFResult
from policy.resolver import TEMPERROR, DNSAnswer, Resolver

MAX_TIME = 20.0  # seconds for a whole evaluation (RFC 7208 §4.6.4)
# Runs of pyspf for one evaluation, one more for each answer it needs. §4.6.4 allows 10
# terms that query DNS, and 10 MX names for each mx term: about 120 names at most.
MAX_RUNS = 150
MAX_REASON = 200  # characters of explanation kept
INLINE_BUDGET = 0.002  # seconds of an evaluation's runs on the loop; the rest in a thread
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")
_NOT_IN_NAMES = re.compile(r"[\x00-\x20\x7f@\[\]\"\\(),;:<>]")  # what no domain (nor U-label) holds


async def check_spf(resolver: Resolver, *, ip: str, sender: str, helo: str,
                    run_blocking: Callable[..., Awaitable] | None = None, time_limit: float = MAX_TIME) -> SPFResult:
    """The SPF result for a message from `ip` with MAIL FROM `sender` ("" for the null
    sender: then the HELO name's record is asked) after HELO/EHLO `helo`.
    Never raises for DNS trouble or a bad record. Runs past INLINE_BUDGET go to
    `run_blocking(fn, *args)`; without it, all run here."""
    identity = "mailfrom" if sender else "helo"
    checked = sender or f"postmaster@{helo}"
    # The domain follows the last "@" (a quoted local part may hold one), RFC 7208 §4.3;
    # for the null sender it is the HELO name, whole.
    local, _, domain = sender.rpartition("@") if sender else ("postmaster", "", helo)
    domain = domain.lower().rstrip(".")
    if not _checkable(domain):
        # RFC 7208 §4.3: a malformed or single-label domain (or an address literal) is none.
        # What was given goes on cleaned: it is no name, and may be anything.
        checked = _clean(checked)
        return SPFResult("none", identity, "", checked, f"no domain to check in {checked}")
    # pyspf would block on its DNS lookups: it runs on the answers known so far; where it
    # needs one more it stops, the Resolver asks (the loop serves other sessions meanwhile),
    # and pyspf runs again from the start with that answer too. Each run costs microseconds
    # per term; a record needs a few runs, and RFC 7208 §4.6.4's limits bound them (MAX_RUNS
    # for a record that escapes them).
    answers: dict[tuple[str, str], DNSAnswer] = {}
    deadline = time.monotonic() + time_limit
    now = str(int(time.time()))  # the %{t} macro: the same in every run
    spent = 0.0  # seconds of runs on the loop
    for _ in range(MAX_RUNS):
        args = (answers, now, ip, sender, local or "postmaster", domain, helo)
        if run_blocking is not None and spent > INLINE_BUDGET:
            outcome = await run_blocking(_evaluate, *args)
        else:
            started = time.perf_counter()
            outcome = _evaluate(*args)
            spent += time.perf_counter() - started
        if not isinstance(outcome, _Missing):
            result, reason = outcome
            break
        if time.monotonic() > deadline:
            result, reason = "temperror", "DNS: SPF evaluation took too long"
            break
        answers[outcome.key] = await resolver.query(*outcome.key)
        # A cached answer comes back without a pause: a record of many terms (each run
        # longer than the last) must still let the other sessions in between its runs.
        await asyncio.sleep(0)
    else:
        result, reason = "permerror", f"more than {MAX_RUNS} DNS lookups"
    return SPFResult(result, identity, domain, checked, _clean(reason))


class _Missing(Exception):
    """pyspf needs an answer not yet known: `key` is (name, type)."""

    def __init__(self, key: tuple[str, str]):
        super().__init__(f"{key[0]} {key[1]} not asked yet")
        self.key = key


def _evaluate(answers: dict[tuple[str, str], DNSAnswer], now: str, ip: str, sender: str, local: str,
              domain: str, helo: str) -> tuple[str, str] | _Missing:
    """pyspf's verdict on these answers: (result, explanation), or the first answer it
    lacks."""
    try:
        query = _Query(answers, i=ip, s=sender, h=helo)
    except spf.PermError as e:  # the client address is not one
        return "permerror", f"bad client address: {e}"
    # pyspf splits the sender at its first "@": ours is split at the last.
    query.l, query.o, query.d = local, domain, domain
    query.t = now
    try:
        result, _code, explanation = query.check()
    except _Missing as missing:
        return missing
    except Exception as e:  # pyspf's own failure on a hostile record: never the session's
        return "permerror", f"SPF evaluation failed: {type(e).__name__}: {e}"
    if query.missing is not None:  # pyspf swallowed it (its exp= lookup catches everything)
        return query.missing
    if result not in SPF_RESULTS:  # "ambiguous" and the like come only in pyspf's harsh mode
        return "permerror", f"unexpected pyspf result {result}: {explanation}"
    if not explanation and result == "none":
        explanation = f"no SPF record for {query.o}"
    elif not explanation:
        try:
            explanation = query.get_header_comment(result)
        except Exception:
            explanation = ""
    return result, explanation


class _Query(spf.query):
    """pyspf's query with its DNS answers from `answers` (filled by the Resolver)."""

    def __init__(self, answers: dict[tuple[str, str], DNSAnswer], **kwargs):
        super().__init__(**kwargs)
        self._answers = answers
        self.missing: _Missing | None = None

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        """Records of `qtype` for `name` as pyspf's dnspython driver gives them: A, AAAA as
        address text, MX as (preference, host), PTR as host, TXT as a tuple of bytes.
        CNAMEs are followed by the resolver. Raises _Missing for an answer not known yet,
        spf.TempError for DNS trouble and spf.PermError past the void lookup limit
        (RFC 7208 §4.6.4)."""
        name = str(name).rstrip(".").lower()
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a DNS name: no lookup (pyspf's own rule)
        answer = self._answers.get((name, qtype))
        if answer is None:
            self.missing = _Missing((name, qtype))
            raise self.missing
        if answer.status == TEMPERROR:
            raise spf.TempError(f"DNS: no answer for {name} {qtype} (timeout or server failure)")
        result = [_record(qtype, record) for record in answer.records]
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def _record(qtype: str, record):
    if qtype in ("TXT", "SPF"):
        return (record,)  # pyspf joins a record's strings: ours are joined already
    if qtype == "MX":
        preference, _, host = record.partition(" ")
        return int(preference), host.rstrip(".")
    if qtype in ("PTR", "CNAME"):
        return record.rstrip(".")
    return record


def _checkable(domain: str) -> bool:
    """A multi-label domain name, not an address literal (RFC 7208 §4.3)."""
    if "." not in domain or _NOT_IN_NAMES.search(domain):
        return False
    try:
        ipaddress.ip_address(domain)
        return False
    except ValueError:
        pass
    return all(0 < len(label) < 64 for label in domain.split("."))


def _clean(text: str) -> str:
    """Printable ASCII on one line, bounded: safe in a log line, a reply, a header comment."""
    return _NOT_PRINTABLE.sub(" ", text).strip()[:MAX_REASON]
