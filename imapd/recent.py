"""\\Recent (RFC 3501 §2.3.2): a message is recent in exactly one session, the first to see it.

The claim, per mailbox, is the highest UID some session has seen; it lives in the store's
index (storage/recent.py), so every imapd process shares it and it survives restarts: mail
that arrived while no session had the mailbox open is recent for the first SELECT after it.
SELECT takes the UIDs above the claim, up to those it sees; a selected session takes the new
messages it learns of that nobody saw before it. EXAMINE shows what is unclaimed as recent
and takes nothing (RFC 3501 §6.3.2), nor does STATUS. IMAP4rev2 (RFC 9051) dropped \\Recent
for being this hard to do well; clients use \\Seen and UIDNEXT instead.

The methods call the store: they run in a worker thread (SessionState.run_store).
"""

from __future__ import annotations

from collections.abc import Sequence

from storage import Mailbox, Store


class RecentClaims:
    def __init__(self, store: Store) -> None:
        self._store = store

    def claim(self, mailbox: Mailbox, uids: Sequence[int]) -> list[int]:
        """SELECT: of the mailbox's `uids` (ascending, from the same snapshot as `mailbox`),
        those recent for this session, taken from every other session."""
        if not uids or uids[-1] <= mailbox.recent_upto:
            return []  # nothing new since some session looked: no write
        before = self._store.claim_recent(mailbox.account, mailbox.id, uids[-1])
        return [uid for uid in uids if uid > before]

    @staticmethod
    def unclaimed(mailbox: Mailbox, uids: Sequence[int]) -> list[int]:
        """EXAMINE: what nobody has seen yet, shown as recent but left to the next SELECT."""
        return [uid for uid in uids if uid > mailbox.recent_upto]

    def claim_new(self, account: str, mailbox_id: int, uids: Sequence[int]) -> list[int]:
        """New messages a selected session learns of (ascending): those no other session
        has seen."""
        if not uids:
            return []
        before = self._store.claim_recent(account, mailbox_id, uids[-1])
        return [uid for uid in uids if uid > before]

    def count(self, account: str, name: str) -> int:
        """STATUS RECENT: messages no session has seen yet (claims nothing)."""
        return self._store.recent_count(account, name)
