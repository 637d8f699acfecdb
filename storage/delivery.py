"""A message on its way into the store: streamed and two-phase (begin, write, commit or abort).

    delivery = store.begin_delivery(targets, flags=..., internal_date=..., dedupe_from=...)
    delivery.write(chunk)            # as the bytes arrive, any number of times
    delivered = delivery.commit()    # durable in every target, or DeliveryError
    delivery.close()                 # always, at the end: discards what is left

A message up to IN_MEMORY bytes (most mail) stays in memory until its commit: the bytes go
into the journal with its index record (storage/journal.py), and each target's committer
makes its file in the mailbox's cur/, under its final name, once LMDB has committed the
transaction, outside the writer lock (Shard._place_committed): no file work before the
250, no rename after it, and an event loop never waits for the file system. A bigger message goes
to one file, the delivery's source, as it arrives, in this process's writer directory of
the first target's shard (storage/writers.py), under the name the first target's copy will
have. Nothing holds the whole message in memory: the deduplication key (storage/dedupe.py)
is computed as the bytes go by, and at commit the index's view of the message (envelope,
MIME structure, the text for full-text search) is parsed from memory or from the file (read
back whole when it is up to WRITE_IN_COMMITTER, a window at a time beyond). For a big
message each target then gets its own name for the file in its shard's writer directory (a
hard link; a copy only where a link cannot reach, a shard on another file system) and a
request to its shard's committer, which indexes it; after the commit the name is renamed
into the mailbox's cur/ (storage/settle.py). The first target takes the source itself, and
no link. Its file is fsynced once, whatever the number of targets: by the first committer
that needs it, beside the other files of its batch, or, over WRITE_IN_COMMITTER, by the
caller of commit() before it joins a batch, so that a big file holds up nobody's commit.

What a crash leaves: a big message's source, and any target's name not yet committed, are
in a writer directory under names the index does not know, so the next process to open the
shard discards them (storage/settle.py, recover); committed names are finished there. A
journaled message whose file the crash kept from being made is made by the replay of the
log, or put back from the journal when the shard is next opened. abort(), or close() after
a commit the first target did not take, unlinks the source: nothing stays.

A failure while writing (a full disk: DiskFullError, SMTP 452 4.3.1) aborts the delivery and
is raised by write(); the caller reads the rest of the message and drops it.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage import dedupe as duplicates
from storage import fts, journal, maildir, messages, records
from storage.errors import DeliveryError, MailboxNotFoundError, NotOwnerError, StoreError, store_error
from storage.fileview import FileView
from storage.messages import Quota
from storage.mime import ParsedMessage, parse_message
from storage.pinning import not_pinned, take
from storage.records import MessageRecord
from storage.shard import Shard
from wire import metrics

# A message up to this size is kept in memory until its commit, its bytes journaled and its
# file made by its committer once the log has the commit: an event loop never waits for the
# file system (making a file can wait for the journal), and a session holds no more than
# this. A bigger one goes to its file as it arrives.
IN_MEMORY = 64 << 10
# A message up to this size is fsynced by the shard's committer, beside the other files of
# its batch, and parsed from a copy read back from its file; a bigger one is fsynced by the
# caller of commit(), before it joins a batch, and parsed from its file a window at a time.
WRITE_IN_COMMITTER = 256 << 10

_NO_LINK = (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP)  # then a copy

Target = tuple[str, str]  # (account, mailbox name)
OnDone = Callable[[list["Delivered"], list[tuple[Target, BaseException]]], None]


@dataclass(frozen=True)
class Delivered:
    account: str
    mailbox: str
    uidvalidity: int
    uid: int
    # The mailbox already had this message (storage/dedupe.py): `uid` is that copy's, and
    # nothing was stored. Never withdraw it: it belongs to an earlier delivery.
    duplicate: bool = False


@dataclass(frozen=True)
class _Parsed:
    """What every target's commit needs, made once per message outside the committers."""

    message: ParsedMessage
    date: float  # the internal date
    texts: bytes
    key: bytes | None


