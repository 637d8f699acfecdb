"""Mailbox names: validation, normalization, hierarchy, and the defaults of a new account.

Names are Unicode (NFC) with "/" as the hierarchy separator; imapd maps them to IMAP's
modified UTF-7 and its own separator. "INBOX" is case-insensitive (RFC 3501 §5.1) and always
spelled INBOX. Mailbox directories on disk are named by the mailbox's UIDVALIDITY, never by
its name, so no name can reach outside the account directory and a rename moves no file;
the checks here are about what a client may call a mailbox.
"""

from __future__ import annotations

import unicodedata

from storage.errors import MailboxNameError

SEPARATOR = "/"
MAX_NAME_CHARS = 512
MAX_SEGMENT_CHARS = 200
MAX_DEPTH = 16

# New accounts get these, with their RFC 6154 special-use attributes.
DEFAULT_MAILBOXES = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
    ("Archive", "\\Archive"),
)
SPECIAL_USE = frozenset({"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"})


def normalize_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise MailboxNameError("mailbox name is empty")
    name = unicodedata.normalize("NFC", name)
    if len(name) > MAX_NAME_CHARS:
        raise MailboxNameError(f"mailbox name longer than {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in name):
        raise MailboxNameError("mailbox name contains control or unassigned characters")
    if any(c in name for c in "*%"):
        raise MailboxNameError("mailbox name contains a wildcard (* or %)")
    segments = name.split(SEPARATOR)
    if len(segments) > MAX_DEPTH:
        raise MailboxNameError(f"mailbox hierarchy deeper than {MAX_DEPTH} levels")
    for segment in segments:
        if not segment:
            raise MailboxNameError(f"mailbox name {name!r} has an empty level")
        if segment in (".", ".."):
            raise MailboxNameError(f"mailbox name {name!r} has a '.' or '..' level")
        if segment != segment.strip():
            raise MailboxNameError(f"mailbox name {name!r} has a level that starts or ends with a space")
        if len(segment) > MAX_SEGMENT_CHARS:
            raise MailboxNameError(f"a level of the mailbox name is longer than {MAX_SEGMENT_CHARS} characters")
    if segments[0].upper() == "INBOX":
        segments[0] = "INBOX"
    return SEPARATOR.join(segments)


def parents(name: str) -> list[str]:
    """"a/b/c" -> ["a", "a/b"]."""
    segments = name.split(SEPARATOR)
    return [SEPARATOR.join(segments[:i]) for i in range(1, len(segments))]


def is_inside(name: str, ancestor: str) -> bool:
    return name.startswith(ancestor + SEPARATOR)


def check_account_name(account: str) -> str:
    """Accounts name directories: only a normalized address is accepted."""
    if (not account or "/" in account or "\0" in account or account.startswith(".")
            or "@" not in account or len(account.encode()) > 255 or account != account.strip()):
        raise ValueError(f"not an account name: {account!r}")
    return account
