"""Greylisting ([greylist], off by default): the first message of an unknown triplet is
answered 451 4.7.1 and a retry after `delay` is accepted. Senders that retry (real MTAs,
RFC 5321 §4.5.4.1) lose a few minutes once; many spam senders never come back.

The triplet is (the client's network, the sender, the recipient): the network is the
address's /24 (IPv4) or /64 (IPv6, one site's usual allocation), since a sender's outbound
pool often retries from another address of the same network; an IPv4-mapped IPv6 address
counts as its IPv4 address. Addresses are compared lowercased.

`check(ip, sender, recipient)` gives 0.0 (pass) or the seconds still to wait:
- unknown, or a first try older than `retry_window`: recorded, wait `delay`;
- a retry before `delay` is up: the time left (the first try's clock is not reset);
- a retry after `delay`, within `retry_window`: passes, and the triplet is then passed at
  once for `expire` after its last message (each passing message extends it).
`remember_domain(domain)` notes a domain whose mail passed with an aligned DKIM or SPF pass;
`known_domain(domain)` says whether it did within `expire`, so the caller can skip the
delay for it next time.

Shared by every process of a data dir: given a path, the table is LMDB at
`<data_dir>/greylist.lmdb` (each check one write transaction, serialized across processes;
not synced: a crash forgets at worst the last seconds of first tries, which costs a sender
one more delay). Bounded: past MAX_TRACKED entries the first tries go, oldest first, and
only then the passed triplets and known domains.
Triplets are stored under a hash of their text: addresses up to 256 bytes each would not
fit LMDB's 511-byte keys, and nobody needs to read them back. Without a path the table is
this process's alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import lmdb

from policy.shared_table import open_shared

from conf.schema import GreylistConfig

MAX_TRACKED = 500_000
_MAP_SIZE = 256 << 20  # MAX_TRACKED entries of ~60 bytes need ~60 MiB; sparse on Linux
# first try, last message, 1 once passed (triplets) or 2 (a known domain)
_ENTRY = struct.Struct("<ddB")
_WAITING, _PASSED, _DOMAIN = 0, 1, 2


def network(ip: str) -> str:
    """The greylisting network of a client address: its /24 or /64."""
    address = ipaddress.ip_address(ip)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _triplet_key(ip: str, sender: str, recipient: str) -> bytes:
    text = "\0".join((network(ip), sender.lower(), recipient.lower()))
    return b"t" + hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _domain_key(domain: str) -> bytes:
    return b"d" + hashlib.blake2b(domain.lower().rstrip(".").encode("utf-8", "surrogateescape"),
                                  digest_size=16).digest()


class Greylist:
    def __init__(self, path: Path | None, config: GreylistConfig, clock=time.time):
        self._config = config
        self._clock = clock
        self._table: _MemoryTable | _SharedTable = _SharedTable(path) if path is not None else _MemoryTable()

    def check(self, ip: str, sender: str, recipient: str) -> float:
        """0.0 to let this (client, sender, recipient) through, else the seconds to wait."""
        now = self._clock()
        return self._table.update(_triplet_key(ip, sender, recipient), lambda entry: self._decide(entry, now))

    def _decide(self, entry: tuple[float, float, int] | None, now: float) -> tuple[tuple | None, float]:
        """(what to store, or None to leave it; the answer) for the stored entry."""
        delay, window, expire = float(self._config.delay), float(self._config.retry_window), float(self._config.expire)
        if entry is not None:
            first, last, state = entry
            if state == _PASSED and now - last <= expire:
                return (first, now, _PASSED), 0.0
            if state == _WAITING and now - first <= window:
                if now - first >= delay:
                    return (first, now, _PASSED), 0.0
                return None, first + delay - now
        if delay <= 0:
            return (now, now, _PASSED), 0.0
        return (now, now, _WAITING), delay

    def known_domain(self, domain: str) -> bool:
        entry = self._table.get(_domain_key(domain))
        return entry is not None and self._clock() - entry[1] <= float(self._config.expire)

    def remember_domain(self, domain: str) -> None:
        now = self._clock()
        self._table.update(_domain_key(domain), lambda entry: ((now, now, _DOMAIN), None))

    def close(self) -> None:
        self._table.close()


class _MemoryTable:
    """This process's entries, the least recently changed first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, tuple[float, float, int]] = OrderedDict()

    def get(self, key: bytes) -> tuple[float, float, int] | None:
        return self._entries.get(key)

    def update(self, key: bytes, decide: Callable):
        new, answer = decide(self._entries.get(key))
        if new is not None:
            self._entries[key] = new
            self._entries.move_to_end(key)
            if len(self._entries) > MAX_TRACKED:
                for dropped in _to_drop(list(self._entries.items())):
                    del self._entries[dropped]
        return answer

    def close(self) -> None:
        pass


class _SharedTable:
    def __init__(self, path: Path):
        self._env = open_shared(path, _MAP_SIZE)

    def get(self, key: bytes) -> tuple[float, float, int] | None:
        with self._env.begin() as txn:
            raw = txn.get(key)
        return None if raw is None else _ENTRY.unpack(raw)

    def update(self, key: bytes, decide: Callable):
        with self._env.begin(write=True) as txn:
            raw = txn.get(key)
            new, answer = decide(None if raw is None else _ENTRY.unpack(raw))
            if new is not None:
                txn.put(key, _ENTRY.pack(*new))
                if raw is None and txn.stat()["entries"] > MAX_TRACKED:
                    _trim(txn)
        return answer

    def close(self) -> None:
        self._env.close()


def _trim(txn: lmdb.Transaction) -> None:
    """Drop entries down to 90% of MAX_TRACKED: one scan per MAX_TRACKED / 10 new entries at
    most."""
    for key in _to_drop([(key, _ENTRY.unpack(raw)) for key, raw in txn.cursor()]):
        txn.delete(key)


def _to_drop(entries: list[tuple[bytes, tuple[float, float, int]]]) -> list[bytes]:
    """What goes when the table is full: first tries first, the oldest of them first, and
    only then passed triplets and known domains, the least recent first. A flood of first
    tries (a spammer's made-up triplets) then flushes only its own kind, never what
    legitimate senders earned by retrying."""
    excess = len(entries) - MAX_TRACKED * 9 // 10
    if excess <= 0:
        return []
    ranked = sorted(entries, key=lambda item: (item[1][2] != _WAITING, item[1][1]))
    return [key for key, _ in ranked[:excess]]
