"""Account changes in cluster mode: written to etcd with compare-and-swap, then to this node.

ClusterAccounts stands where the admin CLI (postroom/admin.py) has an Accounts: it reads
from the node's local copy and sends every change to etcd. Each change runs the same
checks as a single node (storage/accounts.py's `*_in` bodies: a user is added only if
absent and not an alias, alias targets must exist, ...) against a view of etcd at one
revision R that remembers every key it read and the revision each was last changed at.
The writes go out in one etcd transaction that succeeds only if none of those keys changed
since R (optimistic concurrency): of two nodes adding the same user at once, exactly one
wins and the other sees "already exists" when it retries. A lost race is retried, a few
times, from a fresh view.

After the commit the change is applied to the local copy at once (if the mirror is not
past it already), so `user add` then `user list` on one node shows the user; the mirror
(cluster/accounts_mirror.py) brings it to the other nodes. Passwords are hashed here,
argon2id, before they leave the process: etcd only ever holds hashes.
"""

from __future__ import annotations

import json
import random
import time

from cluster.accounts_etcd import PAGE, CompactedError, EtcdAccounts, b64, etcd_key, range_end, row_of, table_prefix
from conf.logfmt import EventLogger
from storage import AccountError, Accounts, Alias, Domain, User
from storage.accounts import (
    account_address,
    alias_address,
    domain_name,
    encode_record,
    quota_change,
    target_domain,
)
from storage.addresses import display_domain, parse_address
from storage.errors import DomainNotEmptyError, NotFoundError

ATTEMPTS = 8  # lost compare-and-swap races before giving up; each costs one etcd round trip
_log = EventLogger("cluster.accounts")


class ConflictError(AccountError):
    """Other writers kept changing the same accounts: nothing was written."""


class NotJoinedError(AccountError):
    """This node's own accounts are not in etcd yet: a change now would hide them."""


class _Conflict(Exception):
    pass


class EtcdView:
    """A transaction-like view of etcd's accounts at one revision, for the `*_in` bodies of
    storage.accounts.Accounts: get/put/delete by LMDB key and table handle. Reads go to
    etcd (at the revision of the first read) and are remembered for the compare; writes are
    buffered until commit."""

    def __init__(self, etcd: EtcdAccounts, handles: dict[str, object]):
        self._etcd = etcd
        self._tables = [(handle, name) for name, handle in handles.items()]
        self.revision = 0
        self.compare: list[dict] = []
        self._read: dict[bytes, bytes | None] = {}
        self.writes: dict[tuple[str, bytes], bytes | None] = {}

    def _table(self, db: object) -> str:
        for handle, name in self._tables:
            if handle is db:
                return name
        raise KeyError("not an accounts table")

    def get(self, key: bytes, db: object = None) -> bytes | None:
        table = self._table(db)
        if (table, key) in self.writes:
            return self.writes[(table, key)]
        k = etcd_key(self._etcd.prefix, table, key)
        if k not in self._read:
            revision, kvs, _ = self._etcd.range(k, k + b"\0", revision=self.revision)
            self.revision = self.revision or revision
            self._read[k] = kvs[0]["value"] if kvs else None
            # An absent key compares as mod_revision 0: "still absent at commit".
            self.compare.append({"key": b64(k), "target": "MOD", "result": "EQUAL",
                                 "mod_revision": kvs[0]["mod_revision"] if kvs else 0})
        return self._read[k]

    def put(self, key: bytes, value: bytes, db: object = None, overwrite: bool = True) -> bool:
        if not overwrite and self.get(key, db) is not None:
            return False
        self.get(key, db)  # read before write: the compare then covers it
        self.writes[(self._table(db), key)] = value
        return True

    def delete(self, key: bytes, db: object = None) -> bool:
        if self.get(key, db) is None:
            return False
        self.writes[(self._table(db), key)] = None
        return True

    def requests(self) -> list[dict]:
        ops = []
        for (table, key), value in self.writes.items():
            k = b64(etcd_key(self._etcd.prefix, table, key))
            ops.append({"request_put": {"key": k, "value": b64(value)}} if value is not None
                       else {"request_delete_range": {"key": k}})
        return ops


