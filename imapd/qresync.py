"""QRESYNC (RFC 7162 §3.2): what a client that comes back with the UIDVALIDITY and MODSEQ
it last saw is told on SELECT/EXAMINE (§3.2.5), the VANISHED (EARLIER) of UID FETCH ...
(CHANGEDSINCE m VANISHED) (§3.2.6), and VANISHED instead of EXPUNGE once enabled (§3.2.10).

The store keeps a bounded expunge history (storage/vanished.py). Within it, a client is
told exactly the UIDs expunged since its MODSEQ. Beyond it, the answer is worked out from
what is certain: every UID below UIDNEXT was handed out once, so a UID the client knows of
that the mailbox no longer holds has vanished; sequence match data (§3.2.5.2) lets that
skip the UIDs below the last (number, UID) pair that still matches, where nothing can have
vanished unseen. Sets travel as ranges, never expanded: a client's `1:4294967295` costs no
more than the mailbox's own UIDs.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from imapd.answers import bad
from imapd.state import SessionState
from imapd.syntax import QResync, SequenceSet
from imapd.view import View

# A long VANISHED goes as several lines of about this many octets (RFC 7162 §4 updates
# RFC 2683: clients should take lines of 8,192 octets; Dovecot and mox send less too)
MAX_LINE = 4000

Ranges = list[tuple[int, int]]


# -- sets as ranges ------------------------------------------------------------------------------

def uid_ranges(sequence: SequenceSet | None, highest: int) -> Ranges:
    """A UID set as ascending disjoint ranges within 1..highest (`*` is `highest`); None
    means every UID up to `highest` (RFC 7162 §3.2.5: known-uids left out is 1:UIDNEXT-1)."""
    if highest < 1:
        return []
    spans = [(1, highest)] if sequence is None else sequence.resolve(highest)
    return [(low, min(high, highest)) for low, high in normalize_ranges(spans) if low <= highest]


def normalize_ranges(spans: Iterable[tuple[int, int]]) -> Ranges:
    """Ascending, disjoint, each low <= high: "3:1" and overlaps ("1:3,2:5") are allowed."""
    merged: Ranges = []
    for low, high in sorted((min(a, b), max(a, b)) for a, b in spans):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def contains(ranges: Ranges, uid: int) -> bool:
    i = bisect_left(ranges, (uid + 1, 0)) - 1
    return i >= 0 and ranges[i][0] <= uid <= ranges[i][1]


def without(ranges: Ranges, uids: Sequence[int]) -> Ranges:
    """`ranges` less the ascending `uids`: one pass over both."""
    out: Ranges = []
    i = 0
    for low, high in ranges:
        i = bisect_left(uids, low, i)
        start = low
        while i < len(uids) and uids[i] <= high:
            if uids[i] > start:
                out.append((start, uids[i] - 1))
            start = uids[i] + 1
            i += 1
        if start <= high:
            out.append((start, high))
    return out


def above(ranges: Ranges, floor: int) -> Ranges:
    return [(max(low, floor + 1), high) for low, high in ranges if high > floor]


def as_ranges(uids: Iterable[int]) -> Ranges:
    return normalize_ranges([(uid, uid) for uid in uids])


def vanished_lines(ranges: Ranges, *, earlier: bool) -> list[str]:
    """`VANISHED [(EARLIER)] set` responses for the ranges, none when they are empty."""
    head = "VANISHED (EARLIER) " if earlier else "VANISHED "
    lines: list[str] = []
    current: list[str] = []
    size = 0
    for low, high in ranges:
        text = f"{low}:{high}" if low != high else str(low)
        if current and size + len(text) + 1 > MAX_LINE:
            lines.append(head + ",".join(current))
            current, size = [], 0
        current.append(text)
        size += len(text) + 1
    if current:
        lines.append(head + ",".join(current))
    return lines


# -- SELECT (QRESYNC ...) ----------------------------------------------------------------------

def require_enabled(session: SessionState) -> None:
    """RFC 7162 §3.2.5, §3.2.6: QRESYNC parameters are BAD unless ENABLE QRESYNC came first."""
    if not session.qresync:
        raise bad("ENABLE QRESYNC first")


def matched_below(view: View, params: QResync) -> int:
    """The highest UID of the sequence match data's leading pairs that still name the same
    message at the same number (RFC 7162 §3.2.5.2): no UID up to it can have vanished
    unseen, as the client knew as many messages up to it as the mailbox holds. 0 if none."""
    if params.known_seqs is None or params.known_seq_uids is None:
        return 0
    matched = 0
    pairs = zip(_numbers(params.known_seqs), _numbers(params.known_seq_uids), strict=False)
    previous = 0
    for _ in range(view.exists + 1):  # bounded by the mailbox, whatever the client wrote
        pair = next(pairs, None)
        if pair is None:
            break
        seq, uid = pair
        if seq <= previous or seq > view.exists or view.uids[seq - 1] != uid:
            break
        matched, previous = uid, seq
    return matched


def _numbers(sequence: SequenceSet):
    for low, high in sequence.ranges:  # ascending as written; `*` refused by the parser
        step = 1 if high >= low else -1
        yield from range(low, high + step, step)


async def on_select(session: SessionState, view: View, params: QResync) -> None:
    """The VANISHED (EARLIER) and FETCH responses of SELECT/EXAMINE (QRESYNC ...): what
    changed between the client's MODSEQ and the state the view was opened at (what changes
    later, the sync after the command tells as for any command)."""
    if params.uidvalidity != view.uidvalidity:
        return  # RFC 7162 §3.2.5: a plain SELECT then; the client must start over
    store = session.context.store
    mailbox, changed, expunged = await session.run_store(store.resync, session.user, view.name, params.modseq)
    if mailbox.uidvalidity != view.uidvalidity:
        return
    known = uid_ranges(params.known_uids, view.uidnext - 1)
    if expunged is not None:
        gone = as_ranges(uid for at, uid in expunged if at <= view.modseq and contains(known, uid))
    else:  # the history forgot that far back: what the client may know and the mailbox lacks
        gone = without(above(known, matched_below(view, params)), view.uids)
    for line in vanished_lines(gone, earlier=True):
        session.untagged(line)
    told = []
    for state in changed:
        seq = view.seq_of(state.uid)
        if seq is None or state.modseq > view.modseq or not contains(known, state.uid):
            continue
        flags = " ".join(state.flags + (("\\Recent",) if state.uid in view.recent else ()))
        session.untagged(f"{seq} FETCH (UID {state.uid} FLAGS ({flags}) MODSEQ ({state.modseq}))")
        told.append(state)
    view.mark_told(told)


# -- UID FETCH ... (CHANGEDSINCE m VANISHED) ----------------------------------------------------

async def on_fetch(session: SessionState, view: View, sequence: SequenceSet, changedsince: int) -> None:
    """VANISHED (EARLIER) for the UIDs of the set expunged since `changedsince` (RFC 7162
    §3.2.6), before the FETCH responses; UIDs expunged but not yet announced to this
    session are left to the VANISHED that announces them."""
    highest = max(view.uidnext, view.max_uid() + 1) - 1
    wanted = uid_ranges(sequence, highest)
    if not wanted:
        return
    _, _, expunged = await session.run_store(session.context.store.resync, session.user, view.name, changedsince)
    if expunged is not None:
        gone = as_ranges(uid for _, uid in expunged if contains(wanted, uid) and view.seq_of(uid) is None)
    else:
        gone = without(wanted, view.uids)
    for line in vanished_lines(gone, earlier=True):
        session.untagged(line)
