"""The cluster's keys in etcd, and the few operations on them, over etcd3gw (etcd's v3
JSON gateway): the one module that speaks to etcd.

Keys, under [cluster] prefix (default "/postroom/"):
    nodes/<name>     JSON {"address", "ports"}; bound to the node's lease: a live node
    owners/<shard>   JSON {"node"}; bound to the owner's lease, created only where absent
                     (a transaction comparing create_revision with 0). Its mod_revision is
                     the claim's revision, recorded in the shard as its fence.
    drain/<name>     "" while `postroom cluster drain` holds the node out (no lease: it
                     outlives restarts until `postroom cluster undrain`)

Endpoints are tried in turn: a request that cannot connect to one goes to the next.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import etcd3gw
from etcd3gw import exceptions
from etcd3gw.utils import _encode

from conf.schema import ClusterConfig

REQUEST_TIMEOUT = 3.0  # seconds: well under a lease, so a dead endpoint costs one try
API_PATH = "/v3/"  # etcd 3.4 and later: no discovery request


class EtcdError(Exception):
    """etcd unreachable, or an answer we cannot use; str() is one line."""


@dataclass(frozen=True)
class KeyValue:
    key: str  # without the prefix
    value: bytes
    lease: int
    mod_revision: int
    create_revision: int


@dataclass(frozen=True)
class Snapshot:
    """Everything under the prefix at one revision."""
    revision: int
    keys: dict[str, KeyValue]

    def under(self, folder: str) -> dict[str, KeyValue]:
        """name -> key of nodes/, owners/ or drain/."""
        return {k[len(folder):]: v for k, v in self.keys.items() if k.startswith(folder)}


class Etcd:
    def __init__(self, config: ClusterConfig, timeout: float = REQUEST_TIMEOUT):
        self.prefix = config.prefix
        self.ttl = max(2, math.ceil(float(config.lease_ttl)))
        self._endpoints = [urlsplit(endpoint) for endpoint in config.etcd]
        self._clients = [self._client(url, timeout) for url in self._endpoints]
        self._current = 0

    @staticmethod
    def _client(url, timeout: float | None) -> etcd3gw.client:
        return etcd3gw.client(host=url.hostname, port=url.port or 2379, protocol=url.scheme, timeout=timeout,
                              api_path=API_PATH)

    @property
    def client(self) -> etcd3gw.client:
        return self._clients[self._current]

    def _call(self, action):
        """action(client), on each endpoint in turn until one answers."""
        last: Exception | None = None
        for _ in range(len(self._clients)):
            try:
                return action(self.client)
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as e:
                last = e
                self._current = (self._current + 1) % len(self._clients)
            except exceptions.Etcd3Exception as e:
                raise EtcdError(f"etcd: {e.detail_text if hasattr(e, 'detail_text') else e}") from None
        raise EtcdError(f"etcd unreachable: {last}") from None

    def key(self, name: str) -> str:
        return self.prefix + name

    # -- reads ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        def get(client):
            return client.post(client.get_url("/kv/range"), json={
                "key": _encode(self.prefix), "range_end": _encode(_next(self.prefix))})
        reply = self._call(get)
        keys = {}
        for kv in reply.get("kvs", []):
            name = _decode(kv["key"])[len(self.prefix):]
            keys[name] = KeyValue(name, _decode_bytes(kv.get("value", "")), int(kv.get("lease", 0)),
                                  int(kv["mod_revision"]), int(kv["create_revision"]))
        return Snapshot(int(reply["header"]["revision"]), keys)

    # -- leases -----------------------------------------------------------------------

    def grant(self) -> int:
        reply = self._call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": self.ttl, "ID": 0}))
        return int(reply["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL again; <= 0 when etcd no longer knows it (it expired)."""
        reply = self._call(lambda c: c.post(c.get_url("/lease/keepalive"), json={"ID": lease}))
        return int(reply.get("result", {}).get("TTL", -1))

    def time_to_live(self, lease: int) -> int:
        reply = self._call(lambda c: c.post(c.get_url("/kv/lease/timetolive"), json={"ID": lease}))
        return int(reply.get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease}))

    # -- writes -----------------------------------------------------------------------

    def put(self, name: str, value: bytes, lease: int = 0) -> int:
        request = {"key": _encode(self.key(name)), "value": _encode(value)}
        if lease:
            request["lease"] = lease
        reply = self._call(lambda c: c.post(c.get_url("/kv/put"), json=request))
        return int(reply["header"]["revision"])

    def delete(self, name: str) -> None:
        self._call(lambda c: c.post(c.get_url("/kv/deleterange"), json={"key": _encode(self.key(name))}))

    def create(self, name: str, value: bytes, lease: int) -> int | None:
        """Put `name` only if it does not exist; the revision of the put, or None if it did."""
        key = _encode(self.key(name))
        txn = {"compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
               "success": [{"request_put": {"key": key, "value": _encode(value), "lease": lease}}],
               "failure": []}
        reply = self._call(lambda c: c.transaction(txn))
        return int(reply["header"]["revision"]) if reply.get("succeeded") else None

    def delete_if(self, name: str, mod_revision: int) -> bool:
        """Delete `name` only if it was last written at `mod_revision` (it is still ours)."""
        key = _encode(self.key(name))
        txn = {"compare": [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision}],
               "success": [{"request_delete_range": {"key": key}}], "failure": []}
        return bool(self._call(lambda c: c.transaction(txn)).get("succeeded"))

    # -- watching ---------------------------------------------------------------------

    def watch(self, on_event: Callable[[], None]) -> Callable[[], None]:
        """on_event() at each change under the prefix, from a thread of its own (and a
        connection of its own: requests' sessions are not shared across threads); returns
        the function that cancels it. A broken watch (etcd gone) just ends: callers poll too."""
        client = self._client(self._endpoints[self._current], None)
        try:
            events, cancel = client.watch_prefix(self.prefix)
        except (exceptions.Etcd3Exception, OSError) as e:  # requests' errors are OSErrors
            raise EtcdError(f"etcd watch: {e}") from None

        def consume() -> None:
            try:
                for _ in events:
                    on_event()
            except Exception:  # noqa: BLE001 - the stream broke: the caller's polling goes on
                pass

        threading.Thread(target=consume, name="etcd-watch", daemon=True).start()
        return cancel


def node_record(address: str, ports: dict[str, int]) -> bytes:
    return json.dumps({"address": address, "ports": ports}).encode()


def _next(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _decode(text: str) -> str:
    return _decode_bytes(text).decode()


def _decode_bytes(text: str) -> bytes:
    return base64.b64decode(text)