class ClusterAccounts:
    """An Accounts whose changes go to etcd; reads (and everything else) are the local copy's."""

    def __init__(self, accounts: Accounts, endpoints: list[str], prefix: str = "/postroom/", *,
                 page: int = PAGE, log: EventLogger = _log):
        self._accounts = accounts
        self._etcd = EtcdAccounts(endpoints, prefix, page=page)
        self._log = log
        self.endpoints, self.prefix = list(endpoints), prefix

    def __getattr__(self, name: str):
        return getattr(self._accounts, name)  # domains(), users(), get_user(), resolve(), ...

    def __enter__(self) -> ClusterAccounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self._accounts.close()

    # -- changes, each one etcd transaction --------------------------------------------

    def add_domain(self, name: str) -> Domain:
        domain = domain_name(name)
        return self._write(lambda view: self._accounts.add_domain_in(view, domain))

    def add_user(self, address: str, password: str, *, quota: int = 0, message_quota: int = 0) -> User:
        addr = account_address(address)
        record = self._accounts.new_user_record(password, quota, message_quota)  # argon2id here
        return self._write(lambda view: self._accounts.add_user_in(view, addr, record))

    def remove_user(self, address: str) -> list[Alias]:
        addr = parse_address(address)
        self._write(lambda view: self._accounts.remove_user_in(view, addr))
        return [a for a in self._accounts.aliases() if str(addr) in a.targets]

    def set_password(self, address: str, password: str) -> None:
        addr = parse_address(address)
        changes = self._accounts.password_change(password)
        self._write(lambda view: self._accounts.update_user_in(view, addr, changes))

    def set_quota(self, address: str, quota: int | None = None, message_quota: int | None = None) -> None:
        addr = parse_address(address)
        changes = quota_change(quota, message_quota)
        self._write(lambda view: self._accounts.update_user_in(view, addr, changes))

    def add_alias(self, alias: str, targets: list[str]) -> Alias:
        addr = alias_address(alias)
        return self._write(lambda view: self._accounts.add_alias_in(view, addr, targets))

    def remove_alias(self, alias: str, targets: list[str] | None = None) -> Alias | None:
        addr = alias_address(alias)
        return self._write(lambda view: self._accounts.remove_alias_in(view, addr, targets))

    def _require_joined(self) -> None:
        """A node whose own accounts are not in etcd yet must not take etcd's: see
        cluster/accounts_seed.py. Checked before anything is written."""
        if self._accounts.mirrored_revision() == 0 and not self._accounts.is_empty():
            raise NotJoinedError("this node has accounts that are not in the cluster's etcd yet: "
                                 "push them first (docs/cluster.md)")

    def _write(self, change):
        self._require_joined()
        for attempt in range(ATTEMPTS):
            view = EtcdView(self._etcd, self._accounts.table_handles())
            try:
                result = change(view)
            except CompactedError:  # the revision it read at went meanwhile: a fresh view
                continue
            if not view.writes:
                return result
            succeeded, revision = self._etcd.txn(view.compare, view.requests())
            if succeeded:
                self._apply_here([(*k, v) for k, v in view.writes.items()], revision)
                return result
            time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))  # apart, so one of them wins
        raise ConflictError("other changes to the same accounts kept coming; nothing written, try again")

    def _apply_here(self, changes: list, revision: int) -> None:
        self._accounts.apply_mirrored(changes, revision, if_behind=True)
        self._log.info("accounts.written", revision=revision, changes=len(changes))

    # -- a domain and everything in it -------------------------------------------------

    def remove_domain(self, name: str, *, force: bool = False) -> tuple[int, int]:
        """As Accounts.remove_domain, in one etcd transaction. Its users and aliases go by
        range deletes (one operation each, whatever their number: etcd caps a transaction
        at 128 operations), guarded by "nothing in these ranges changed since R"."""
        domain = domain_name(name)
        self._require_joined()
        for attempt in range(ATTEMPTS):
            try:
                return self._remove_domain_once(domain, force)
            except (_Conflict, CompactedError):
                time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
        raise ConflictError("other changes to the same accounts kept coming; nothing written, try again")

    def _remove_domain_once(self, domain: str, force: bool) -> tuple[int, int]:
        view = EtcdView(self._etcd, self._accounts.table_handles())
        if view.get(domain.encode(), db=self._accounts.table_handles()["domains"]) is None:
            raise NotFoundError(f"no such domain: {display_domain(domain)}")
        R = view.revision
        users_start = table_prefix(self._etcd.prefix, "users") + domain.encode() + b"/"
        aliases_all = table_prefix(self._etcd.prefix, "aliases")
        aliases_start = aliases_all + domain.encode() + b"/"
        users = [kv["key"] for kv in self._etcd.scan(users_start, range_end(users_start), revision=R,
                                                       keys_only=True)[1]]
        own, inbound = [], []
        for kv in self._etcd.scan(aliases_all, range_end(aliases_all), revision=R)[1]:
            targets = json.loads(kv["value"])["targets"]
            if kv["key"].startswith(aliases_start):
                own.append(kv["key"])
            elif any(target_domain(t) == domain for t in targets):
                inbound.append((kv["key"], [t for t in targets if target_domain(t) != domain]))
        if (users or own or inbound) and not force:
            raise DomainNotEmptyError(
                f"domain {display_domain(domain)} still has {len(users)} user(s) and {len(own)} alias(es)"
                + (f", and {len(inbound)} alias(es) elsewhere point into it" if inbound else "")
                + "; remove them first or use --force")
        unchanged_since = {"target": "MOD", "result": "LESS", "mod_revision": R + 1}
        compare = view.compare + [{"key": b64(users_start), "range_end": b64(range_end(users_start)),
                                   **unchanged_since},
                                  {"key": b64(aliases_all), "range_end": b64(range_end(aliases_all)),
                                   **unchanged_since}]
        ops = [{"request_delete_range": {"key": b64(users_start), "range_end": b64(range_end(users_start))}},
               {"request_delete_range": {"key": b64(aliases_start), "range_end": b64(range_end(aliases_start))}}]
        changes = [(*row_of(self._etcd.prefix, key), None) for key in users + own]
        for key, left in inbound:
            value = encode_record(targets=left) if left else None
            ops.append({"request_put": {"key": b64(key), "value": b64(value)}} if value
                       else {"request_delete_range": {"key": b64(key)}})
            changes.append((*row_of(self._etcd.prefix, key), value))
        ops.append({"request_delete_range": {"key": b64(etcd_key(self._etcd.prefix, "domains", domain.encode()))}})
        changes.append(("domains", domain.encode(), None))
        succeeded, revision = self._etcd.txn(compare, ops)
        if not succeeded:
            raise _Conflict()
        self._apply_here(changes, revision)
        return len(users), len(own) + len(inbound)
