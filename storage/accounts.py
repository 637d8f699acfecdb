"""Accounts: domains, users and aliases in one LMDB environment under the data dir.

Every daemon shares this module: mtad asks `resolve` who a recipient is, and imapd, pop3d
and submission call `authenticate`. The admin CLI writes through the same methods.

Layout (`<data_dir>/accounts.lmdb`, one environment, three named databases):
    domains   b"<a-label domain>"              -> {"created": iso}
    users     b"<a-label domain>\\0<local>"    -> {"hash": argon2id, "quota": bytes, "message_quota": n,
                                                  "created": iso}
    aliases   b"<a-label domain>\\0<local>"    -> {"targets": [...]}; an empty local is the catch-all
Keys start with the domain so a domain's users and aliases are one range scan.

Invariants: a user's and an alias's domain is a local domain; an address is a user or an
alias, never both; local alias targets resolved at the time they were added.

Passwords are hashed with argon2id (RFC 9106 parameters, argon2-cffi's defaults). An
unknown address costs one argon2 verification against a dummy hash, like a wrong password,
so that response time does not reveal which addresses exist. LMDB gives the daemons'
readers a consistent snapshot and serializes writers across processes.
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import argon2
import lmdb

from storage.addresses import Address, display_domain, normalize_domain, parse_address, split_detail
from storage.errors import (
    AccountError,
    AddressError,
    AliasLoopError,
    DomainNotEmptyError,
    ExistsError,
    NotFoundError,
    NotLocalError,
    PasswordPolicyError,
    UnknownAddressError,
    UnknownDomainError,
)
from storage.lmdbenv import open_databases
from storage.maildir import make_private_dirs

MAX_PASSWORD_BYTES = 1024  # argon2 hashes any length; an attacker should not choose how much
MIN_PASSWORD_CHARS = 8
MAX_ALIAS_TARGETS = 1000
MAX_EXPANSION_DEPTH = 10
TABLES = ("domains", "users", "aliases")  # the tables a cluster mirrors (cluster/accounts_etcd.py)
MAX_REMEMBERED = 4096  # get_user() and resolve() answers kept between two commits
# Sparse on Linux: only what is written takes disk. 8 GiB, etcd's suggested maximum, so that
# a cluster node's copy of the accounts (cluster/accounts_mirror.py) is never the first to
# fill up: 230 bytes a user measured (100,000 users), 350 with half-full pages: 25 million.
_MAP_SIZE = 8 << 30


@dataclass(frozen=True)
class Domain:
    name: str  # A-label

    @property
    def display(self) -> str:
        return display_domain(self.name)


@dataclass(frozen=True)
class User:
    address: Address
    quota: int  # bytes; 0 is unlimited
    created: str
    message_quota: int = 0  # messages; 0 is unlimited


@dataclass(frozen=True)
class Alias:
    address: Address  # local == "" for the catch-all
    targets: tuple[str, ...]

    @property
    def is_catch_all(self) -> bool:
        return self.address.local == ""

    @property
    def display(self) -> str:
        return f"@{display_domain(self.address.domain)}" if self.is_catch_all else self.address.display


@dataclass(frozen=True)
class Resolution:
    """Where mail to one address goes, after aliases, catch-alls and sub-addressing."""

    local: tuple[Address, ...]  # users' mailboxes, each once
    remote: tuple[str, ...]  # forwarding targets outside our domains
    unknown: tuple[str, ...]  # local targets of an alias that no longer exist


class Accounts:
    def __init__(self, path: Path, *, recipient_delimiter: str = "+", hasher: argon2.PasswordHasher | None = None):
        # lmdb would create the directory with the file mode (no search bit): make it first.
        Path(path).mkdir(mode=0o700, exist_ok=True)
        self._env = lmdb.open(str(path), subdir=True, map_size=_MAP_SIZE, max_dbs=4, mode=0o600)
        databases = open_databases(self._env, (*TABLES, "mirror"))
        self._domains, self._users, self._aliases = (databases[n] for n in TABLES)
        self._mirror = databases["mirror"]
        self._delimiter = recipient_delimiter
        self._hasher = hasher or argon2.PasswordHasher(type=argon2.Type.ID)
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()
        # get_user() and resolve() answers by address, as of one commit of the database: each
        # RCPT asks both, and a delivery asks the quota again (about 50 us each, to parse the
        # address and decode the record). Any commit, by any process (the CLI), empties it.
        self._answers: dict[tuple[str, str], User | Resolution | None] = {}
        self._answers_as_of = -1

    def close(self) -> None:
        self._env.close()

    def copy_to(self, target: Path) -> None:
        """A compact copy of the accounts database at `target` (a new directory), from one
        read transaction, for a backup of a live server (postroom/backup.py)."""
        make_private_dirs(target)
        with self._env.begin() as txn:
            self._env.copy(str(target), compact=True, txn=txn)

    def __enter__(self) -> Accounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- domains -----------------------------------------------------------------------

    def add_domain(self, name: str) -> Domain:
        domain = _domain(name)
        with self._env.begin(write=True) as txn:
            return self.add_domain_in(txn, domain)

    def add_domain_in(self, txn: lmdb.Transaction, domain: str) -> Domain:
        if not txn.put(domain.encode(), _record(created=_now()), db=self._domains, overwrite=False):
            raise ExistsError(f"domain {display_domain(domain)} already exists")
        return Domain(domain)

    def remove_domain(self, name: str, *, force: bool = False) -> tuple[int, int]:
        """Remove a domain; with force, its users and aliases too. Returns (users, aliases) removed."""
        domain = _domain(name)
        with self._env.begin(write=True) as txn:
            if txn.get(domain.encode(), db=self._domains) is None:
                raise NotFoundError(f"no such domain: {display_domain(domain)}")
            users = list(self._keys_in(txn, self._users, domain))
            aliases = list(self._keys_in(txn, self._aliases, domain))
            # Aliases elsewhere that point into this domain would turn into forwards to the
            # outside world once it is no longer local: they go too.
            inbound = [(key, targets) for key, targets in self._alias_items(txn)
                       if not key.startswith(domain.encode() + b"\0")
                       and any(target_domain(t) == domain for t in targets)]
            if (users or aliases or inbound) and not force:
                raise DomainNotEmptyError(
                    f"domain {display_domain(domain)} still has {len(users)} user(s) and "
                    f"{len(aliases)} alias(es)" + (f", and {len(inbound)} alias(es) elsewhere point into it"
                                                  if inbound else "") + "; remove them first or use --force"
                )
            for key in users:
                txn.delete(key, db=self._users)
            for key in aliases:
                txn.delete(key, db=self._aliases)
            for key, targets in inbound:
                left = [t for t in targets if target_domain(t) != domain]
                if left:
                    txn.put(key, _record(targets=left), db=self._aliases)
                else:
                    txn.delete(key, db=self._aliases)
            txn.delete(domain.encode(), db=self._domains)
        return len(users), len(aliases) + len(inbound)

    def domains(self) -> list[Domain]:
        with self._env.begin() as txn:
            return [Domain(key.decode()) for key, _ in txn.cursor(db=self._domains)]

    def is_local_domain(self, name: str) -> bool:
        try:
            domain = normalize_domain(name)
        except AddressError:
            return False
        with self._env.begin() as txn:
            return txn.get(domain.encode(), db=self._domains) is not None

    # -- users -------------------------------------------------------------------------

    def add_user(self, address: str, password: str, *, quota: int = 0, message_quota: int = 0) -> User:
        addr = account_address(address)
        record = self.new_user_record(password, quota, message_quota)
        with self._env.begin(write=True) as txn:
            return self.add_user_in(txn, addr, record)

    def new_user_record(self, password: str, quota: int = 0, message_quota: int = 0) -> bytes:
        return _record(hash=self._hash(password), quota=quota, message_quota=message_quota, created=_now())

    def add_user_in(self, txn: lmdb.Transaction, addr: Address, record: bytes) -> User:
        """The body of add_user, in a transaction the caller gives: this LMDB's, or the
        cluster's view of etcd (cluster/accounts_writer.py), so both check the same rules."""
        self._require_domain(txn, addr.domain)
        if txn.get(_key(addr), db=self._aliases) is not None:
            raise ExistsError(f"{addr.display} is an alias; remove the alias first")
        if not txn.put(_key(addr), record, db=self._users, overwrite=False):
            raise ExistsError(f"user {addr.display} already exists")
        return _user(addr, record)

    def remove_user(self, address: str) -> list[Alias]:
        """Remove a user; returns the aliases that still name it, for the caller to report."""
        addr = parse_address(address)
        with self._env.begin(write=True) as txn:
            self.remove_user_in(txn, addr)
        return [a for a in self.aliases() if str(addr) in a.targets]

    def remove_user_in(self, txn: lmdb.Transaction, addr: Address) -> None:
        if not txn.delete(_key(addr), db=self._users):
            raise NotFoundError(f"no such user: {addr.display}")

    def get_user(self, address: str) -> User | None:
        answers = self._current_answers()
        key = ("user", address)
        if key in answers:
            return answers[key]
        try:
            addr = parse_address(address)
        except AddressError:
            return None
        with self._env.begin() as txn:
            raw = txn.get(_key(addr), db=self._users)
        user = _user(addr, raw) if raw is not None else None
        self._remember(answers, key, user)
        return user

    def _current_answers(self) -> dict:
        # The id of a read transaction, not env.info()'s last_txnid: a committer writes the
        # meta page (which info() reads) before it publishes the transaction to new readers,
        # so in that window info() says N while a read still sees N-1, and an answer read
        # then would be kept, stale, as N's until the next commit (seen: a user added by
        # the cluster's mirror stayed "unknown" in the same process). A read that begins
        # after this one sees this snapshot or a newer one: an answer kept here may be newer
        # than `as_of`, never older.
        with self._env.begin() as txn:
            as_of = txn.id()
        if as_of != self._answers_as_of:
            self._answers = {}
            self._answers_as_of = as_of
        return self._answers

    @staticmethod
    def _remember(answers: dict, key: tuple[str, str], answer: User | Resolution | None) -> None:
        """Into the dict taken before the read: if a commit came between, that dict is
        already out of date, and the next caller drops it."""
        if len(answers) >= MAX_REMEMBERED:  # addresses come from strangers: bounded
            answers.clear()
        answers[key] = answer

    def users(self, domain: str | None = None) -> list[User]:
        with self._env.begin() as txn:
            if domain is None:
                items = list(txn.cursor(db=self._users))
            else:
                d = _domain(domain)
                self._require_domain(txn, d)
                items = [(k, txn.get(k, db=self._users)) for k in self._keys_in(txn, self._users, d)]
        return [_user(_address_of(key), raw) for key, raw in items]

    def set_password(self, address: str, password: str) -> None:
        self._update_user(address, **self.password_change(password))

    def password_change(self, password: str) -> dict[str, str]:
        """The user-record fields that set this password (checked against the policy)."""
        return {"hash": self._hash(password)}

    def set_quota(self, address: str, quota: int | None = None, message_quota: int | None = None) -> None:
        """Set the storage quota (bytes), the message quota (count), or both; 0 is unlimited."""
        self._update_user(address, **quota_change(quota, message_quota))

    def _update_user(self, address: str, **changes: object) -> None:
        addr = parse_address(address)
        with self._env.begin(write=True) as txn:
            self.update_user_in(txn, addr, changes)

    def update_user_in(self, txn: lmdb.Transaction, addr: Address, changes: dict) -> None:
        raw = txn.get(_key(addr), db=self._users)
        if raw is None:
            raise NotFoundError(f"no such user: {addr.display}")
        txn.put(_key(addr), _record(**{**json.loads(raw), **changes}), db=self._users)

    # -- the cluster's mirror (cluster/accounts_mirror.py) --------------------------------
    #
    # In cluster mode etcd holds the accounts and this database is the node's copy of them:
    # every process still reads here, so RCPT and LOGIN never wait on the network. Changes
    # arrive as (table, key, value or None) in this database's own key and value format,
    # with the etcd revision they bring the copy up to, kept in the "mirror" table.

    def table_handles(self) -> dict[str, object]:
        """The LMDB handle of each table, for a transaction-like view that names tables by handle."""
        return {"domains": self._domains, "users": self._users, "aliases": self._aliases}

    def rows(self):
        """Every (table, key, value) of the three tables, as the mirror compares and seeds them."""
        with self._env.begin() as txn:
            for table, db in self.table_handles().items():
                yield from ((table, key, value) for key, value in txn.cursor(db=db))

    def mirrored_revision(self) -> int:
        with self._env.begin() as txn:
            raw = txn.get(b"revision", db=self._mirror)
        return int(raw) if raw else 0

    def replace_mirrored(self, items, revision: int) -> int:
        """Make the tables exactly `items` ((table, key, value), from one etcd revision), in
        one transaction, so a reader sees the old set or the new one. Returns the count."""
        handles = self.table_handles()
        count = 0
        with self._env.begin(write=True) as txn:
            for db in handles.values():
                txn.drop(db, delete=False)
            for table, key, value in items:
                txn.put(key, value, db=handles[table])
                count += 1
            txn.put(b"revision", str(revision).encode(), db=self._mirror)
        return count

    def apply_mirrored(self, changes, revision: int, *, if_behind: bool = False) -> bool:
        """Apply (table, key, value or None) changes in one transaction and record `revision`.
        With if_behind (a writer applying its own change at once), apply only if the mirror
        has not reached `revision` yet, and leave the recorded revision alone: the mirror
        still replays every event after its own, this one included, in order."""
        handles = self.table_handles()
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"revision", db=self._mirror)
            if if_behind and raw and int(raw) >= revision:
                return False
            for table, key, value in changes:
                if value is None:
                    txn.delete(key, db=handles[table])
                else:
                    txn.put(key, value, db=handles[table])
            if not if_behind or not raw:  # (a writer's change on a node never loaded: it joins with it)
                txn.put(b"revision", str(revision).encode(), db=self._mirror)
        return True

    def is_empty(self) -> bool:
        """No domain, user or alias at all (a node about to join a cluster, for one)."""
        with self._env.begin() as txn:
            return all(txn.stat(db)["entries"] == 0 for db in self.table_handles().values())

    # -- authentication ----------------------------------------------------------------

    def authenticate(self, address: str, password: str) -> User | None:
        """The user if the password is right; None for any failure, in the same time."""
        dummy = self._dummy()
        user_record = None
        try:
            addr = parse_address(address)
            with self._env.begin() as txn:
                raw = txn.get(_key(addr), db=self._users)
            if raw is not None:
                user_record = json.loads(raw)
        except AddressError:
            pass
        candidate = _password_bytes(password)
        if candidate is None or len(candidate) > MAX_PASSWORD_BYTES:
            candidate = b""  # still verified against something, so it costs the same
        stored = user_record["hash"] if user_record else dummy
        try:
            self._hasher.verify(stored, candidate)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None
        if user_record is None or not candidate:
            return None
        if self._hasher.check_needs_rehash(stored):
            self._rehash(addr, stored, candidate)
        return _user(addr, json.dumps(user_record).encode())

    def _dummy(self) -> str:
        # Made on first use, by whichever call comes first, so the first unknown-address
        # login is not the only one that pays for a hash.
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self._hasher.hash("postroom-dummy-password")
            return self._dummy_hash

    def _rehash(self, addr: Address, old: str, password: bytes) -> None:
        new = self._hasher.hash(password)
        with self._env.begin(write=True) as txn:
            raw = txn.get(_key(addr), db=self._users)
            if raw is not None and json.loads(raw)["hash"] == old:
                txn.put(_key(addr), _record(**{**json.loads(raw), "hash": new}), db=self._users)

    def _hash(self, password: str) -> str:
        encoded = _password_bytes(password)
        if encoded is None:
            raise PasswordPolicyError("password is not valid UTF-8")
        if len(password) < MIN_PASSWORD_CHARS:
            raise PasswordPolicyError(f"password too short: at least {MIN_PASSWORD_CHARS} characters")
        if len(encoded) > MAX_PASSWORD_BYTES:
            raise PasswordPolicyError(f"password too long: at most {MAX_PASSWORD_BYTES} bytes")
        if any(c in password for c in "\r\n\0"):
            raise PasswordPolicyError("password contains a line break or NUL")
        return self._hasher.hash(encoded)

    # -- aliases -----------------------------------------------------------------------

    def add_alias(self, alias: str, targets: list[str]) -> Alias:
        """Create an alias, or add targets to an existing one. "@domain" is the catch-all."""
        addr = alias_address(alias)
        with self._env.begin(write=True) as txn:
            return self.add_alias_in(txn, addr, targets)

    def add_alias_in(self, txn: lmdb.Transaction, addr: Address, targets: list[str]) -> Alias:
        self._require_domain(txn, addr.domain)
        if addr.local and txn.get(_key(addr), db=self._users) is not None:
            raise ExistsError(f"{addr.display} is a user; an address is a user or an alias, not both")
        raw = txn.get(_key(addr), db=self._aliases)
        existing = json.loads(raw)["targets"] if raw else []
        merged = list(existing)
        for target in targets:
            normalized = self._check_target(txn, addr, target)
            if normalized not in merged:
                merged.append(normalized)
        if len(merged) > MAX_ALIAS_TARGETS:
            raise AccountError(f"an alias may have at most {MAX_ALIAS_TARGETS} targets")
        txn.put(_key(addr), _record(targets=merged), db=self._aliases)
        return Alias(addr, tuple(merged))

    def remove_alias(self, alias: str, targets: list[str] | None = None) -> Alias | None:
        """Remove the alias, or only some targets; returns what is left (None if removed)."""
        addr = alias_address(alias)
        with self._env.begin(write=True) as txn:
            return self.remove_alias_in(txn, addr, targets)

    def remove_alias_in(self, txn: lmdb.Transaction, addr: Address, targets: list[str] | None) -> Alias | None:
        raw = txn.get(_key(addr), db=self._aliases)
        if raw is None:
            shown = f"@{display_domain(addr.domain)}" if not addr.local else addr.display
            raise NotFoundError(f"no such alias: {shown}")
        if not targets:
            txn.delete(_key(addr), db=self._aliases)
            return None
        current = json.loads(raw)["targets"]
        drop = {self._target_form(txn, t) for t in targets}
        missing = drop - set(current)
        if missing:
            raise NotFoundError(f"not a target of this alias: {', '.join(sorted(missing))}")
        left = [t for t in current if t not in drop]
        if not left:
            txn.delete(_key(addr), db=self._aliases)
            return None
        txn.put(_key(addr), _record(targets=left), db=self._aliases)
        return Alias(addr, tuple(left))

    def aliases(self, domain: str | None = None) -> list[Alias]:
        with self._env.begin() as txn:
            if domain is None:
                items = list(txn.cursor(db=self._aliases))
            else:
                d = _domain(domain)
                self._require_domain(txn, d)
                items = [(k, txn.get(k, db=self._aliases)) for k in self._keys_in(txn, self._aliases, d)]
        return [Alias(_address_of(key), tuple(json.loads(raw)["targets"])) for key, raw in items]

    def _check_target(self, txn: lmdb.Transaction, alias: Address, target: str) -> str:
        normalized = self._target_form(txn, target)
        if normalized.startswith("@"):
            if alias.local:
                raise AddressError(f"target {target!r}: only a catch-all (@domain) may forward to a whole domain")
            if normalized[1:] == alias.domain:
                raise AccountError(f"@{display_domain(alias.domain)} cannot forward to itself")
            return normalized
        addr = parse_address(normalized, fold_case=False)
        if txn.get(addr.domain.encode(), db=self._domains) is not None:
            if addr == alias:
                raise AccountError(f"{alias.display} cannot be its own target")
            if self._lookup(txn, addr) is None:
                raise UnknownAddressError(f"target {addr.display} is in a local domain but is no user or alias there")
        return normalized

    def _target_form(self, txn: lmdb.Transaction, target: str) -> str:
        """How a target is stored: local addresses folded to lowercase, remote ones as given."""
        target = target.strip()
        if target.startswith("@"):
            return "@" + normalize_domain(target[1:])
        addr = parse_address(target, fold_case=False)
        if txn.get(addr.domain.encode(), db=self._domains) is not None:
            addr = Address(addr.local.lower(), addr.domain)
        return str(addr)

    # -- recipient resolution ----------------------------------------------------------

    def resolve(self, address: str) -> Resolution:
        """Who receives mail sent to `address`: raises AddressError, NotLocalError, UnknownAddressError."""
        answers = self._current_answers()
        known = answers.get(("resolve", address))
        if known is not None:
            return known
        resolution = self._resolve(address)
        self._remember(answers, ("resolve", address), resolution)
        return resolution

    def _resolve(self, address: str) -> Resolution:
        addr = parse_address(address)
        local: dict[Address, None] = {}
        remote: dict[str, None] = {}
        unknown: dict[str, None] = {}
        with self._env.begin() as txn:
            if txn.get(addr.domain.encode(), db=self._domains) is None:
                raise NotLocalError(f"{display_domain(addr.domain)} is not a local domain")
            found = self._lookup(txn, addr)
            if found is None:
                raise UnknownAddressError(f"no such user here: {addr.display}")
            pending = [(found, addr, 0)]
            seen: set[Address] = set()
            while pending:
                (kind, value), via, depth = pending.pop(0)
                if kind == "user":
                    local.setdefault(value, None)
                    continue
                if via in seen or depth >= MAX_EXPANSION_DEPTH:
                    continue  # a loop or a chain too long: that branch delivers nowhere
                seen.add(via)
                for target in value:
                    next_addr = (Address(via.local, target[1:]) if target.startswith("@")
                                 else parse_address(target, fold_case=False))
                    if txn.get(next_addr.domain.encode(), db=self._domains) is None:
                        remote.setdefault(str(next_addr), None)
                        continue
                    next_addr = Address(next_addr.local.lower(), next_addr.domain)
                    hit = self._lookup(txn, next_addr)
                    if hit is None:
                        unknown.setdefault(str(next_addr), None)
                    else:
                        pending.append((hit, next_addr, depth + 1))
        if not local and not remote:
            if unknown:
                raise UnknownAddressError(f"{addr.display} is an alias of addresses that no longer exist")
            raise AliasLoopError(f"{addr.display}: alias expansion loops or is deeper than {MAX_EXPANSION_DEPTH}")
        return Resolution(tuple(local), tuple(remote), tuple(unknown))

    def may_send_as(self, user: Address, address: str) -> bool:
        """Whether `user` may send mail as `address` (submission, RFC 6409 §6.1): the user's
        own address, a sub-address of it ("user+tag"), or a local alias whose expansion
        reaches the user. A catch-all does not count: it would make every unknown address
        of the domain the user's to send as."""
        try:
            addr = parse_address(address)
        except AddressError:
            return False
        base, detail = split_detail(addr.local, self._delimiter)
        candidates = [addr] if detail is None else [addr, Address(base, addr.domain)]
        if user in candidates:
            return True
        with self._env.begin() as txn:
            if txn.get(addr.domain.encode(), db=self._domains) is None:
                return False
            for candidate in candidates:
                if txn.get(_key(candidate), db=self._users) is not None:
                    return False  # another user's address
                if txn.get(_key(candidate), db=self._aliases) is not None:
                    break
            else:
                return False
        try:
            return user in self.resolve(str(candidate)).local
        except (AccountError, AddressError):
            return False

    def _lookup(self, txn: lmdb.Transaction, addr: Address) -> tuple[str, object] | None:
        """("user", Address) or ("alias", targets) for an address in a local domain."""
        candidates = [addr]
        base, detail = split_detail(addr.local, self._delimiter)
        if detail is not None:
            candidates.append(Address(base, addr.domain))
        for candidate in candidates:
            raw = txn.get(_key(candidate), db=self._aliases)
            if raw is not None:
                return "alias", json.loads(raw)["targets"]
            if txn.get(_key(candidate), db=self._users) is not None:
                return "user", candidate
        raw = txn.get(_key(Address("", addr.domain)), db=self._aliases)
        if raw is not None:
            return "alias", json.loads(raw)["targets"]
        return None

    # -- helpers -----------------------------------------------------------------------

    def _require_domain(self, txn: lmdb.Transaction, domain: str) -> None:
        if txn.get(domain.encode(), db=self._domains) is None:
            raise UnknownDomainError(f"unknown domain {display_domain(domain)}: add it with 'postroom domain add'")

    def _alias_items(self, txn: lmdb.Transaction):
        for key, raw in txn.cursor(db=self._aliases):
            yield key, json.loads(raw)["targets"]

    @staticmethod
    def _keys_in(txn: lmdb.Transaction, db: object, domain: str):
        prefix = domain.encode() + b"\0"
        cursor = txn.cursor(db=db)
        if cursor.set_range(prefix):
            for key in cursor.iternext(values=False):
                if not key.startswith(prefix):
                    break
                yield key


