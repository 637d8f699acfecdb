"""Postroom's store: the data directory, accounts (domains, users, aliases), addresses, and
(issue 3) the sharded message store. Daemons use this public API and never build paths into
the data dir themselves."""

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

__all__ = [
    "AccountError", "Accounts", "AliasLoopError", "Address", "AddressError", "Alias", "DataDir", "DataDirError",
    "Domain", "DomainNotEmptyError", "ExistsError", "NotFoundError", "NotLocalError",
    "PasswordPolicyError", "Resolution", "UnknownAddressError", "UnknownDomainError", "User",
    "normalize_domain", "open_data_dir", "parse_address",
]
