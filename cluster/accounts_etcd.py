"""The accounts as etcd keeps them in cluster mode, and the few etcd calls the mirror and
the writers make (etcd v3 through its JSON gateway, with etcd3gw's client and session).

Keys, under the cluster prefix (default "/postroom/"):
    <prefix>accounts/domains/<a-label domain>
    <prefix>accounts/users/<a-label domain>/<local>
    <prefix>accounts/aliases/<a-label domain>/<local>      (an empty local is the catch-all)
Values are the JSON records storage/accounts.py keeps in its LMDB tables, byte for byte
(password hashes included), so the mirror copies them without decoding. A local part we
create never holds "/" (storage.accounts.account_address), so the key splits back exactly.

Every call names the revision it saw (the response header's), which is what makes a
consistent load (range at one revision, then watch from the next) and compare-and-swap
writes possible. Endpoints are tried in order; when none answers, EtcdUnavailableError.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import etcd3gw
import requests
import urllib3
from etcd3gw import exceptions as etcd_exceptions

from storage import AccountError
from storage.accounts import TABLES

PAGE = 2000  # keys per range request of a load or a scan: bounded responses at any size
MAX_MESSAGE = 64 << 20  # bytes of one watch message before we call the stream broken
TIMEOUT = 5.0  # seconds for one unary request; a dead etcd is an error, not a hang
IDLE = 30.0  # seconds of a silent watch before it is made again (one request per node)


class EtcdUnavailableError(AccountError):
    """No etcd endpoint answered: the cluster's accounts cannot change right now."""


class EtcdRequestError(AccountError):
    """etcd answered with an error (too many operations, no space left, ...)."""


class CompactedError(Exception):
    """The revision a watch wanted is gone (compacted): reload from a fresh revision."""


def accounts_prefix(prefix: str) -> str:
    return prefix.rstrip("/") + "/accounts/"


def etcd_key(prefix: str, table: str, key: bytes) -> bytes:
    """The etcd key of one row: LMDB's "domain\\0local" becomes "domain/local"."""
    return accounts_prefix(prefix).encode() + table.encode() + b"/" + key.replace(b"\0", b"/", 1)


def table_prefix(prefix: str, table: str) -> bytes:
    return accounts_prefix(prefix).encode() + table.encode() + b"/"


def row_of(prefix: str, key: bytes) -> tuple[str, bytes] | None:
    """(table, LMDB key) for an etcd key under the accounts prefix; None for anything else."""
    rest = key[len(accounts_prefix(prefix).encode()):]
    table, _, row = rest.partition(b"/")
    if table.decode(errors="replace") not in TABLES or not row:
        return None
    if table != b"domains":
        row = row.replace(b"/", b"\0", 1)
    return table.decode(), row