_OPEN, _COMMITTING, _CLOSED = "open", "committing", "closed"


class Delivery:
    """One message for one or more (account, mailbox) targets. Not thread-safe: one caller
    writes, then commits (in any one thread), then closes."""

    def __init__(self, targets: list[Target], *, shard_of: Callable[[str], Shard],
                 mailbox_of: Callable[[Shard, str, str], int], quota_of: Callable[[str], Quota],
                 bits: int, keywords: tuple[str, ...], internal_date: float | None,
                 key_from: int | None, window: float):
        self.targets = targets
        self.size = 0
        self.message_id: str | None = None  # from the parsed header, once committed
        self._mailbox_of, self._quota_of = mailbox_of, quota_of
        self._bits, self._keywords = bits, keywords
        self._internal_date = internal_date
        self._window = window
        self._key_from = key_from
        self._prepended = 0  # bytes put in front (prepend): before the sender's, as the trace headers
        self._digest = duplicates.SentDigest(key_from) if key_from is not None else None
        self._state = _OPEN
        self._parsed: _Parsed | None = None
        self._sync_lock = threading.Lock()
        self._synced = False
        self._sync_error: BaseException | None = None
        self._shard_of = shard_of
        self._source: Path | None = None
        self._source_shard: Shard | None = None
        self._source_committed = False  # the first target's copy is the source itself
        self._fd: int | None = None  # the source, once it is made
        self._release_pin = not_pinned  # the source's shard pinned while the source is open (storage/pinning.py)
        self._pending = bytearray()  # the first IN_MEMORY bytes, until the source is made
        self._small: bytes | None = None  # a whole message that fit in memory, from commit on
        self._early = False  # start_commit's caller hears of the commit before the files settle
        shard, self._first = _first_shard(targets, shard_of)
        if shard is not None:  # else no target can take it: the bytes are only counted
            self._source, self._source_shard = shard.writer.path / maildir.new_base(), shard

    def __enter__(self) -> Delivery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- phase one: the bytes ------------------------------------------------------------

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append `chunk` to the message. On failure the delivery is aborted and the store's
        error raised (DiskFullError for a full disk)."""
        if self._state != _OPEN:
            raise StoreError("the delivery is no longer open for data")
        if self._source is not None:
            if self._fd is None and len(self._pending) + len(chunk) <= IN_MEMORY:
                self._pending += chunk
            else:
                try:
                    if self._fd is None:
                        self._make_source()
                    _write_all(self._fd, chunk)
                except OSError as e:
                    self.close()
                    raise store_error(e, self._source.parent) from e
                except NotOwnerError:
                    # Its shard is being let go (a cluster's drain): the file was not made,
                    # and the bytes so far are still here to read (read()), for the caller
                    # to take the message elsewhere (mtad/routing.py, Route.let_go).
                    raise
                except StoreError:
                    self.close()
                    raise
        self.size += len(chunk)
        if self._digest is not None:
            self._digest.update(chunk)

    def prepend(self, data: bytes) -> None:
        """Put `data` before everything written so far: header fields decided only at the
        message's end (the policy checks' verdict, policy/decide.py). Once, before the
        commit. A message still in memory costs nothing; one already in its file is written
        again behind `data` (copy_file_range: within the kernel) under a new name that then
        replaces the source. What the sender sent, and so the deduplication key, is unchanged."""
        if self._state != _OPEN:
            raise StoreError("the delivery is no longer open for data")
        if not data:
            return
        if self._source is not None:
            try:
                if self._fd is None:
                    self._pending[:0] = data
                    if len(self._pending) > IN_MEMORY:
                        self._make_source()
                else:
                    self._rewrite_source(data)
            except OSError as e:
                self.close()
                raise store_error(e, self._source.parent) from e
        self.size += len(data)
        self._prepended += len(data)

    def _rewrite_source(self, head: bytes) -> None:
        staged = self._source.with_name(self._source.name + ".prepend")
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, head)
            _copy_range(self._fd, fd, self.size)
            os.replace(staged, self._source)  # the writer directory drops ".prepend" leftovers too
        except BaseException:
            os.close(fd)
            _unlink_quietly(staged)
            raise
        os.close(self._fd)
        self._fd = fd

    def send_to_each(self, mailboxes: dict[str, str]) -> None:
        """Each account's copy goes to its mailbox in `mailboxes` instead of the ones it was
        begun for (the policy's Junk verdict): one copy per account. Before the commit."""
        if self._state != _OPEN:
            raise StoreError("the delivery is no longer open")
        self.targets = list(dict.fromkeys((account, mailboxes.get(account, name)) for account, name in self.targets))
        shard, self._first = _first_shard(self.targets, self._shard_of)
        if shard is not self._source_shard:  # the same accounts: the same first shard
            raise StoreError("send_to_each() changed the delivery's accounts")

    @property
    def keeps_bytes(self) -> bool:
        """Whether the bytes written are kept: false when no target's shard could be opened
        (they are only counted, and the commit raises the first target's error)."""
        return self._source is not None

    def in_memory(self) -> bytes | None:
        """The whole message, while it is still open and held in memory (up to IN_MEMORY
        bytes): what a hand-off to another process's store sends (mtad/writer.py). None once
        it went to its file, or when no target could take it."""
        if self._state != _OPEN or self._source is None or self._fd is not None:
            return None
        return bytes(self._pending)

    def terms(self) -> dict:
        """What Store.begin_delivery was given (its flags, dedupe_from), for the same
        delivery begun elsewhere with in_memory()'s bytes: mtad/writer.py. Where the sender's
        bytes begin counts what prepend() put in front, which this digest never saw: else the
        verdict's header fields (different at each try: a DNS answer, a time) would go into
        the other's key, and a message sent again after a lost 250 be stored twice."""
        key_from = self._key_from + self._prepended if self._key_from is not None else None
        return {"flags": list(messages.flag_names(self._bits, self._keywords)), "internal_date": self._internal_date,
                "dedupe_from": key_from}

    def read(self, size: int = 1 << 16) -> Iterator[bytes]:
        """The message's bytes written so far, in pieces of at most `size` (an anti-virus
        scan before the commit): from memory, or read back from the file."""
        if self._state != _OPEN:
            raise StoreError("the delivery is no longer open")
        if self._source is None:
            raise self._why_no_target()
        if self._fd is None:
            view = memoryview(bytes(self._pending))
            for start in range(0, len(view), size):
                yield view[start:start + size].tobytes()
            return
        offset = 0
        while offset < self.size:
            piece = os.pread(self._fd, min(size, self.size - offset), offset)
            if not piece:
                raise StoreError("the message's file is shorter than what was written")
            offset += len(piece)
            yield piece

    def _make_source(self) -> None:
        """The source file, with what was kept in memory so far; its shard pinned until it
        is closed, however long the message takes to come (NotOwnerError: not made)."""
        self._release_pin = take(self._source_shard.pin)
        self._fd = os.open(self._source, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        _write_all(self._fd, self._pending)
        self._pending = bytearray()

    def abort(self) -> None:
        """Nothing of this message stays anywhere. Only before commit."""
        if self._state == _COMMITTING:
            raise StoreError("the delivery is being committed")
        self.close()

    def close(self) -> None:
        """The end of the delivery: an uncommitted one is aborted; a committed one keeps its
        copies and lets go of its source. Call it once commit() returned (or start_commit's
        on_done ran): the committers link the targets' names from the source."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._pending = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if not self._source_committed:
                _unlink_quietly(self._source)
        self._release_pin()

    # -- phase two: the commit -------------------------------------------------------------

    def commit(self) -> list[Delivered]:
        """Index the message in every target; return once every copy is durable, or raise
        DeliveryError (the `delivered` ones are durable all the same). Blocks: a thread's."""
        self._start()
        if self.size > WRITE_IN_COMMITTER:
            try:
                self._sync()  # here: a big file would hold up every request of its batch
            except BaseException as e:  # noqa: BLE001 - every target fails with it
                error = store_error(e, self._source.parent if self._source else None)
                raise DeliveryError([], [(target, error) for target in self.targets]) from None
        return _wait(functools.partial(self._submit, list(enumerate(self.targets)), first=True))

    def start_commit(self, on_done: OnDone) -> None:
        """commit() without waiting: the shards' committers fsync and index the message, and
        `on_done(delivered, errors)` is called once every target is settled, in a committer's
        thread (or in this one, when no target got that far). It parses the message here, and
        an account's first delivery waits for its default mailboxes: an event loop may call it
        only for a message up to WRITE_IN_COMMITTER to accounts that exist (see
        Store.accounts_ready)."""
        self._start()
        # Told once the commit is durable, not once the files are renamed into place: the
        # loop's 250 does not wait for the settler (storage/shard.py, `early`).
        self._early = True
        self._submit(list(enumerate(self.targets)), on_done, first=True)

    def retry(self, targets: list[Target]) -> list[Delivered]:
        """After a commit some of whose targets failed: the same message, again, to these."""
        if self._state != _COMMITTING:
            raise StoreError("retry() follows a commit")
        return _wait(functools.partial(self._submit, [(i, t) for i, t in enumerate(targets)]))

    def _why_no_target(self) -> BaseException:
        """Why no target could take the bytes: the first target's shard's own error (a
        cluster's NotOwnerError says "temporary", where a bare StoreError would not)."""
        for account, _ in self.targets:
            try:
                self._shard_of(account)
            except StoreError as e:
                return e
            except Exception:  # noqa: BLE001 - an invalid name: the next target says more
                continue
        return StoreError("no target can take this message: its bytes were not kept")

    def _start(self) -> None:
        if self._state != _OPEN:
            raise StoreError("the delivery is no longer open")
        self._state = _COMMITTING
        if self._fd is None and self._source is not None:
            self._small = bytes(self._pending)

    def _submit(self, targets: list[tuple[int, Target]], on_done: OnDone, first: bool = False) -> None:
        outcome = _Outcome(len(targets), on_done)
        if not targets:
            return
        try:
            parsed = self._parse()
        except Exception as e:  # noqa: BLE001 - the file could not be read back: nobody gets it
            error = store_error(e, self._source.parent if self._source else None)
            for index, target in targets:
                outcome.settle(index, target, error=error)
            return
        for index, (account, name) in targets:
            target, path = (account, name), None
            try:
                # The first commit's first valid target takes the source itself: no link.
                takes_source = first and index == self._first
                shard = self._source_shard if takes_source else self._shard_of(account)
                mailbox_id = self._mailbox_of(shard, account, name)
                path = self._source if takes_source else shard.writer.path / maildir.new_base()
                insert = _insert_fn(shard, account, mailbox_id, path, path.name, self.size, parsed, self._bits,
                                    self._keywords, self._quota_of(account), self._window, self._small)
                # A small message's file is made by the committer after the log has it.
                shard.submit(insert, before=None if self._small is not None else functools.partial(self._place, path),
                             on_done=functools.partial(self._settled, outcome, index, target, path),
                             early=self._early)
            except Exception as e:  # noqa: BLE001 - this target failed; the others go on
                if path is not None and path is not self._source:
                    _unlink_quietly(path)
                # The error outlives this loop in the outcome, and its traceback would keep the
                # failed lookup's frames, and with them its read transaction's LMDB reader
                # slot, until the garbage collector came by: 600 missing mailboxes in one
                # delivery held every slot of the shard. The lines stay, the locals go.
                traceback.clear_frames(e.__traceback__)
                outcome.settle(index, target, error=store_error(e))

    def _settled(self, outcome: _Outcome, index: int, target: Target, path: Path, request) -> None:
        """A committer settled one target's request (in its thread)."""
        delivered = error = None
        if request.error is not None:
            error = request.error
        elif request.result is None:  # never ran: no commit to report
            error = StoreError("delivery was not committed")
        else:
            uidvalidity, uid, duplicate = request.result
            delivered = Delivered(target[0], target[1], uidvalidity, uid, duplicate)
        try:
            if path is self._source:
                # Committed, it is the target's copy now (settled into cur/); otherwise it
                # stays the source, for a retry, until close().
                self._source_committed = delivered is not None and not delivered.duplicate
            elif error is not None or delivered.duplicate:
                _unlink_quietly(path)  # linked, or renamed back by the failed batch; or not wanted
        finally:
            outcome.settle(index, target, delivered, error)

    def _parse(self) -> _Parsed:
        if self._parsed is not None:
            return self._parsed
        date = self._internal_date if self._internal_date is not None else time.time()
        if self._fd is None:
            raw: bytes | FileView = bytes(self._pending)
        elif self.size <= WRITE_IN_COMMITTER:
            raw = _read_back(self._fd, self.size)
        else:
            raw = FileView(self._fd, self.size)  # read a window at a time
        parsed = parse_message(raw)
        self.message_id = parsed.envelope.message_id
        texts = fts.compress_texts(fts.fields_of(parsed))  # here, not in the committer
        key = self._digest.key(self.message_id) if self._digest is not None and self._window > 0 else None
        self._parsed = _Parsed(parsed, date, texts, key)
        return self._parsed

    def _sync(self) -> None:
        """The file's bytes and internal date (its mtime, for `store rebuild`) made durable,
        once, by whichever thread comes first; the others wait for it and share its outcome."""
        with self._sync_lock:
            if self._sync_error is not None:
                raise self._sync_error
            if self._synced or self._source is None:
                return
            try:
                date = self._parse().date
                os.utime(self._fd, (date, date))
                metrics.fsync(self._fd, "message")
            except BaseException as e:
                self._sync_error = e
                raise
            self._synced = True

    def _place(self, path: Path) -> None:
        """A committer's `before` for a message too big to be journaled: the file durable,
        under the target's name (its directory is fsynced with the batch's)."""
        self._sync()
        if path is self._source:
            return
        # The source's name; once the first target's commit has taken that into cur/, the
        # open file itself (a file that has a name can be linked through /proc, unprivileged).
        for source in (self._source, Path(f"/proc/self/fd/{self._fd}")):
            try:
                _link(source, path)
                return
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                break
        _copy(self._fd, path, self._parsed.date)  # another file system, or expunged meanwhile


def _link(source: Path, target: Path) -> None:
    """link(2) with the source's symbolic link followed (os.link calls plain link(), which
    does not follow it, unless given a directory fd: then linkat with AT_SYMLINK_FOLLOW)."""
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(source, target.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _first_shard(targets: list[Target], shard_of: Callable[[str], Shard]) -> tuple[Shard | None, int]:
    """The shard of the first target whose account name is valid (the others fail at commit),
    and that target's index."""
    for index, (account, _) in enumerate(targets):
        try:
            return shard_of(account), index
        except Exception:  # noqa: BLE001 - that target's error is reported by its commit
            continue
    return None, -1


def _wait(submit: Callable[[OnDone], None]) -> list[Delivered]:
    settled = threading.Event()
    outcome: list = []

    def done(delivered: list[Delivered], errors: list) -> None:
        outcome.extend((delivered, errors))
        settled.set()

    submit(done)
    settled.wait()
    delivered, errors = outcome
    if errors:
        raise DeliveryError(delivered, errors)
    return delivered


def _copy_range(source_fd: int, target_fd: int, size: int) -> None:
    """`size` bytes of source from its start to target's current end, in the kernel."""
    offset = 0
    while offset < size:
        copied = os.copy_file_range(source_fd, target_fd, size - offset, offset)
        if copied == 0:
            raise StoreError("the message's file is shorter than what was written")
        offset += copied


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_back(fd: int, size: int) -> bytes:
    raw = os.pread(fd, size, 0)
    while len(raw) < size:  # a short read of a regular file: rare, but allowed
        more = os.pread(fd, size - len(raw), len(raw))
        if not more:
            raise StoreError("the message file is shorter than what was written")
        raw += more
    return raw


def _copy(source_fd: int, target: Path, date: float) -> None:
    """A copy of the open file, made in the kernel (no bytes through Python), and durable."""
    size = os.fstat(source_fd).st_size
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while offset < size:
            sent = os.sendfile(fd, source_fd, offset, size - offset)
            if not sent:
                raise OSError(f"message file shorter than {size} bytes")
            offset += sent
        os.utime(fd, (date, date))
        metrics.fsync(fd, "message")
    except BaseException:
        os.close(fd)
        _unlink_quietly(target)
        raise
    os.close(fd)


def _insert_fn(shard: Shard, account: str, mailbox_id: int, path: Path, base: str, size: int, parsed: _Parsed,
               bits: int, keywords: tuple[str, ...], quota: Quota, window: float, small: bytes | None):
    """The commit step of one copy: (mailbox id, UID, whether it was a duplicate). A `small`
    message's bytes go into the journal with it, its file unflushed (storage/journal.py)."""
    record = MessageRecord.of(parsed.message, base=base, size=size, internal_date=parsed.date, saved=time.time())
    encoded = records.encode(record)  # here, not in the committer

    def insert(txn, batch):
        state = records.get_mailbox(txn, shard, mailbox_id)
        if state is None:
            raise MailboxNotFoundError("the mailbox was deleted during delivery")
        now = time.time()
        if parsed.key is not None:
            # Decided inside the commit: two sendings racing each other find each other.
            uid = duplicates.find(txn, shard, mailbox_id, parsed.key, now, window)
            if uid is not None:
                return mailbox_id, uid, True
        uid = messages.insert(txn, shard, batch, account, mailbox_id, state, source=None if small is not None else path,
                              record=record, bits=bits, keywords=keywords, quota=quota, texts=parsed.texts,
                              encoded=encoded)
        if small is not None:
            # Made in cur/ once LMDB has the transaction (readers take the journal's copy until then).
            key = journal.put(txn, shard, base, small, parsed.date)
            name = maildir.file_name(base, uid, size, bits)
            batch.place(shard.mailbox_dir(account, mailbox_id) / "cur" / name, small, parsed.date, key)
        if parsed.key is not None:
            duplicates.remember(txn, shard, mailbox_id, parsed.key, uid, now)
        return mailbox_id, uid, False

    return insert


class _Outcome:
    """The targets of one commit in flight; on_done is called once all are settled."""

    def __init__(self, count: int, on_done: OnDone) -> None:
        self._lock = threading.Lock()
        self._left = count
        self._delivered: list[tuple[int, Delivered]] = []
        self._errors: list[tuple[int, Target, BaseException]] = []
        self._on_done = on_done
        if not count:
            on_done([], [])

    def settle(self, index: int, target: Target, delivered: Delivered | None = None,
               error: BaseException | None = None) -> None:
        with self._lock:
            if error is not None:
                self._errors.append((index, target, error))
            else:
                self._delivered.append((index, delivered))
            self._left -= 1
            if self._left:
                return
        self._on_done([d for _, d in sorted(self._delivered, key=lambda x: x[0])],
                      [(t, e) for _, t, e in sorted(self._errors, key=lambda x: x[0])])


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:  # never made, or its directory is gone: an orphan `store check` finds
        pass
