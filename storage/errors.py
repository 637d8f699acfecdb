"""Every error the storage package raises, in one place, and the one translation of a
file system's or LMDB's failure into them.

Two families. StoreError and its kinds come from the message store; str() is safe to show
a client (no paths, no other account's names), and each says which reply it maps to.
AccountError and its kinds come from the accounts database; str() is one line for the
sysadmin. AddressError, MailboxNameError and SearchError are ValueErrors: the input was
wrong, not the store.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import lmdb

# -- the message store --------------------------------------------------------------------


class StoreError(Exception):
    """A store operation failed; str() is safe to show (no paths of other accounts)."""


class NotOwnerError(StoreError):
    """Cluster mode (cluster/): this node does not hold the shard now (its claim was
    released, or its lease to etcd lapsed), so nothing was written. Temporary: SMTP 451
    4.3.0, IMAP NO [UNAVAILABLE]; the shard's owner is found again (cluster.ClusterView)."""


class NoOwnerError(StoreError):
    """Cluster mode (cluster/): the shard has no owner just now (its node's lease lapsed, or
    it is being handed over): SMTP 451 4.4.0, IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]."""


class NoQueueError(StoreError):
    """Cluster mode: this node holds no shard just now (it is starting, draining, or its
    lease lapsed), so it has no queue to take outbound mail durably: SMTP 451 4.3.0."""


class DiskFullError(StoreError):
    """The file system (or the data dir owner's disk quota) is full: nothing was written,
    and the same request may succeed once space is freed (SMTP 452 4.3.1)."""


class QuotaExceededError(StoreError):
    """The account is over its quota (SMTP 452 4.2.2, IMAP NO [OVERQUOTA])."""


class FlagError(StoreError):
    """A flag no message may carry, or too many keywords (IMAP BAD / NO [LIMIT])."""


class MailboxError(StoreError):
    """A mailbox operation the store refuses (INBOX deleted, a name inside itself...)."""


class MailboxNotFoundError(MailboxError):
    """No such mailbox (IMAP: NO [NONEXISTENT], or [TRYCREATE] for APPEND and COPY)."""


class MailboxLimitError(MailboxError):
    """Too many mailboxes (IMAP: NO [LIMIT])."""


class MailboxExistsError(MailboxError):
    """IMAP: NO [ALREADYEXISTS]."""


class MetadataLimitError(StoreError):
    """An annotation over a limit (RFC 5464 §4.3): `code` is the IMAP response code to
    answer with, METADATA MAXSIZE n or METADATA TOOMANY."""

    def __init__(self, text: str, code: str):
        super().__init__(text)
        self.code = code


class ExpungedError(StoreError):
    """The message is no longer in the index: expunged (by another session, perhaps) since
    the caller learned of it. Not a fault: IMAP answers NO [EXPUNGEISSUED] (RFC 5530)."""


class DeliveryError(StoreError):
    """Some targets failed. `delivered` lists those that are durable (storage.Delivered),
    `errors` the others as ((account, mailbox), error) pairs."""

    def __init__(self, delivered: list, errors: list[tuple[tuple[str, str], BaseException]]):
        self.delivered, self.errors = delivered, errors
        first = errors[0]
        super().__init__(f"delivery to {first[0][0]} failed: {first[1]}")


class NotQueuedError(StoreError):
    """No such message in the outbound queue (never queued, or delivered, or removed)."""


class MailboxNameError(ValueError):
    """A name no mailbox may have; str() says why."""


class MetadataNameError(ValueError):
    """Not a valid annotation entry name (RFC 5464 §3.2: IMAP BAD)."""


class SearchError(ValueError):
    """A query the store cannot evaluate (imapd answers BAD)."""


# -- the data dir and the accounts database -----------------------------------------------


class DataDirError(Exception):
    """The data dir cannot be used as configured; str() says what to change."""


class AddressError(ValueError):
    """A malformed address or domain; str() is a sentence fit for a sysadmin or an SMTP reply."""


class AccountError(Exception):
    """A request the accounts database refuses; str() is one line for the sysadmin."""


class UnknownDomainError(AccountError):
    pass


class NotLocalError(AccountError):
    """The address's domain is not one of ours (SMTP: relay denied)."""


class UnknownAddressError(AccountError):
    """A local domain, but nobody there by that name (SMTP: 550 5.1.1)."""


class ExistsError(AccountError):
    pass


class NotFoundError(AccountError):
    pass


class DomainNotEmptyError(AccountError):
    pass


class PasswordPolicyError(AccountError):
    pass


class AliasLoopError(AccountError):
    """Alias expansion reaches nobody (a loop, or a chain too deep): SMTP 554 5.4.6."""


# -- a full disk ----------------------------------------------------------------------------

DISK_FULL = "not enough disk space"

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(n) for n in _FULL_ERRNOS)  # LMDB reports them as text
_IO_ERROR = os.strerror(errno.EIO)
# LMDB reports a commit whose page writes came up short as EIO, which is what a full disk
# does to a write that has room for part of its pages. With less than this free, that EIO
# is taken for a full disk; with more, for a failing one.
LOW_SPACE = 8 << 20


def is_disk_full(error: BaseException, where: Path | None = None) -> bool:
    """`error` means the file system at `where` is full (or the owner's quota used up)."""
    if isinstance(error, OSError):
        return error.errno in _FULL_ERRNOS
    if not isinstance(error, lmdb.Error):
        return False
    text = str(error)
    if any(full in text for full in _FULL_TEXTS):
        return True
    if _IO_ERROR in text and where is not None:
        try:
            space = os.statvfs(where)
        except OSError:
            return False
        return space.f_bavail * space.f_frsize < LOW_SPACE
    return False


def store_error(error: BaseException, where: Path | None = None) -> BaseException:
    """What a request that failed with `error` reports: a full disk as DiskFullError (so
    every caller can tell it from a fault), anything else as it is."""
    if is_disk_full(error, where) and not isinstance(error, DiskFullError):
        full = DiskFullError(DISK_FULL)
        full.__cause__ = error
        return full
    return error
