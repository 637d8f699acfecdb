"""Postroom's store: the data directory, accounts (domains, users, aliases), addresses, and
the sharded message store (Maildir files + an LMDB index per shard), and the outbound queue
(spool files + an LMDB index; in a cluster one per shard, storage/queues.py).

This module is the store's whole face: daemons import `storage` and never a module under it,
and never build paths into the data dir themselves.

Its names are looked up in their modules on first use (PEP 562), not all at once: a CLI
command that manages users loads the accounts' modules, not the store's parser, indexer and
queue (`postroom user list` 0.38 -> 0.16 s, `queue list` 0.44 -> 0.22 s; every test's CLI call).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each name of the face, by the module that defines it.
_FACE: dict[str, tuple[str, ...]] = {
    "storage.accounts": ("Accounts", "Alias", "Domain", "Resolution", "User"),
    "storage.addresses": ("Address", "normalize_domain", "parse_address"),
    "storage.datadir": ("DataDir", "open_data_dir"),
    "storage.errors": ("AccountError", "AddressError", "AliasLoopError", "DataDirError", "DeliveryError",
                       "DiskFullError", "DomainNotEmptyError", "ExistsError", "ExpungedError", "FlagError",
                       "MailboxError", "MailboxExistsError", "MailboxLimitError", "MailboxNameError",
                       "MailboxNotFoundError", "MetadataLimitError", "MetadataNameError", "NotFoundError",
                       "NotLocalError", "NoOwnerError", "NoQueueError", "NotOwnerError", "NotQueuedError",
                       "PasswordPolicyError", "QuotaExceededError", "SearchError", "StoreError",
                       "UnknownAddressError", "UnknownDomainError", "is_disk_full"),
    "storage.locks": ("MaildropLock", "held_flocks", "lock_maildrop"),
    "storage.mailboxes": ("INBOX", "Mailbox"),
    "storage.maildir": ("SEEN",),
    "storage.messages": ("NO_QUOTA", "FlagState", "MessageInfo", "Quota"),
    "storage.metadata": ("METADATA_MAX_VALUE", "metadata_entry_name"),
    "storage.envelope_text": ("imap_envelope",),
    "storage.mime": ("BodyPart", "Envelope", "EnvelopeAddress", "decode_words"),
    "storage.records": ("Usage",),
    "storage.delivery": ("IN_MEMORY", "WRITE_IN_COMMITTER", "Delivered", "Delivery"),
    "storage.queue": ("BOUNCED", "DEFERRED", "DELIVERED", "QUEUED", "Enqueue", "QueuedMessage", "QueuedRecipient",
                      "QueueEnvelope", "Queue", "RecipientState", "Result", "RunnerLock"),
    "storage.queues": ("QueueSet", "queues_on_disk"),
    "storage.doorbell": ("Doorbell",),
    "storage.store": ("Store",),
    "storage.imports": ("ImportCounts", "ImportMailbox", "clean_flags", "finish_import"),
    "storage.watch": ("Watcher",),
}
# Names the face gives under another name than their module's.
_RENAMED = {"METADATA_MAX_VALUE": "MAX_VALUE", "metadata_entry_name": "entry_name", "imap_envelope": "envelope",
            "ImportCounts": "Counts", "finish_import": "finish_account"}
_MODULE_OF = {name: module for module, names in _FACE.items() for name in names}


def __getattr__(name: str):
    try:
        module = _MODULE_OF[name]
    except KeyError:
        raise AttributeError(f"module 'storage' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


if TYPE_CHECKING:  # the same names, for type checkers and editors (a test keeps them equal)
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
    from storage.delivery import IN_MEMORY, WRITE_IN_COMMITTER, Delivered, Delivery
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

__all__ = sorted(_MODULE_OF)
