"""A POP3 session's maildrop (RFC 1939 §5-6): INBOX as it was at login, numbered from 1,
with the session's deletion marks and what RETR sent, and the rules that decide what the
UPDATE state removes and whether a login comes too soon (RFC 2449 §6.5 LOGIN-DELAY).

Pure data: the session (pop3d.session) takes the snapshot from the store under the maildrop
lock, so no other POP3 session changes what it shows; IMAP may still expunge, which RETR
then finds out. Marks live only here: DELE marks a number, RSET unmarks, and only QUIT in
TRANSACTION asks the store to remove; a connection that drops deletes nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

from pop3d.replies import CommandError, Err

EXPIRE_NEVER, EXPIRE_AT_QUIT = "NEVER", "0"  # RFC 2449 §6.7, as CAPA's EXPIRE advertises it


class Maildrop:
    """The messages of the snapshot and the session's marks. UIDLs are
    "<UIDVALIDITY>.<UID>": stable, never reused. Compact (12 bytes a message) and with its
    octet total kept as marks change: STAT and LIST on a big maildrop cost no walk over it."""

    def __init__(self, uidvalidity: int, messages: Iterable[tuple[int, int]]):
        """`messages`: (uid, size) in ascending UID order."""
        self.uidvalidity = uidvalidity
        self.uids = array("I")
        self.sizes = array("Q")
        for uid, size in messages:
            self.uids.append(uid)
            self.sizes.append(size)
        self.deleted: set[int] = set()  # message numbers
        self.retrieved: set[int] = set()  # message numbers sent whole by RETR
        self._octets = sum(self.sizes)

    def count(self) -> int:
        """Messages not marked deleted (STAT, RFC 1939 §5)."""
        return len(self.uids) - len(self.deleted)

    def octets(self) -> int:
        """Their size in octets."""
        return self._octets

    def message(self, number: int) -> tuple[int, int]:
        """(uid, size) of a message a command names; CommandError if there is none or it is
        marked deleted (RFC 1939 §5: "may not refer to a message marked as deleted")."""
        if not 1 <= number <= len(self.uids):
            raise CommandError(Err(f"no such message, only {len(self.uids)} in maildrop"))
        if number in self.deleted:
            raise CommandError(Err(f"message {number} already deleted"))
        return self.uids[number - 1], self.sizes[number - 1]

    def uidl(self, uid: int) -> str:
        return f"{self.uidvalidity}.{uid}"

    def undeleted(self) -> Iterator[tuple[int, int, int]]:
        """(number, uid, size) of every message not marked deleted, for LIST and UIDL."""
        for index, uid in enumerate(self.uids):
            if index + 1 not in self.deleted:
                yield index + 1, uid, self.sizes[index]

    def delete(self, number: int) -> None:
        """DELE: mark a message, as `message` checks it."""
        self.message(number)
        self.deleted.add(number)
        self._octets -= self.sizes[number - 1]

    def undelete_all(self) -> None:
        """RSET."""
        self.deleted.clear()
        self._octets = sum(self.sizes)

    def sent_whole(self, number: int) -> None:
        """RETR sent the message with its terminator (TOP does not count)."""
        self.retrieved.add(number)

    def to_remove(self, expire: str) -> tuple[int, ...]:
        """The UIDs the UPDATE state removes, ascending: those marked deleted, and with
        EXPIRE 0 those RETR sent (RFC 2449 §6.7: an implicit DELE)."""
        numbers = self.deleted | self.retrieved if expire == EXPIRE_AT_QUIT else self.deleted
        return tuple(sorted(self.uids[number - 1] for number in numbers))


def too_soon(last_login: float | None, now: float, delay: int) -> bool:
    """RFC 2449 §6.5: with LOGIN-DELAY `delay` advertised, a login within `delay` seconds of
    the last one is refused. A clock that went back refuses nothing."""
    return bool(delay) and last_login is not None and 0 <= now - last_login < delay
