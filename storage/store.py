"""The message store: the one interface mtad, imapd, pop3d and the CLI use for mail.

An account lives in one shard, chosen by a stable hash of its address modulo the shard
count recorded in the data dir. Every method is synchronous and thread-safe; asyncio and
Twisted callers run them in a thread. A delivery is streamed and two-phase
(begin_delivery: storage/delivery.py); its start_commit hands the work to the shards'
committers and reports through a callback, for an event loop that delivers many small
messages a second. Writes return once durable (file fsynced and renamed,
directory fsynced, index committed with fsync); concurrent writes to a shard share a commit.
Mailboxes are named with "/" as separator; messages are addressed by UID ranges, never by
sequence numbers (those belong to an IMAP session).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import msgspec

from storage import dedupe as duplicates
from storage import fts, journal, mailboxes, messages, metadata, recent, records, search, settle, urlauth, vanished
from storage.datadir import DataDir
from storage.delivery import Delivered, Delivery
from storage.errors import (
    DeliveryError,
    ExpungedError,
    MailboxExistsError,
    MailboxNotFoundError,
    NotOwnerError,
    StoreError,
)
from storage.fileview import FileView
from storage.listing import Listing, Listings
from storage.mailboxes import INBOX, Mailbox
from storage.maildir import memory_file
from storage.messages import ALL, NO_QUOTA, FlagState, MessageInfo, Quota, UidRanges, normalize_ranges
from storage.mime import parse_message
from storage.names import check_account_name, normalize_name
from storage.pinning import Pin, Release, open_pinned, take
from storage.records import Usage
from storage.queue import wait_for_commits as wait_for_queue_commits
from storage.shard import Shard, uid_key
from storage.slots import CommitSlots


DEDUPE_WINDOW = 24 * 3600  # seconds; [storage] dedupe_window
OPEN_TRIES = 3  # a shard being closed (released) when asked for: waits for the close, then again
CLOSE_WAIT = 60.0  # seconds, at most, a close may take (its commits and reads in flight end first)
# Shards of a process that commit at once (Shard.commit_slots). Each shard has its own
# committer thread; left to run together, sixteen of them fight for the GIL with the event
# loop and with each other (715 context switches a message sent to sixteen users at C=50),
# and each commits a batch of about one. Two at a time, the others' requests gather into
# larger batches while they wait: 2.0-2.8x the messages to sixteen recipients, +15-40% to
# sixteen users spread one a message (bench/spread.py; bench/RESULTS.md, "Sixteen shards").
# Two, not one: one commit's flush (the log's, LMDB's) then overlaps another's work.
COMMIT_SLOTS = 2


class Store:
    def __init__(self, data_dir: DataDir, *, quota_of: Callable[[str], Quota | int] | None = None,
                 dedupe_window: float = DEDUPE_WINDOW, fence: Callable[[int, int], bool] | None = None,
                 held: Callable[[int], bool] | None = None, pin: Callable[[int], Release] | None = None,
                 reads_wait: bool = True):
        """`fence`: cluster mode's check of every commit (storage/shard.py, "Fencing"):
        fence(shard number, recorded claim revision) -> whether this node may write it.
        `held`: a cluster daemon's (cluster/follow.py): held(shard number) -> whether this
        node holds the shard now, its volume attached; a shard is opened only then, and is
        otherwise NotOwnerError. `pin`: cluster mode's (storage/pinning.py): pin(shard
        number) before a shard is opened, let go once it is closed and no file of it is
        open here (NotOwnerError while its volume is being detached). `reads_wait`: a read
        that meets another process's commit in flight waits for it (storage/shard.py,
        Shard.read), so that it sees every message a 250 was given for; the daemons' reads
        do not (an event loop must not block on it: they see the message a moment later)."""
        self._data_dir = data_dir
        self._fence = fence
        self._held = held
        self._pin = pin
        self._pinned: dict[int, Release] = {}  # the open shards' own pins
        self._dedupe_window = dedupe_window
        self._reads_wait = reads_wait
        self._shards: dict[int, Shard] = {}
        self._closing: dict[int, threading.Event] = {}  # shards being closed: not opened again meanwhile
        self._lock = threading.Lock()
        self._limits_of = quota_of or (lambda account: NO_QUOTA)
        self._closed = False
        self._listings = Listings()
        self._commit_slots = CommitSlots(COMMIT_SLOTS)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            try:
                shard.close()
            finally:
                self._unpin(shard.number)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shards -------------------------------------------------------------------------

    def shard_number(self, account: str) -> int:
        digest = hashlib.blake2b(account.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self._data_dir.shards

    def shard(self, account: str) -> Shard:
        check_account_name(account)
        return self._shard_by_number(self.shard_number(account))

    def shards(self) -> list[Shard]:
        """Every shard, opened; in a cluster (`held`), those this node holds now."""
        if self._held is None:
            return [self._shard_by_number(n) for n in range(self._data_dir.shards)]
        found = []
        for number in range(self._data_dir.shards):
            try:
                found.append(self._shard_by_number(number))
            except NotOwnerError:
                pass  # another node's (its volume is not attached here)
        return found

    def _shard_by_number(self, number: int) -> Shard:
        for _ in range(OPEN_TRIES):
            with self._lock:
                closing = self._closing.get(number)
                if closing is None:
                    return self._open_shard(number)
            # LMDB allows one environment a file and process: the close finishes first.
            closing.wait(CLOSE_WAIT)
        raise NotOwnerError(f"shard {number} is not served by this node now")

    def _open_shard(self, number: int) -> Shard:
        """Shard `number`, opened if it is not open yet; under self._lock."""
        if self._closed:
            raise StoreError("store is closed")
        shard = self._shards.get(number)
        if shard is None:
            # Pinned first, then asked whether it is held: a release that withdrew the claim
            # meanwhile either waits for this pin or made this open fail.
            pin = functools.partial(self._pin, number) if self._pin is not None else None
            release = take(pin)
            try:
                if self._held is not None and not self._held(number):
                    # Its volume is not attached here (or is being detached): never touched.
                    raise NotOwnerError(f"shard {number} is not served by this node now")
                shard = self._new_shard(number, pin)
            except BaseException:
                release()
                raise
            self._shards[number] = shard
            self._pinned[number] = release
        return shard

    def _new_shard(self, number: int, pin: Pin | None) -> Shard:
        shard = Shard(self._data_dir.shard_path(number), number)
        shard.fence = self._fence
        shard.pin = pin
        shard.reads_wait = self._reads_wait
        shard.idle_work = functools.partial(self._idle_work, shard)
        shard.commit_slots = self._commit_slots
        shard.settler = functools.partial(settle.settle, shard)
        shard.place_again = functools.partial(journal.place_again, shard)
        shard.match_files = functools.partial(settle.match, shard)
        shard.flush_files = journal.FileSystemFlusher(shard.path)
        # Before anyone reads it here: finish what a crash of any process left,
        # then put back what a crash of the machine lost of journaled files.
        try:
            settle.recover(shard)
            journal.restore(shard)
        except NotOwnerError:
            pass  # a cluster's shard another node owns: its owner recovers it, on taking it
        except BaseException:
            shard.close()
            raise
        return shard

    def _unpin(self, number: int) -> None:
        with self._lock:
            release = self._pinned.pop(number, None)
        if release is not None:
            release()

    # -- cluster mode: a shard taken and released by this node (cluster/agent.py) ---------

    def take_shard(self, number: int, revision: int) -> None:
        """Open shard `number` (finishing what a crash left in it) and record `revision`,
        this node's etcd claim, as the one its commits are fenced with."""
        self._shard_by_number(number).set_fence(revision)

    def release_shard(self, number: int, *, clear_fence: bool = True) -> None:
        """Hand shard `number` over: the fence cleared (after every commit in flight, in any
        process: LMDB's writer lock; and those of the shard's outbound queue), the file
        system flushed, and this process's handle closed, so that its volume can be
        detached. `clear_fence=False` when the claim is already lost: another node may have
        written its own fence since."""
        if clear_fence:
            shard = self._shard_by_number(number)
            shard.set_fence(0)
            # The shard's outbound queue (storage/queue.py, a cluster's) likewise: its
            # commits in flight done before the flush below.
            wait_for_queue_commits(shard.path / "queue")
        else:
            with self._lock:
                shard = self._shards.get(number)
            if shard is None:
                return  # not open here: nothing of this process's to flush or close
        shard.flush()
        self.close_shard(number)

    def close_shard(self, number: int, *, released: bool = False) -> bool:
        """Close this process's handle on shard `number`, if open (the next use opens it
        again, recovering it first): a daemon lets go of a shard its node released, so that
        the volume can be detached (cluster/follow.py). Commits queued finish first, and
        reads in progress; later uses of the closed shard raise NotOwnerError (`released`)
        or StoreError. Whether it was open."""
        with self._lock:
            shard = self._shards.pop(number, None)
            if shard is None:
                return False
            done = self._closing[number] = threading.Event()
        try:
            shard.close(released=released)
        finally:
            self._unpin(number)
            with self._lock:
                del self._closing[number]
            done.set()
        return True

    def open_shards(self) -> list[int]:
        """The numbers of the shards this process has open now."""
        with self._lock:
            return sorted(self._shards)

    def fence_revision(self, number: int) -> int:
        """The claim revision recorded in shard `number` (0: none)."""
        shard = self._shard_by_number(number)
        with shard.read() as txn:
            return shard.fence_revision(txn)

    def _idle_work(self, shard: Shard, txn) -> bool:
        """The committer's work between requests: full-text indexing, forgetting old
        deduplication keys. True while some remains."""
        more = fts.index_pending(txn, shard)
        return duplicates.prune(txn, shard, time.time() - self._dedupe_window) or more

    def recover(self) -> None:
        """Open every shard now, finishing what a crash left in each (see storage/settle.py),
        rather than on first use: a daemon does this before it listens, so that no request
        waits for it (an event loop least of all). A cluster daemon's store opens those its
        node holds now (`held`); the others when the node takes them."""
        self.shards()

    # -- accounts and mailboxes ---------------------------------------------------------

    def _account_shard(self, account: str) -> Shard:
        """The shard of an account that exists in the store (with its default mailboxes)."""
        self.ensure_account(account)
        return self.shard(account)

    def ensure_account(self, account: str) -> None:
        shard = self.shard(account)
        with shard.read() as txn:
            if records.account_exists(txn, shard, account):
                return
        shard.write(lambda txn, batch: mailboxes.ensure_account(txn, shard, batch, account))

    def accounts_ready(self, accounts: Iterable[str]) -> bool:
        """Every account exists in the store (delivery to it will not stop to create it)."""
        for account in accounts:
            shard = self.shard(account)
            with shard.read() as txn:
                if not records.account_exists(txn, shard, account):
                    return False
        return True

    def mailboxes(self, account: str) -> list[Mailbox]:
        self.ensure_account(account)
        shard = self.shard(account)
        with shard.read() as txn:
            return mailboxes.listing(txn, shard, account)

    def mailbox(self, account: str, name: str) -> Mailbox:
        self.ensure_account(account)
        shard = self.shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, name)
            return mailboxes.to_mailbox(mailbox_id, state)

    def mailbox_name(self, account: str, mailbox_id: int) -> str | None:
        """The current name of a mailbox known by its id (UIDVALIDITY): it follows renames.
        None once it is deleted."""
        shard = self.shard(account)
        with shard.read() as txn:
            state = records.get_mailbox(txn, shard, mailbox_id)
            return state.name if state is not None and state.account == account else None

    def create_mailbox(self, account: str, name: str, special_use: str | None = None) -> Mailbox:
        self.ensure_account(account)
        shard = self.shard(account)
        return shard.write(lambda txn, batch: mailboxes.create(txn, shard, batch, account, name, special_use))

    def junk_mailbox(self, account: str, fallback: str = "Junk") -> str:
        """The name of the account's \\Junk mailbox (RFC 6154), wherever the user moved it;
        without one, `fallback`, made (as \\Junk) if it does not exist. Where the spam
        filter's verdict sends mail."""
        listing = self.mailboxes(account)
        for mailbox in listing:
            if mailbox.special_use == "\\Junk":
                return mailbox.name
        if not any(m.name == fallback for m in listing):
            try:
                self.create_mailbox(account, fallback, "\\Junk")
            except MailboxExistsError:
                pass  # made at the same time by another delivery
        return fallback

    def delete_mailbox(self, account: str, name: str) -> None:
        self.ensure_account(account)
        shard = self.shard(account)
        shard.write(lambda txn, batch: mailboxes.delete(txn, shard, batch, account, name))

    def rename_mailbox(self, account: str, old: str, new: str) -> None:
        self.ensure_account(account)
        shard = self.shard(account)
        shard.write(lambda txn, batch: mailboxes.rename(txn, shard, batch, account, old, new))

    def subscribe(self, account: str, name: str, on: bool = True) -> None:
        shard = self.shard(account)
        shard.write(lambda txn, batch: mailboxes.set_subscribed(txn, shard, account, name, on))

    def subscriptions(self, account: str) -> list[str]:
        shard = self.shard(account)
        with shard.read() as txn:
            return mailboxes.subscriptions(txn, shard, account)

    # -- annotations (RFC 5464; storage/metadata.py) --------------------------------------

    def _annotated(self, txn, shard: Shard, account: str, mailbox: str) -> int:
        """The id annotations of `mailbox` are kept under: SERVER for "" (the server's)."""
        return metadata.SERVER if mailbox == "" else mailboxes.find(txn, shard, account, mailbox)[0]

    def get_metadata(self, account: str, mailbox: str, entries: Iterable[str], depth: str = "0"
                     ) -> list[tuple[str, bytes]]:
        """(entry, value) of the entries asked for that have a value, and those below them
        down to `depth` ("0", "1", "infinity"); MailboxNotFoundError for no such mailbox."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            return metadata.get(txn, shard, account, self._annotated(txn, shard, account, mailbox), entries, depth)

    def set_metadata(self, account: str, mailbox: str, items: Iterable[tuple[str, bytes | None]]) -> list[str]:
        """Set each entry (None removes it), all or none (MetadataLimitError); the entries changed."""
        shard = self._account_shard(account)
        items = list(items)
        return shard.write(lambda txn, batch: metadata.set_entries(
            txn, shard, account, self._annotated(txn, shard, account, mailbox), items))

    def last_commit(self, account: str) -> int:
        """The id of the last commit to the account's shard, by any process (cheap)."""
        return self.shard(account).last_commit()

    def metadata_version(self, account: str) -> int:
        """A number that changes with every change to the account's annotations."""
        shard = self.shard(account)
        with shard.read() as txn:
            return metadata.usage(txn, shard, account).version

    def metadata_digests(self, account: str) -> dict[tuple[int, str], int]:
        """(mailbox id or 0 for the server, entry) -> a checksum of each annotation's value."""
        shard = self.shard(account)
        with shard.read() as txn:
            return metadata.digests(txn, shard, account)

    # -- URLAUTH access keys (RFC 4467; storage/urlauth.py) ---------------------------------

    def urlauth_key(self, account: str, mailbox: str, *, create: bool = False) -> tuple[int, bytes | None]:
        """(the mailbox's id, its access key): made now with `create`, else None if it has
        none. MailboxNotFoundError for no such mailbox or account (nothing is made for an
        account that does not exist: URLFETCH names other users' accounts)."""
        shard = self.shard(account)
        with shard.read() as txn:
            if not records.account_exists(txn, shard, account):
                raise MailboxNotFoundError(f"no mailbox {mailbox!r}")
            mailbox_id, _ = mailboxes.find(txn, shard, account, mailbox)
            key = urlauth.get(txn, shard, account, mailbox_id)
        if key is None and create:
            key = shard.write(lambda txn, batch: urlauth.ensure(
                txn, shard, account, mailboxes.find(txn, shard, account, mailbox)[0]))
        return mailbox_id, key

    def urlauth_reset(self, account: str, mailbox: str | None) -> None:
        """RESETKEY: the access key of `mailbox`, or of every mailbox (None), removed."""
        shard = self._account_shard(account)
        shard.write(lambda txn, batch: urlauth.drop(
            txn, shard, account, None if mailbox is None else mailboxes.find(txn, shard, account, mailbox)[0]))

    # -- \Recent (storage/recent.py) -----------------------------------------------------

    def claim_recent(self, account: str, mailbox_id: int, upto: int) -> int:
        """A session takes \\Recent for the UIDs up to `upto` nobody has seen yet: returns
        the claim before (the session's UIDs are those above it). Writes only when there is
        something to take, so a SELECT with no new mail commits nothing."""
        shard = self.shard(account)
        with shard.read() as txn:
            state = records.get_mailbox(txn, shard, mailbox_id)
            if state is None or state.account != account:
                return upto
            if state.recent_upto is not None and state.recent_upto >= upto:
                return state.recent_upto
        return shard.write(lambda txn, batch: recent.claim(txn, shard, account, mailbox_id, upto))

    def recent_count(self, account: str, name: str) -> int:
        """STATUS RECENT: the messages of the mailbox no session has seen yet."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, name)
            return recent.count(txn, shard, mailbox_id, state)

    def quota(self, account: str) -> Quota:
        """The account's limits (`quota_of` may give bytes alone, as an int)."""
        limits = self._limits_of(account)
        return Quota(limits) if isinstance(limits, int) else limits

    def is_full(self, account: str) -> bool:
        """The account has reached its quota (SMTP answers 452 4.2.2 at RCPT)."""
        quota = self.quota(account)
        if not quota.bytes and not quota.messages:
            return False
        usage = self.usage(account)
        return bool(quota.bytes and usage.used >= quota.bytes
                    or quota.messages and usage.messages >= quota.messages)

    def usage(self, account: str) -> Usage:
        """Bytes `used` and `messages` over all of the account's mailboxes."""
        shard = self.shard(account)
        with shard.read() as txn:
            return records.get_usage(txn, shard, account)

    def usage_by_shard(self) -> dict[int, Usage]:
        """Each shard's messages and bytes (what quotas count), by shard number: the
        store's size for metrics, read in one short transaction per shard. A cluster
        node's store leaves out the shards it does not serve now."""
        result = {}
        for number in range(self._data_dir.shards):
            try:
                shard = self._shard_by_number(number)
                with shard.read() as txn:
                    result[number] = records.shard_usage(txn, shard)
            except NotOwnerError:
                continue  # another node's, or being handed over: its owner counts it
        return result

    # -- delivery -----------------------------------------------------------------------

    def begin_delivery(self, targets: Iterable[tuple[str, str] | str], *, flags: Iterable[str] = (),
                       internal_date: float | None = None, dedupe_from: int | None = None) -> Delivery:
        """A message for each distinct (account, mailbox) target ("account" alone is its
        INBOX), written a chunk at a time and then committed or aborted (storage/delivery.py).
        Mail received by SMTP gives `dedupe_from`, where in the message the bytes its sender
        sent begin (after the trace headers added here): a target that already has this
        message (the same Message-ID and the same bytes, within [storage] dedupe_window) gets
        no second copy, and its Delivered says `duplicate`. Raises for bad flags or dates,
        and DiskFullError (or StoreError) when the message's file cannot be made."""
        bits, keywords = messages.parse_flags(flags)
        if internal_date is not None and not -2**62 < internal_date < 2**62:
            raise ValueError(f"internal date out of range: {internal_date}")
        wanted = list(dict.fromkeys((t, INBOX) if isinstance(t, str) else (t[0], normalize_name(t[1]))
                                    for t in targets))
        return Delivery(wanted, shard_of=self.shard, mailbox_of=self._mailbox_id, quota_of=self.quota,
                        bits=bits, keywords=keywords, internal_date=internal_date,
                        key_from=dedupe_from if self._dedupe_window > 0 else None, window=self._dedupe_window)

    def deliver(self, targets: Iterable[tuple[str, str] | str], raw: bytes, *, flags: Iterable[str] = (),
                internal_date: float | None = None, dedupe_from: int | None = None) -> list[Delivered]:
        """A whole message at once (begin_delivery, one write, commit): returns when every
        copy is durable; DeliveryError if any failed (the `delivered` ones are durable all
        the same)."""
        targets = list(targets)
        try:
            delivery = self.begin_delivery(targets, flags=flags, internal_date=internal_date,
                                           dedupe_from=dedupe_from)
        except StoreError as e:
            raise _all_failed(targets, e) from None
        with delivery:
            try:
                delivery.write(raw)
            except StoreError as e:
                raise _all_failed(delivery.targets, e) from None
            return delivery.commit()

    def start_delivery(self, targets: Iterable[tuple[str, str] | str], raw: bytes, *,
                       on_done: Callable[[list[Delivered], list[tuple[tuple[str, str], BaseException]]], None],
                       flags: Iterable[str] = (), internal_date: float | None = None,
                       dedupe_from: int | None = None) -> None:
        """deliver() without waiting (Delivery.start_commit, with its limits): `on_done(delivered,
        errors)` is called once every target is settled."""
        targets = list(targets)
        try:
            delivery = self.begin_delivery(targets, flags=flags, internal_date=internal_date,
                                           dedupe_from=dedupe_from)
            delivery.write(raw)
        except StoreError as e:
            failed = _all_failed(targets, e)
            on_done([], failed.errors)
            return

        def done(delivered: list[Delivered], errors: list) -> None:
            delivery.close()
            on_done(delivered, errors)

        delivery.start_commit(done)

    def append(self, account: str, mailbox: str, raw: bytes, *, flags: Iterable[str] = (),
               internal_date: float | None = None) -> Delivered:
        """IMAP APPEND: into an existing mailbox only (MailboxNotFoundError means TRYCREATE)."""
        try:
            return self.deliver([(account, mailbox)], raw, flags=flags, internal_date=internal_date)[0]
        except DeliveryError as e:
            raise e.errors[0][1] from None

    def _mailbox_id(self, shard: Shard, account: str, name: str) -> int:
        with shard.read() as txn:
            if mailboxes.account_exists(txn, shard, account):
                return mailboxes.find(txn, shard, account, name)[0]
        self.ensure_account(account)
        with shard.read() as txn:
            return mailboxes.find(txn, shard, account, name)[0]

    # -- messages -----------------------------------------------------------------------

    def uids(self, account: str, mailbox: str) -> tuple[Mailbox, list[int], list[int]]:
        """(mailbox state, every UID ascending, their flag bits) from one snapshot."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            # Kept from the last call and brought up to date (storage/listing.py): a SELECT
            # of a big mailbox would otherwise read one record per message every time.
            listing = self._listings.get(txn, shard, account, mailbox_id, state.modseq, state.exists)
            return mailboxes.to_mailbox(mailbox_id, state), listing.uids.tolist(), list(listing.bits)

    def flag_listing(self, account: str, mailbox: str) -> Listing:
        """Every message's UID, flag bits, keywords and MODSEQ as of now (storage/listing.py),
        the object kept between calls: read it, never change it. What FETCH 1:* (FLAGS)
        answers from, without a record read or a FlagState a message."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            return self._listings.get(txn, shard, account, mailbox_id, state.modseq, state.exists)

    def sizes(self, account: str, mailbox: str) -> tuple[Mailbox, list[tuple[int, int]]]:
        """(mailbox state, (UID, size) of every message ascending) from one snapshot: a POP3
        maildrop listing, read from the fixed-size records without the cached envelopes."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            listing = [(uid, e.size) for uid, e in messages.entries(txn, shard, mailbox_id)]
            return mailboxes.to_mailbox(mailbox_id, state), listing

    def flags(self, account: str, mailbox: str, ranges: UidRanges = ALL) -> list[FlagState]:
        ranges = normalize_ranges(ranges)
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, _ = mailboxes.find(txn, shard, account, mailbox)
            return messages.flag_states(txn, shard, mailbox_id, ranges)

    def fetch(self, account: str, mailbox: str, ranges: UidRanges) -> list[MessageInfo]:
        ranges = normalize_ranges(ranges)
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, _ = mailboxes.find(txn, shard, account, mailbox)
            return messages.fetch(txn, shard, account, mailbox_id, ranges)

    def open_message(self, message: MessageInfo) -> BinaryIO:
        """The stored bytes of a fetched message (exactly `message.size` of them), its file
        found from the index; or, while its file is not made yet, the journal's copy in memory.
        ExpungedError once the message is expunged (the file goes with it: an open file stays
        readable, a name does not)."""
        shard = self.shard(message.account)
        for _ in range(3):  # renamed between finding and opening (flags, settling): again
            with shard.read() as txn:
                expected = messages.expected_file(txn, shard, message.account, message.mailbox_id, message.uid)
                if expected is None:
                    raise ExpungedError(f"message UID {message.uid} has been expunged")
                path, base = expected
                try:
                    return open_pinned(path, shard.pin)  # kept attached while it is read
                except FileNotFoundError:  # not made yet, or renamed meanwhile
                    pass
                # An expunged message's entry stays until a checkpoint: asked in the read
                # that still indexes it, the journal's bytes are this message's.
                data = journal.held(txn, shard, base)
            if data is not None:
                # Told (250) and its file not made yet: its committer makes it once LMDB has
                # the commit (storage/shard.py _place_committed), or could not (a full disk,
                # no descriptors) and each checkpoint tries again. Meanwhile FETCH and RETR
                # read the journal's copy; a message renamed since has the same bytes.
                return memory_file(data, base)
            found = messages.find_file(shard, Path(path), base)
            if found is None:
                # Expunged since the index was read (its file unlinked once the expunge
                # committed), or renamed while the directory was read: the index says which.
                # Taking it for a missing file sent sysadmins to a `store check` that found
                # nothing (issue 15, item 3).
                continue
            try:
                return open_pinned(found, shard.pin)
            except FileNotFoundError:
                continue
        raise StoreError(f"message file of UID {message.uid} is missing: run 'postroom store check'")

    def preview(self, message: MessageInfo) -> str:
        """RFC 8970 PREVIEW of a message whose record has none (written before previews were
        made at delivery): made from its file, and kept in its record for the next FETCH.
        The write is queued, not waited for: the FETCH that asked has its answer."""
        with self.open_message(message) as file:
            text = parse_message(FileView(file.fileno(), message.size)).preview
        shard = self.shard(message.account)

        def remember(txn, batch):
            record = records.get_message(txn, shard, message.mailbox_id, message.uid)
            if record is not None and record.preview is None:
                txn.put(uid_key(message.mailbox_id, message.uid),
                        records.encode(msgspec.structs.replace(record, preview=text)), db=shard.db["msgs"])

        try:
            shard.submit(remember)
        except StoreError:
            pass  # closing: made again next time
        return text

    def read_message(self, message: MessageInfo) -> bytes:
        with self.open_message(message) as f:
            return f.read()

    def store_flags(self, account: str, mailbox: str, ranges: UidRanges, mode: str, flags: Iterable[str],
                    unchanged_since: int | None = None) -> tuple[list[FlagState], list[int]]:
        ranges = normalize_ranges(ranges)
        bits, keywords = messages.parse_flags(flags)
        shard = self.shard(account)

        def change_flags(txn, batch):
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            return messages.store_flags(txn, shard, batch, account, mailbox_id, state, ranges, mode, bits,
                                        keywords, unchanged_since)

        return shard.write(change_flags)

    def expunge(self, account: str, mailbox: str, ranges: UidRanges = ALL) -> list[int]:
        ranges = normalize_ranges(ranges)
        shard = self.shard(account)

        def expunge_deleted(txn, batch):
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            return messages.expunge(txn, shard, batch, account, mailbox_id, state, ranges)

        return shard.write(expunge_deleted)

    def remove(self, account: str, mailbox: str, uids: Iterable[int]) -> list[int]:
        """Expunge exactly these UIDs whatever their flags (POP3's UPDATE state: DELE marks
        belong to the session, never to the store); the UIDs removed, ascending. UIDs that
        are already gone are skipped."""
        ranges = normalize_ranges([(uid, uid) for uid in uids])
        if not ranges:
            return []
        shard = self.shard(account)

        def expunge_these(txn, batch):
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            return messages.expunge(txn, shard, batch, account, mailbox_id, state, ranges, only_deleted=False)

        return shard.write(expunge_these)

    def copy(self, account: str, source: str, ranges: UidRanges, target: str,
             *, move: bool = False) -> tuple[int, list[tuple[int, int]]]:
        """(target UIDVALIDITY, [(source UID, target UID)]) — what COPYUID reports."""
        ranges = normalize_ranges(ranges)
        shard = self.shard(account)
        quota = NO_QUOTA if move else self.quota(account)

        def copy_messages(txn, batch):
            src = mailboxes.find(txn, shard, account, source)
            dst = mailboxes.find(txn, shard, account, target)
            if src[0] == dst[0]:
                dst = (src[0], src[1])  # one state object, or the counters would diverge
            pairs = messages.copy(txn, shard, batch, account, src, ranges, dst, move=move, quota=quota)
            return dst[0], pairs

        return shard.write(copy_messages)

    def move(self, account: str, source: str, ranges: UidRanges, target: str) -> tuple[int, list[tuple[int, int]]]:
        return self.copy(account, source, ranges, target, move=True)

    def search(self, account: str, mailbox: str, query: tuple) -> list[int]:
        """The UIDs matching a query tree (see storage/search.py), ascending."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, _ = mailboxes.find(txn, shard, account, mailbox)
            return search.search(txn, shard, mailbox_id, query)

    def build_index(self, account: str) -> None:
        """Run the full-text indexer for the account's shard until nothing is left (the
        committer otherwise does this in its idle time)."""
        shard = self.shard(account)
        while shard.write(lambda txn, batch: fts.index_pending(txn, shard, limit=1000, seconds=None)):
            pass

    def index_backlog(self, account: str, mailbox: str) -> int:
        """How many of the mailbox's newest UIDs the full-text indexer has not reached yet."""
        shard = self.shard(account)
        with shard.read() as txn:
            _, state = mailboxes.find(txn, shard, account, mailbox)
            return state.uidnext - 1 - fts.indexed_upto(state)

    def changes_since(self, account: str, mailbox: str, modseq: int
                      ) -> tuple[Mailbox, list[FlagState], list[int]]:
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            changed, expunged = messages.changes_since(txn, shard, mailbox_id, modseq)
            return mailboxes.to_mailbox(mailbox_id, state), changed, expunged

    def resync(self, account: str, mailbox: str, modseq: int
               ) -> tuple[Mailbox, list[FlagState], list[tuple[int, int]] | None]:
        """What QRESYNC reports to a client that last saw `modseq` (RFC 7162 §3.2.5): the
        mailbox, messages changed since, and (MODSEQ, UID) of those expunged since, or None
        when the bounded expunge history no longer reaches back that far (storage/vanished.py)."""
        shard = self._account_shard(account)
        with shard.read() as txn:
            mailbox_id, state = mailboxes.find(txn, shard, account, mailbox)
            changed, _ = messages.changes_since(txn, shard, mailbox_id, modseq)
            return mailboxes.to_mailbox(mailbox_id, state), changed, vanished.since(txn, shard, mailbox_id, state,
                                                                                    modseq)


def _all_failed(targets: list, error: BaseException) -> DeliveryError:
    wanted = [(t, INBOX) if isinstance(t, str) else t for t in targets] or [("", INBOX)]
    return DeliveryError([], [(target, error) for target in wanted])