def range_end(prefix: bytes) -> bytes:
    """The end of the range of keys starting with `prefix` (etcd's convention)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


class EtcdAccounts:
    """Requests to etcd's gateway over one of `endpoints` ("http://host:port")."""

    def __init__(self, endpoints: list[str], prefix: str = "/postroom/", *, timeout: float = TIMEOUT,
                 page: int = PAGE):
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self._timeout = timeout
        self.page = page
        self._clients = []
        for url in endpoints:
            parts = urlsplit(url)
            self._clients.append(etcd3gw.client(host=parts.hostname, port=parts.port or 2379,
                                                protocol=parts.scheme or "http", timeout=timeout,
                                                api_path="/v3/"))

    def post(self, path: str, payload: dict) -> dict:
        failures = []
        for client in self._clients:
            try:
                return client.post(client.get_url(path), json=payload)
            except (etcd_exceptions.ConnectionFailedError, etcd_exceptions.ConnectionTimeoutError) as e:
                failures.append(f"{client.base_url}: {type(e).__name__}")
            except etcd_exceptions.Etcd3Exception as e:  # etcd answered, and refused
                if "compacted" in (e.detail_text or ""):
                    raise CompactedError(_reason(e)) from None
                raise EtcdRequestError(f"etcd refused the request: {_reason(e)}") from None
        raise EtcdUnavailableError(f"etcd unreachable ({'; '.join(failures)}): accounts cannot change now")

    def range(self, start: bytes, end: bytes, *, revision: int = 0, limit: int = 0,
              keys_only: bool = False) -> tuple[int, list[dict], bool]:
        """(revision, kvs with bytes key/value and int mod_revision, more) for [start, end)."""
        payload: dict = {"key": b64(start), "range_end": b64(end)}
        if revision:
            payload["revision"] = revision
        if limit:
            payload["limit"] = limit
        if keys_only:
            payload["keys_only"] = True
        reply = self.post("/kv/range", payload)
        kvs = [{"key": unb64(kv["key"]), "value": unb64(kv.get("value", "")),
                "mod_revision": int(kv.get("mod_revision", 0))} for kv in reply.get("kvs", [])]
        return int(reply["header"]["revision"]), kvs, bool(reply.get("more"))

    def scan(self, start: bytes, end: bytes, *, revision: int = 0,
             keys_only: bool = False) -> tuple[int, Iterator[dict]]:
        """(revision, kvs) of [start, end) at one revision, fetched a page at a time as the
        kvs are iterated: bounded responses and memory whatever the number of keys. Every
        page is read at the same revision (CompactedError if that goes meanwhile)."""
        revision, first, more = self.range(start, end, revision=revision, limit=self.page, keys_only=keys_only)

        def kvs(page=first, more=more):
            while True:
                yield from page
                if not more:
                    return
                _, page, more = self.range(page[-1]["key"] + b"\0", end, revision=revision, limit=self.page,
                                           keys_only=keys_only)

        return revision, kvs()

    def load(self) -> tuple[int, Iterator[tuple[str, bytes, bytes]]]:
        """Every account row at one revision, as (table, LMDB key, value), read as iterated."""
        start = accounts_prefix(self.prefix).encode()
        revision, kvs = self.scan(start, range_end(start))
        rows = ((*row, kv["value"]) for kv in kvs if (row := row_of(self.prefix, kv["key"])) is not None)
        return revision, rows

    def txn(self, compare: list[dict], success: list[dict]) -> tuple[bool, int]:
        """One compare-and-swap transaction: (succeeded, revision after it)."""
        reply = self.post("/kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(reply.get("succeeded")), int(reply["header"]["revision"])

    def watch(self, start_revision: int, on_open=None, *,
              idle: float = IDLE) -> Iterator[tuple[int, list[tuple[str, bytes, bytes | None]]]]:
        """(revision, changes) for each watch response from `start_revision` on, until the
        stream ends (EtcdUnavailableError), the revision is compacted (CompactedError), or
        nothing came for `idle` seconds (the iterator just ends: watch again from where it
        got to). The last is what notices a connection that went silent without a reset
        (a partition, a lost NAT entry): otherwise the copy would stay stale with no error.
        `on_open(response)` gets the HTTP response, so a stopper can close it."""
        start = accounts_prefix(self.prefix).encode()
        request = {"create_request": {"key": b64(start), "range_end": b64(range_end(start)),
                                      "start_revision": start_revision}}
        failures = []
        for client in self._clients:
            try:
                response = client.session.post(client.get_url("/watch"), json=request, stream=True,
                                               timeout=(self._timeout, idle))
                break
            except requests.exceptions.RequestException as e:
                failures.append(f"{client.base_url}: {type(e).__name__}")
        else:
            raise EtcdUnavailableError(f"etcd unreachable ({'; '.join(failures)})")
        if on_open is not None:
            on_open(response)
        try:
            for message in _messages(response):
                result = message.get("result", {})
                if int(result.get("compact_revision", 0) or 0):
                    raise CompactedError(f"revision {start_revision} compacted")
                if result.get("canceled"):
                    raise CompactedError(f"watch canceled: {result.get('cancel_reason', '')}")
                events = result.get("events") or []
                if not events:
                    continue
                changes = []
                for event in events:
                    kv = event["kv"]
                    row = row_of(self.prefix, unb64(kv["key"]))
                    if row is None:
                        continue
                    value = None if event.get("type") == "DELETE" else unb64(kv.get("value", ""))
                    changes.append((*row, value))
                yield int(events[-1]["kv"]["mod_revision"]), changes
        except (requests.exceptions.RequestException, AttributeError, ValueError) as e:
            if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
                return  # idle for `idle` seconds
            # AttributeError/ValueError: the stream closed under the reader by a stop
            raise EtcdUnavailableError(f"watch stream ended: {type(e).__name__}") from None
        finally:
            response.close()
        raise EtcdUnavailableError("watch stream ended")


def _reason(error: etcd_exceptions.Etcd3Exception) -> str:
    """etcd's own message from the gateway's JSON error body, else the HTTP reason."""
    try:
        body = json.loads(error.detail_text or "")
        return str(body.get("error") or body.get("message") or body)
    except (TypeError, ValueError, AttributeError):
        return error.detail_text or str(error)


def _messages(response) -> Iterator[dict]:
    """The JSON messages of a watch stream as they arrive: the gateway ends each with a line
    break (seen with etcd 3.4). Read as raw chunks, each byte once, and bounded."""
    parts: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=None):
        while chunk:
            head, newline, chunk = chunk.partition(b"\n")
            parts.append(head)
            size += len(head)
            if not newline:
                break
            line, parts, size = b"".join(parts), [], 0
            if line.strip():
                yield json.loads(line)
        if size > MAX_MESSAGE:
            raise CompactedError(f"a watch message over {MAX_MESSAGE} bytes: load instead")
