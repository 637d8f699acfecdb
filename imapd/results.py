"""Search results as the client is told them: ESEARCH responses (RFC 4731 §3.1, with
RFC 7162 §3.1.5's MODSEQ), what SAVE keeps for `$` (RFC 5182 §2.4), PARTIAL windows and
the ADDTO/REMOVEFROM updates of a live search (RFC 5267 §4.3, §4.4). Sans-IO: lists of
numbers in, response text out.

A result is a list of message numbers (sequence numbers, or UIDs for the UID forms) in
the order the command gives them: ascending for SEARCH, the sort order for SORT. A set
is written in that order, runs of consecutive ascending numbers as `a:b`.
"""

from __future__ import annotations

from collections.abc import Sequence

from imapd.syntax import SearchReturn


def ordered_set(numbers: Sequence[int]) -> str:
    """`1:3,7,5` for [1, 2, 3, 7, 5]: the order kept, ascending runs joined."""
    parts: list[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        parts.append(str(numbers[i]) if i == j else f"{numbers[i]}:{numbers[j]}")
        i = j + 1
    return ",".join(parts)


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def esearch_line(tag: str, uid: bool, numbers: Sequence[int], returns: SearchReturn,
                 modseqs: Sequence[int] | None = None, *, sorted_result: bool = False) -> str:
    """The `ESEARCH (TAG "t") [UID] ...` line (without `* `) for a result in its order.
    `modseqs`, parallel to `numbers`, adds MODSEQ: the highest of the messages returned,
    or of the one message when only MIN or only MAX is asked (RFC 7162 §3.1.5). For a
    SORT (`sorted_result`), MIN and MAX are the first and last in its order (RFC 5267 §3.1)."""
    parts = [f"ESEARCH (TAG {quoted(tag)})"] + (["UID"] if uid else [])
    shown: list[int] = []  # indexes into numbers that the response shows
    if numbers:
        if sorted_result:
            low, high = 0, len(numbers) - 1
        else:
            low = min(range(len(numbers)), key=numbers.__getitem__)
            high = max(range(len(numbers)), key=numbers.__getitem__)
        if returns.min:
            parts.append(f"MIN {numbers[low]}")
            shown.append(low)
        if returns.max:
            parts.append(f"MAX {numbers[high]}")
            shown.append(high)
        if returns.all:
            parts.append(f"ALL {ordered_set(numbers)}")
    if returns.count:
        parts.append(f"COUNT {len(numbers)}")
    if returns.partial is not None:
        low_pos, high_pos = returns.partial
        window = numbers[low_pos - 1:high_pos]
        parts.append(f"PARTIAL ({low_pos}:{high_pos} {ordered_set(window) if window else 'NIL'})")
    if modseqs is not None and numbers:
        if returns.all or returns.count or returns.partial is not None or (returns.min and returns.max):
            shown = list(range(len(numbers)))
        if shown:
            parts.append(f"MODSEQ {max(modseqs[i] for i in shown)}")
    return " ".join(parts)


def saved(numbers: Sequence[int], returns: SearchReturn) -> list[int]:
    """What SAVE keeps (RFC 5182 §2.4): MIN and/or MAX alone keep only those messages;
    any other combination keeps the whole result."""
    if not numbers or returns.all or returns.count or returns.partial is not None or not (returns.min or returns.max):
        return list(numbers)
    kept = set()
    if returns.min:
        kept.add(min(numbers))
    if returns.max:
        kept.add(max(numbers))
    return sorted(kept)


def update_lines(tag: str, uid: bool, old: Sequence[int], new: Sequence[int], sorted_result: bool) -> list[str]:
    """ESEARCH ADDTO/REMOVEFROM lines that take a client from result `old` to `new`, both
    in their order (RFC 5267 §4.3). REMOVEFROM comes first, with positions in `old`; ADDTO
    then with positions in `new`. A SEARCH's result is one set (its order is ascending
    anyway); a SORT's is one (position set) pair per run of adjacent positions."""
    head = f"ESEARCH (TAG {quoted(tag)})" + (" UID" if uid else "")
    lines = []
    new_set, old_set = set(new), set(old)
    removed = [(i + 1, n) for i, n in enumerate(old) if n not in new_set]
    added = [(i + 1, n) for i, n in enumerate(new) if n not in old_set]
    if removed:
        lines.append(f"{head} REMOVEFROM {_pairs(removed, sorted_result)}")
    if added:
        lines.append(f"{head} ADDTO {_pairs(added, sorted_result)}")
    return lines


def _pairs(items: list[tuple[int, int]], sorted_result: bool) -> str:
    if not sorted_result:
        return f"({items[0][0]} {ordered_set([n for _, n in items])})"
    runs: list[list[tuple[int, int]]] = []
    for position, number in items:
        if runs and runs[-1][-1][0] + 1 == position:
            runs[-1].append((position, number))
        else:
            runs.append([(position, number)])
    return " ".join(f"({run[0][0]} {ordered_set([n for _, n in run])})" for run in runs)
