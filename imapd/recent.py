"""\\Recent (RFC 3501 §2.3.2): a message is recent in exactly one session, the first to see it.

Claims live in the imapd process: per mailbox (by UIDVALIDITY, so a re-created mailbox
starts afresh) the highest UID some session has seen. A mailbox first opened after the
process started has nothing recent: what arrived before the start is not claimed twice
after a restart, at the cost of not being \\Recent at all. IMAP4rev2 (RFC 9051) dropped
\\Recent for being this hard to do well; clients use \\Seen and UIDNEXT instead.
"""

from __future__ import annotations

from collections.abc import Iterable


class RecentClaims:
    def __init__(self) -> None:
        self._seen_upto: dict[tuple[str, int], int] = {}

    def claim(self, account: str, mailbox_id: int, uidnext: int) -> range:
        """SELECT: the UIDs up to `uidnext` that are recent for this session."""
        key = (account, mailbox_id)
        previous = self._seen_upto.get(key, uidnext - 1)
        self._seen_upto[key] = max(previous, uidnext - 1)
        return range(previous + 1, uidnext)

    def claim_new(self, account: str, mailbox_id: int, uids: Iterable[int]) -> list[int]:
        """New messages a selected session learns of: those no other session has seen."""
        key = (account, mailbox_id)
        upto = self._seen_upto.get(key, 0)
        mine = [uid for uid in uids if uid > upto]
        if mine:
            self._seen_upto[key] = max(mine)
        return mine

    def count(self, account: str, mailbox_id: int, uidnext: int) -> int:
        """STATUS RECENT: messages no session has seen yet (claims nothing)."""
        upto = self._seen_upto.get((account, mailbox_id), uidnext - 1)
        return max(0, uidnext - 1 - upto)