def _domain(name: str) -> str:
    return normalize_domain(name.strip())


def domain_name(name: str) -> str:
    """A domain as the tables key it (A-label, lowercase)."""
    return _domain(name)


def quota_change(quota: int | None = None, message_quota: int | None = None) -> dict[str, int]:
    return {k: v for k, v in (("quota", quota), ("message_quota", message_quota)) if v is not None}


def encode_key(addr: Address) -> bytes:
    return _key(addr)


def encode_record(**fields: object) -> bytes:
    return _record(**fields)


def account_address(text: str) -> Address:
    """Addresses we create are stricter than those we accept: letters, digits, . _ - + '."""
    addr = parse_address(text.strip())
    if not all(c.isalnum() or c in "._-+'" for c in addr.local):
        raise AddressError(f"{text!r}: a new address may use only letters, digits and . _ - + '")
    return addr


def alias_address(text: str) -> Address:
    text = text.strip()
    if text.startswith("@"):
        return Address("", normalize_domain(text[1:]))
    return account_address(text)


def target_domain(target: str) -> str:
    return target.rpartition("@")[2]


def _password_bytes(password: str) -> bytes | None:
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: bytes that were not UTF-8
        return None


def _key(addr: Address) -> bytes:
    return f"{addr.domain}\0{addr.local}".encode()


def _address_of(key: bytes) -> Address:
    domain, _, local = key.decode().partition("\0")
    return Address(local, domain)


def _user(addr: Address, raw: bytes) -> User:
    record = json.loads(raw)
    return User(addr, record.get("quota", 0), record.get("created", ""), record.get("message_quota", 0))


def _record(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
