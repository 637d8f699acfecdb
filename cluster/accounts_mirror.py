"""The node's copy of the cluster's accounts: etcd -> the local accounts LMDB.

In cluster mode etcd holds domains, users and aliases (cluster/accounts_etcd.py), and every
daemon process keeps reading the local accounts LMDB (storage/accounts.py): a RCPT or a
LOGIN never waits on etcd, and keeps working while etcd is down, on the last copy. One
mirror per node keeps that copy current:

  1. load: every account key at one etcd revision R, written into the LMDB in one
     transaction (readers see the old set or the new one, never half);
  2. watch from R+1 and apply each watch response in one transaction, recording the
     revision reached; Accounts' per-commit answer cache empties on each commit;
  3. on a lost stream, watch again from where it stopped; if etcd compacted that revision
     away, load again. Retries are spaced `retry` seconds apart while etcd is unreachable.
     A watch silent for `idle` seconds is made again too: a connection that died without
     a reset would otherwise leave the copy stale with no error to say so.

A change made on any node is on every other node after one watch round trip (a few ms on
a LAN). Runs as a thread: start(), stop(), wait_revision().
"""

from __future__ import annotations

import socket
import threading
import time

from cluster.accounts_etcd import IDLE, PAGE, TIMEOUT, CompactedError, EtcdAccounts, EtcdUnavailableError
from conf.logfmt import EventLogger
from storage import Accounts

_log = EventLogger("cluster.accounts")


class LocalOnlyError(Exception):
    """This node has accounts that etcd has not: loading etcd's set would lose them."""


class AccountsMirror:
    """Keeps `accounts` (this node's LMDB) a copy of etcd's accounts, in a thread of its own."""

    def __init__(self, accounts: Accounts, endpoints: list[str], prefix: str = "/postroom/", *,
                 retry: float = 1.0, idle: float = IDLE, timeout: float = TIMEOUT, page: int = PAGE,
                 log: EventLogger = _log):
        self._accounts = accounts
        self._etcd = EtcdAccounts(endpoints, prefix, timeout=timeout, page=page)
        self._retry = retry
        self._idle = idle
        self._log = log
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._revision = 0  # what the LMDB holds; 0 = not loaded by this mirror yet
        self._response = None  # the open watch stream, closed by stop()
        self._thread: threading.Thread | None = None

    @property
    def revision(self) -> int:
        return self._revision

    def start(self) -> AccountsMirror:
        self._thread = threading.Thread(target=self._run, name="accounts-mirror", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            _shut(response)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_revision(self, revision: int, timeout: float) -> bool:
        """Whether the copy reached `revision` within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._revision < revision:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _run(self) -> None:
        need_load = True
        while not self._stopping.is_set():
            try:
                if need_load:
                    self._load()
                    need_load = False
                self._follow()
            except CompactedError as e:
                self._log.warning("accounts.mirror.reload", reason=str(e), revision=self._revision)
                need_load = True
            except LocalOnlyError as e:
                self._log.error("accounts.mirror.refused", error=str(e), retry_s=self._retry * 10)
                self._stopping.wait(self._retry * 10)
            except EtcdUnavailableError as e:
                if self._stopping.is_set():
                    break
                self._log.warning("accounts.mirror.etcd_down", error=str(e), revision=self._revision,
                                  retry_s=self._retry)
                self._stopping.wait(self._retry)
            except Exception:  # a bug must not silently freeze the copy: say so, then retry
                self._log.error("accounts.mirror.failed", exc_info=True, revision=self._revision)
                need_load = True
                self._stopping.wait(self._retry)

    def _load(self) -> None:
        revision, rows = self._etcd.load()
        if self._accounts.mirrored_revision() == 0 and not self._accounts.is_empty():
            # The first load on this node, and it has accounts: made before it joined a
            # cluster, they would be wiped by etcd's set. Refuse, and keep serving them,
            # until they are pushed to etcd (cluster/accounts_seed.py) or are there already.
            rows = list(rows)
            known = set(rows)
            only_here = sum(1 for row in self._accounts.rows() if row not in known)
            if only_here:
                raise LocalOnlyError(f"{only_here} local account row(s) are not in etcd; push them first")
        count = self._accounts.replace_mirrored(rows, revision)
        self._advance(revision)
        self._log.info("accounts.mirror.loaded", revision=revision, rows=count)

    def _follow(self) -> None:
        for revision, changes in self._etcd.watch(self._revision + 1, on_open=self._opened, idle=self._idle):
            if self._stopping.is_set():
                return
            self._accounts.apply_mirrored(changes, revision)
            self._advance(revision)
            self._log.debug("accounts.mirror.applied", revision=revision, changes=len(changes))

    def _opened(self, response) -> None:
        self._response = response
        if self._stopping.is_set():
            _shut(response)

    def _advance(self, revision: int) -> None:
        with self._changed:
            self._revision = revision
            self._changed.notify_all()


def _shut(response) -> None:
    """Close a streaming response so that a thread blocked reading it wakes now, not at the
    next event (closing alone leaves the recv waiting): shut the socket down first."""
    try:
        sock = socket.fromfd(response.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    except (AttributeError, OSError, ValueError):
        pass  # already closed
    response.close()
