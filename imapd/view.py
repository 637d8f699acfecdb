"""A session's view of its selected mailbox: the sequence-number map and what it has told
the client, kept in step with the store by the changes since its last MODSEQ.

Sequence numbers belong to the session (RFC 3501 §2.3.1.2): they change only when the
session announces it. New messages are added at once (EXISTS may be sent after any
command), but an expunge by someone else waits in `pending` until the session may send
EXPUNGE (never during FETCH, STORE or SEARCH, §7.4.1), so the numbers a client uses stay
right. \\Recent belongs to the first session that sees a message (`recent`).

The UID list is the big part of a session (4 bytes a message: 400 KB for 100,000), and
a thousand idle sessions on one mailbox hold the same list. So views in step with the
store share one immutable array per mailbox state (`Snapshots`, keyed by MODSEQ, which
names a state exactly); a view copies it only to change it, and goes back to the shared
one once it is in step again.
"""

from __future__ import annotations

import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from imapd.syntax import SequenceSet
from storage import FlagState, Mailbox

MAX_UID = 2**32 - 1


class Snapshots:
    """The UID arrays of mailbox states, shared by the views in those states; an array is
    dropped when no view holds it any more."""

    def __init__(self) -> None:
        self._arrays: weakref.WeakValueDictionary[tuple[str, int, int], array] = weakref.WeakValueDictionary()

    def share(self, account: str, mailbox_id: int, modseq: int, uids: array) -> array:
        """The shared array for this state: `uids` itself if it is the first."""
        key = (account, mailbox_id, modseq)
        shared = self._arrays.get(key)
        if shared is None:
            self._arrays[key] = shared = uids
        return shared


class View:
    def __init__(self, mailbox: Mailbox, uids: Iterable[int], *, readonly: bool, recent: Iterable[int] = (),
                 snapshots: Snapshots | None = None):
        self.mailbox = mailbox
        self.name = mailbox.name
        self.uidvalidity = mailbox.uidvalidity
        self.readonly = readonly
        self.snapshots = snapshots or Snapshots()
        self.uids = self.snapshots.share(mailbox.account, mailbox.id, mailbox.highestmodseq, array("I", uids))
        self._owned = False  # True once copied from the shared array to be changed
        self.modseq = mailbox.highestmodseq  # everything up to here has been told
        # The keywords the client was told of (FLAGS, PERMANENTFLAGS): a keyword beyond them
        # is announced before a FETCH shows it (RFC 3501 §7.2.6).
        self.keywords: set[str] = set(mailbox.keywords)
        self.uidnext = mailbox.uidnext
        self.recent: set[int] = set(recent)
        self.pending: set[int] = set()  # expunged in the store, not yet announced
        self.pending_since = 0  # the MODSEQ told before the first of `pending` (RFC 7162 §3.2)
        self.told: dict[int, int] = {}  # uid -> modseq of flags this session already sent
        # SEARCHRES (RFC 5182): the UIDs of the last SEARCH ... RETURN (SAVE), what `$` names;
        # a new SELECT starts a new view, and so an empty one (§2.1).
        self.saved: set[int] = set()
        # CONTEXT=SEARCH/SORT (RFC 5267 §4): the searches kept up to date, by their tag
        # (imapd.searching.LiveSearch).
        self.updates: dict[str, object] = {}

    # -- numbers --------------------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def known(self, uids: Iterable[int]) -> tuple[list[int], list[int]]:
        """Of ascending `uids`, those the client knows (not expunged meanwhile), and their
        sequence numbers: one pass, each lookup starting where the last one ended."""
        out_uids, out_seqs = [], []
        position, mine, pending = 0, self.uids, self.pending
        for uid in uids:
            position = bisect_left(mine, uid, position)
            if position < len(mine) and mine[position] == uid and uid not in pending:
                out_uids.append(uid)
                out_seqs.append(position + 1)
        return out_uids, out_seqs

    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def seq_ranges(self, sequence: SequenceSet) -> list[tuple[int, int]]:
        """UID ranges of a sequence-number set; ValueError for a number beyond EXISTS."""
        if sequence.saved:
            return self.saved_ranges()
        spans = []
        for low, high in sequence.resolve(self.exists):
            if high > self.exists or low < 1:
                raise ValueError("no such message sequence number")
            spans.append((self.uids[low - 1], self.uids[high - 1]))
        return spans

    def uid_ranges(self, sequence: SequenceSet) -> list[tuple[int, int]]:
        """UID ranges of a UID set; `*` is the highest UID (RFC 3501 §6.4.8: "n:*" names at
        least the last message even when n is beyond it)."""
        if sequence.saved:
            return self.saved_ranges()
        return [(low, high) for low, high in sequence.resolve(self.max_uid()) if high > 0]

    def uids_in(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """The session's UIDs inside the ranges, ascending, each once."""
        out: set[int] = set()
        for low, high in ranges:
            out.update(self.uids[bisect_left(self.uids, low):bisect_right(self.uids, high)])
        return sorted(out)

    def saved_ranges(self) -> list[tuple[int, int]]:
        """`$` (RFC 5182): the saved UIDs, as ranges."""
        out: list[tuple[int, int]] = []
        for uid in sorted(self.saved):
            if out and out[-1][1] + 1 == uid:
                out[-1] = (out[-1][0], uid)
            else:
                out.append((uid, uid))
        return out

    def recent_ranges(self) -> list[tuple[int, int]]:
        return [(uid, uid) for uid in sorted(self.recent)]

    # -- keeping in step ------------------------------------------------------------------

    def _own(self) -> None:
        if not self._owned:
            self.uids = array("I", self.uids)
            self._owned = True

    def in_step(self, modseq: int) -> None:
        """The view now shows the store's state at `modseq` exactly: share its array."""
        self.modseq = modseq
        if not self.pending:
            self.uids = self.snapshots.share(self.mailbox.account, self.uidvalidity, modseq, self.uids)
            self._owned = False

    def add(self, uids: Iterable[int]) -> bool:
        """Messages new to the session (ascending, above every known UID); True if any."""
        added = False
        for uid in uids:
            if uid > self.max_uid() and uid not in self.pending:
                self._own()
                self.uids.append(uid)
                added = True
        return added

    def expunge_now(self, uids: Iterable[int]) -> list[int]:
        """Remove messages; their sequence numbers as EXPUNGE must announce them, in order
        (each number counts the removals before it, so descending numbers are stable)."""
        seqs = []
        for uid in sorted(uids, reverse=True):
            seq = self.seq_of(uid)
            if seq is not None:
                self._own()
                del self.uids[seq - 1]
                seqs.append(seq)
            self.pending.discard(uid)
            self.recent.discard(uid)
            self.saved.discard(uid)
            self.told.pop(uid, None)
        return seqs

    def flag_updates(self, changed: Iterable[FlagState]) -> list[FlagState]:
        """Flag changes the client has not heard of (not its own STOREs, not expunged)."""
        out = []
        for state in changed:
            if state.uid in self.pending or self.seq_of(state.uid) is None:
                continue
            if self.told.get(state.uid, -1) >= state.modseq:
                continue
            self.told[state.uid] = state.modseq
            out.append(state)
        return out

    def mark_told(self, states: Iterable[FlagState]) -> None:
        # A state at or below the view's MODSEQ is one changes_since will never bring back:
        # nothing to remember (FETCH 1:* (FLAGS) would otherwise fill `told` with every UID).
        told, known = self.told, self.modseq
        for state in states:
            if state.modseq > known:
                told[state.uid] = max(state.modseq, told.get(state.uid, 0))
