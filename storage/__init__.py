"""Postroom's store: the data directory, accounts (domains, users, aliases), addresses, and
the sharded message store (Maildir files + an LMDB index per shard).

This module is the store's whole face: daemons import `storage` and never a module under it,
and never build paths into the data dir themselves.
"""

from storage.accounts import (
    AccountError,
    Accounts,
    AliasLoopError,
    Alias,
    Domain,
    DomainNotEmptyError,
    ExistsError,
    NotFoundError,
    NotLocalError,
    PasswordPolicyError,
    Resolution,
    UnknownAddressError,
    UnknownDomainError,
    User,
)
from storage.addresses import Address, AddressError, normalize_domain, parse_address
from storage.datadir import DataDir, DataDirError, open_data_dir
from storage.locks import MaildropLock, lock_maildrop
from storage.mailboxes import (
    INBOX,
    Mailbox,
    MailboxError,
    MailboxExistsError,
    MailboxLimitError,
    MailboxNotFoundError,
)
from storage.maildir import SEEN
from storage.messages import NO_QUOTA, FlagError, FlagState, MessageInfo, Quota, QuotaExceededError
from storage.names import MailboxNameError
from storage.search import SearchError
from storage.shard import DiskFullError, StoreError, is_disk_full
from storage.delivery import WRITE_IN_COMMITTER, Delivered, Delivery, DeliveryError
from storage.store import Store
from storage.watch import Watcher

__all__ = [
    "INBOX", "NO_QUOTA", "SEEN", "WRITE_IN_COMMITTER",
    "AccountError", "Accounts", "Address", "AddressError", "Alias", "AliasLoopError",
    "DataDir", "DataDirError", "Delivered", "Delivery", "DeliveryError", "DiskFullError", "Domain",
    "DomainNotEmptyError", "ExistsError", "FlagError", "FlagState", "MaildropLock", "Mailbox",
    "MailboxError", "MailboxExistsError", "MailboxLimitError", "MailboxNameError",
    "MailboxNotFoundError", "MessageInfo", "NotFoundError", "NotLocalError",
    "PasswordPolicyError", "Quota", "QuotaExceededError", "Resolution", "SearchError", "Store",
    "StoreError", "UnknownAddressError", "UnknownDomainError", "User", "Watcher",
    "is_disk_full", "lock_maildrop", "normalize_domain", "open_data_dir", "parse_address",
]
