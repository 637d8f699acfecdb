"""Postroom's store: the data directory, accounts (domains, users, aliases), addresses, and
the sharded message store (Maildir files + an LMDB index per shard), and the outbound queue
(spool files + an LMDB index; in a cluster one per shard, storage/queues.py).

This module is the store's whole face: daemons import `storage` and never a module under it,
and never build paths into the data dir themselves.
"""

from storage.accounts import Accounts, Alias, Domain, Resolution, User
from storage.addresses import Address, normalize_domain, parse_address
from storage.datadir import DataDir, open_data_dir
from storage.errors import (
    AccountError,
    AddressError,
    AliasLoopError,
    DataDirError,
    DeliveryError,
    DiskFullError,
    DomainNotEmptyError,
    ExistsError,
    ExpungedError,
    FlagError,
    MailboxError,
    MailboxExistsError,
    MailboxLimitError,
    MailboxNameError,
    MailboxNotFoundError,
    MetadataLimitError,
    MetadataNameError,
    NotFoundError,
    NotLocalError,
    NoOwnerError,
    NoQueueError,
    NotOwnerError,
    NotQueuedError,
    PasswordPolicyError,
    QuotaExceededError,
    SearchError,
    StoreError,
    UnknownAddressError,
    UnknownDomainError,
    is_disk_full,
)
from storage.locks import MaildropLock, held_flocks, lock_maildrop
from storage.mailboxes import INBOX, Mailbox
from storage.maildir import SEEN
from storage.messages import NO_QUOTA, FlagState, MessageInfo, Quota
from storage.metadata import MAX_VALUE as METADATA_MAX_VALUE
from storage.metadata import entry_name as metadata_entry_name
from storage.envelope_text import envelope as imap_envelope
from storage.mime import BodyPart, Envelope, EnvelopeAddress, decode_words
from storage.records import Usage
from storage.delivery import WRITE_IN_COMMITTER, Delivered, Delivery
from storage.queue import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    QUEUED,
    Enqueue,
    QueuedMessage,
    QueuedRecipient,
    QueueEnvelope,
    Queue,
    RecipientState,
    Result,
    RunnerLock,
)
from storage.queues import QueueSet, queues_on_disk
from storage.doorbell import Doorbell
from storage.store import Store
from storage.imports import Counts as ImportCounts, ImportMailbox, clean_flags, finish_account as finish_import
from storage.watch import Watcher

__all__ = [
    "INBOX", "METADATA_MAX_VALUE", "NO_QUOTA", "SEEN", "WRITE_IN_COMMITTER", "metadata_entry_name",
    # the outbound queue (storage/queue.py)
    "BOUNCED", "DEFERRED", "DELIVERED", "QUEUED", "Enqueue", "NotQueuedError", "Queue", "QueueEnvelope",
    "QueuedMessage", "QueuedRecipient", "RecipientState", "Result", "RunnerLock",
    "QueueSet", "queues_on_disk", "Doorbell",
    "AccountError", "Accounts", "Address", "AddressError", "Alias", "AliasLoopError", "BodyPart",
    "DataDir", "DataDirError", "Delivered", "Delivery", "DeliveryError", "DiskFullError", "Domain",
    "DomainNotEmptyError", "Envelope", "EnvelopeAddress", "ExistsError", "ExpungedError", "FlagError", "FlagState",
    "MaildropLock", "Mailbox", "MailboxError", "MailboxExistsError", "MailboxLimitError",
    "MailboxNameError", "MailboxNotFoundError", "MessageInfo", "MetadataLimitError", "MetadataNameError",
    "NoOwnerError", "NoQueueError", "NotFoundError", "NotLocalError", "NotOwnerError",
    "PasswordPolicyError", "Quota", "QuotaExceededError", "Resolution", "SearchError", "Store",
    "StoreError", "UnknownAddressError", "UnknownDomainError", "Usage", "User", "Watcher",
    # `store import` (storage/imports.py)
    "ImportCounts", "ImportMailbox", "clean_flags", "finish_import",
    "decode_words", "held_flocks", "imap_envelope", "is_disk_full", "lock_maildrop", "normalize_domain",
    "open_data_dir", "parse_address",
]
