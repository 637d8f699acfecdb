"""Tell a daemon when a mailbox changes, whichever process changed it (IDLE, POP3 locks).

LMDB gives every read transaction the id of the newest transaction published to readers,
kept in the lock file's shared memory, which every process maps: reading it costs no file
access (Shard.last_commit; a read that begins after it sees that transaction). A watcher
thread polls that id for the shards it watches every `interval` seconds; only when
it moved does it read the watched mailboxes' states (UIDNEXT, HIGHESTMODSEQ, EXISTS) and
call back those that differ. New mail, flag changes and expunges all bump HIGHESTMODSEQ, so
each is seen within one interval.

An account can be watched whole too (IMAP NOTIFY, RFC 5465): the callback then gets the
account's listing, every mailbox with its counters and subscription, and the version of its
annotations (storage/metadata.py), whenever any of them or the set of mailboxes changed
(created, deleted, renamed, subscribed, annotated). That reads every
mailbox record of the account on each commit to its shard, so it is for the few sessions
that ask, not for every IDLE.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from conf.logfmt import EventLogger
from storage.mailboxes import Mailbox
from storage.errors import NotOwnerError, StoreError
from storage.store import Store

_log = EventLogger("storage.watch")


@dataclass(eq=False)
class Watch:
    account: str
    mailbox: str | None  # None: the whole account (watch_account)
    callback: Callable
    last: tuple | None = None
    watcher: Watcher | None = field(default=None, repr=False)

    def cancel(self) -> None:
        if self.watcher is not None:
            self.watcher._remove(self)


class Watcher:
    def __init__(self, store: Store, interval: float = 0.25):
        self._store = store
        self._interval = interval
        self._watches: dict[int, list[Watch]] = {}  # shard number -> watches
        self._last_commit: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, account: str, mailbox: str, callback: Callable[[Mailbox | None], None]) -> Watch:
        """Call `callback(new state)` from the watcher thread after each change; None if the
        mailbox is gone. Callers hand it on to their own loop (call_soon_threadsafe,
        callFromThread)."""
        shard = self._store.shard_number(account)
        # The commit id first, then the state: a change in between is then seen as new.
        commit = self._store.shard(account).last_commit()
        state = self._store.mailbox(account, mailbox)
        watch = Watch(account, mailbox, callback, _key(state), self)
        self._add(shard, watch, commit)
        return watch

    def watch_account(self, account: str, callback: Callable[[list[Mailbox], int, int], None]
                      ) -> tuple[Watch, list[Mailbox], int, int]:
        """Call `callback(listing, annotations version, commit)` from the watcher thread after
        each change to any of the account's mailboxes, to the set of them or to its
        annotations; returns the watch and the listing, version and commit it starts from.
        `commit` is the shard's last commit id before the listing was read
        (Store.last_commit): a listing read later elsewhere (after a command of the
        client's own) may reach the caller first, and then this one is stale. It reads the
        store: call it in a worker thread."""
        commit = self._store.shard(account).last_commit()
        listing, version = self._store.mailboxes(account), self._store.metadata_version(account)
        watch = Watch(account, None, callback, (_listing_key(listing), version), self)
        self._add(self._store.shard_number(account), watch, commit)
        return watch, listing, version, commit

    def _add(self, shard: int, watch: Watch, commit: int) -> None:
        with self._lock:
            self._watches.setdefault(shard, []).append(watch)
            self._last_commit[shard] = min(commit, self._last_commit.get(shard, commit))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _remove(self, watch: Watch) -> None:
        with self._lock:
            for watches in self._watches.values():
                if watch in watches:
                    watches.remove(watch)

    def _run(self) -> None:
        """Until close(): IDLE depends on this thread, so a failure costs one shard one poll
        (logged, once per kind until it clears), never the thread."""
        failing: dict[int, str] = {}
        while not self._stop.wait(self._interval):
            with self._lock:
                shards = {number: list(watches) for number, watches in self._watches.items() if watches}
            for number, watches in shards.items():
                try:
                    self._poll(number, watches)
                except NotOwnerError:
                    continue  # released by this node: its sessions are being ended (cluster/follow.py)
                except Exception as e:  # noqa: BLE001 - see the docstring
                    if self._store.closed:
                        return
                    kind = type(e).__name__
                    if failing.get(number) != kind:
                        _log.error("watch_failed", exc_info=True, shard=number)
                        failing[number] = kind
                else:
                    if failing.pop(number, None) is not None:
                        _log.info("watch_recovered", shard=number)

    def _poll(self, number: int, watches: list[Watch]) -> None:
        commit = self._store.shard(watches[0].account).last_commit()
        if commit == self._last_commit.get(number):
            return
        self._last_commit[number] = commit
        for watch in watches:
            self._check(watch, commit)

    def _check(self, watch: Watch, commit: int) -> None:
        if watch.mailbox is None:
            self._check_account(watch, commit)
            return
        try:
            state: Mailbox | None = self._store.mailbox(watch.account, watch.mailbox)
        except NotOwnerError:
            raise  # not "the mailbox is gone": the shard is, from this node
        except StoreError:
            state = None
        key = _key(state) if state is not None else None
        if key == watch.last:
            return
        watch.last = key
        try:
            watch.callback(state)
        except Exception:  # a subscriber's bug must not stop every other subscriber's updates
            _log.error("watch_callback_failed", exc_info=True, account=watch.account, mailbox=watch.mailbox)
        if state is None:
            watch.cancel()


    def _check_account(self, watch: Watch, commit: int) -> None:
        try:
            listing, version = self._store.mailboxes(watch.account), self._store.metadata_version(watch.account)
        except NotOwnerError:
            raise
        except StoreError:
            return  # the next commit tries again
        key = (_listing_key(listing), version)
        if key == watch.last:
            return
        watch.last = key
        try:
            watch.callback(listing, version, commit)
        except Exception:  # as in _check
            _log.error("watch_callback_failed", exc_info=True, account=watch.account)


def _listing_key(listing: list[Mailbox]) -> tuple:
    return tuple((m.id, m.name, m.subscribed, *_key(m)) for m in listing)


def _key(state: Mailbox) -> tuple[int, int, int]:
    return state.uidnext, state.highestmodseq, state.exists
