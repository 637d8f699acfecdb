"""Object identifiers (RFC 8474 OBJECTID): MAILBOXID and EMAILID.

Both are made, not stored, wherever that keeps them stable: a mailbox's from its account
and its id (its UIDVALIDITY, never reused within the shard the account lives on), so a
rename keeps it and a mailbox deleted and created again gets a new one (§4.1, §4.2); a
message's from the unique base of its file name (storage/maildir.py). A copy or a move
gets a new file name, and the original's EMAILID is stored in its record (`email_id`),
so that the same message has the same EMAILID in every mailbox (§5.1). The ids are
hashes: they tell nothing of the account or the host (§7), and use only the letters and
digits objectid allows (§3: 1*255(ALPHA / DIGIT / "_" / "-")).

THREADID is NIL: threads are not kept, which §5.2 allows.
"""

from __future__ import annotations

from hashlib import blake2b


def mailbox_id(account: str, mailbox: int) -> str:
    return "F" + blake2b(f"{account}\0{mailbox}".encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


def email_id(stored: str | None, base: str) -> str:
    """A message's EMAILID: the one stored in its record (a copy's), or made from its base."""
    if stored is not None:
        return stored
    return "M" + blake2b(base.encode(), digest_size=12).hexdigest()
