"""Mail moved in from another server (`postroom store import`): mailboxes that keep the
source's UIDVALIDITY, messages that keep their UIDs, and a ledger so that a rerun imports
nothing twice.

A mail client caches a mailbox by (UIDVALIDITY, UID) (RFC 3501 §2.3.1.1): when both survive
the move, it downloads nothing again. A mailbox's id here is its UIDVALIDITY
(storage/mailboxes.py), so a mailbox takes the source's as its id when no other mailbox of
the shard has it; a mailbox that already exists takes it only while it is empty (a fresh
account's INBOX). Messages are then inserted in ascending source UID, each with `uidnext`
raised to its UID, and at the end `uidnext` goes up to the source's UIDNEXT, so that no UID
the source handed out (to a message expunged since) is ever handed out again. A message
whose UID cannot be kept (new mail took it meanwhile) gets the next one: a new message to
clients, never a wrong one.

The ledger (`imported` database: mailbox id + a digest of the source's name for the message
-> UID) is written in the transaction that inserts the message and read in it, so an import
stopped at any point and run again skips exactly what is in. A mailbox that keeps the
source's UIDVALIDITY also skips every source UID below its UIDNEXT, which covers what the
user expunged since.

Messages are streamed into a file in the shard's writer directory (never whole in memory)
and committed through the shard's committer without waiting for each: up to IN_FLIGHT
messages share group commits, their files fsynced side by side before it. Quotas are not
applied: an import moves what the user has.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from storage import fts, maildir, mailboxes, messages, metadata, urlauth
from storage.errors import FlagError, MailboxExistsError, MailboxNotFoundError, store_error
from storage.fileview import FileView
from storage.mailboxes import INBOX, Mailbox
from storage.mime import parse_message
from storage.names import DEFAULT_MAILBOXES, normalize_name, parents
from storage.records import (
    MailboxRecord,
    MessageRecord,
    Usage,
    account_exists,
    encode,
    get_mailbox,
    put_mailbox,
    put_usage,
)
from storage.shard import Shard, pack_u32, unpack_u32
from storage.unsettled import note_dir

IN_FLIGHT = 64  # messages submitted and not yet committed, per mailbox
# A source's UIDs and UIDNEXT are kept only below this (RFC 3501 §2.3.1.1: 32-bit, but some
# clients hold UIDs in a signed int): a source that claims more (a corrupt uidlist, a hostile
# server) would leave no UID for new mail, or none that fits the store's 32-bit keys. Such a
# folder gets a UIDVALIDITY of its own, and clients fetch it again.
UID_CEILING = 2**31
PARSE_IN_MEMORY = 256 << 10  # a bigger message is parsed from its file a window at a time


def clean_flags(flags: Iterable[str]) -> tuple[list[str], list[str]]:
    """(flags the store takes, flags it refuses): \\Recent is the server's, keywords with
    characters IMAP forbids cannot be kept."""
    kept, dropped = [], []
    for flag in flags:
        if flag.lower() == "\\recent":
            continue
        try:
            messages.parse_flags([flag])
        except FlagError:
            dropped.append(flag)
            continue
        kept.append(flag)
    return kept, dropped


@dataclass
class Counts:
    imported: int = 0
    skipped: int = 0  # in already (the ledger), or expunged since an earlier import
    renumbered: int = 0  # imported under a UID other than the source's
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)


class ImportMailbox:
    """One target mailbox of an import. Not thread-safe: one caller adds, then finishes."""

    def __init__(self, store, account: str, name: str, *, uidvalidity: int | None = None,
                 uidnext: int | None = None, special_use: str | None = None,
                 plan: dict[str, int | None] | None = None):
        """`plan`: the name and UIDVALIDITY of every folder of the source, so that the
        mailboxes made before theirs (parents, INBOX) leave their ids free."""
        if uidvalidity is not None and not (uidnext is not None and 0 < uidnext <= UID_CEILING):
            # Messages keep their UIDs only above every UID the source handed out: without
            # a sane UIDNEXT they would be numbered from 1 under the source's UIDVALIDITY,
            # and a client's cache would show another message under a UID it knows.
            uidvalidity = uidnext = None
        plan = dict(plan or {})
        plan[normalize_name(name)] = uidvalidity
        begin_account(store, account, plan)
        self.account = account
        self._store = store
        self._shard: Shard = store.shard(account)
        self.counts = Counts()
        # Counts are updated by the committer's thread, which wakes whoever waits for room.
        self._settle = threading.Condition()
        self._in_flight = 0
        shard = self._shard

        def prepare(txn, batch):
            return _prepare(txn, shard, batch, account, name, plan, special_use)

        self.mailbox: Mailbox = shard.write(prepare)
        store.subscribe(account, self.mailbox.name)
        self.kept_uidvalidity = uidvalidity is not None and self.mailbox.id == uidvalidity
        # The source's UIDs are kept only under its UIDVALIDITY.
        self._uid_floor = uidnext if self.kept_uidvalidity else None

    @property
    def name(self) -> str:
        return self.mailbox.name

    def known(self, key: str, uid: int | None = None) -> bool:
        """The message is in already (or was, and was expunged): skip it without reading it."""
        with self._shard.read() as txn:
            return self._known(txn, _ledger_key(self.mailbox.id, key), _keepable(uid))

    def _known(self, txn, ledger_key: bytes, uid: int | None) -> bool:
        db = self._shard.db["imported"]
        if txn.get(ledger_key, db=db) is not None:
            return True
        # Under the source's UIDVALIDITY a source UID already taken by this source (from
        # another of its forms: its Maildir, then its IMAP server) is the same message.
        return (uid is not None and self.kept_uidvalidity
                and txn.get(_uid_index_key(self.mailbox.id, uid), db=db) is not None)

    def add(self, key: str | Callable[[], str], chunks: Iterable[bytes], *, uid: int | None = None,
            flags: Iterable[str] = (), internal_date: float | None = None) -> None:
        """Stream one message in. `key` names it in its source, for the ledger; a function
        is called once the chunks are read (a digest of what they held: an mbox's messages
        have no other name). Returns once the message is submitted; finish() waits for the
        commits. A read error of the source (OSError) is raised, the message's file removed."""
        uid = _keepable(uid)
        bits, keywords = messages.parse_flags(flags)
        shard = self._shard
        base = maildir.new_base()
        path = shard.writer.path / base
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        size = 0
        try:
            for chunk in chunks:  # reading the source: its errors are the caller's, as they are
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as e:  # ours: a full disk is DiskFullError
                    raise store_error(e, path.parent) from e
                size += len(chunk)
            date = internal_date if internal_date is not None else os.fstat(fd).st_mtime
            try:
                os.utime(fd, (date, date))  # the internal date, for `store rebuild`
            except OSError as e:
                raise store_error(e, path.parent) from e
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        os.close(fd)
        if callable(key):
            key = key()
        try:
            record, texts = _record(path, base, size, date)
        except Exception as e:  # noqa: BLE001 - a message the parser cannot read is the source's fault
            _unlink_quietly(path)
            self.fail(key, f"cannot parse: {e}")
            return
        insert = self._insert_fn(key, uid, path, record, texts, bits, keywords)
        with self._settle:
            self._settle.wait_for(lambda: self._in_flight < IN_FLIGHT)
            self._in_flight += 1
        try:
            # The committer fsyncs the files of a batch side by side before its commit: one
            # at a time here, an fsync each, the import ran at a third of the speed.
            shard.submit(insert, before=lambda: _fsync(path),
                         on_done=lambda request: self._settled(request, key, uid, path))
        except BaseException:
            with self._settle:
                self._in_flight -= 1
            _unlink_quietly(path)
            raise

    def _insert_fn(self, key: str, uid: int | None, path: Path, record: MessageRecord, texts: bytes, bits: int,
                   keywords: tuple[str, ...]):
        shard, account, mailbox_id = self._shard, self.account, self.mailbox.id
        ledger_key, floor, encoded = _ledger_key(mailbox_id, key), self._uid_floor, encode(record)

        def insert(txn, batch):
            if self._known(txn, ledger_key, uid):
                return None
            state = get_mailbox(txn, shard, mailbox_id)
            if state is None:
                raise MailboxNotFoundError("the mailbox was deleted during the import")
            if uid is not None and floor is not None and uid >= state.uidnext:
                state.uidnext = uid
            elif floor is not None:
                state.uidnext = max(state.uidnext, floor)  # after every UID the source handed out
            try:
                got = messages.insert(txn, shard, batch, account, mailbox_id, state, source=path, record=record,
                                      bits=bits, keywords=keywords, quota=messages.NO_QUOTA, texts=texts,
                                      encoded=encoded)
            except FlagError:  # the mailbox's keyword limit: the message matters more
                got = messages.insert(txn, shard, batch, account, mailbox_id, state, source=path, record=record,
                                      bits=bits, keywords=(), quota=messages.NO_QUOTA, texts=texts, encoded=encoded)
            txn.put(ledger_key, pack_u32(got), db=shard.db["imported"])
            if uid is not None and got == uid:
                txn.put(_uid_index_key(mailbox_id, uid), b"", db=shard.db["imported"])
            return got

        return insert

    def _settled(self, request, key: str, uid: int | None, path: Path) -> None:
        with self._settle:
            self._in_flight -= 1
            self._settle.notify_all()
            if request.error is not None:
                _unlink_quietly(path)
                self.counts.failed.append((key, str(request.error)))
            elif request.result is None:
                _unlink_quietly(path)  # in already: the file was not wanted
                self.counts.skipped += 1
            else:
                self.counts.imported += 1
                if uid is not None and request.result != uid:
                    self.counts.renumbered += 1

    def skip(self) -> None:
        with self._settle:
            self.counts.skipped += 1

    def fail(self, key: str, why: str) -> None:
        """A message of the source that could not be read: counted, the import goes on."""
        with self._settle:
            self.counts.failed.append((key, why))

    def finish(self) -> Counts:
        """Wait for every commit; under the source's UIDVALIDITY, UIDNEXT is then raised to
        the source's."""
        with self._settle:
            self._settle.wait_for(lambda: self._in_flight == 0)
        if self._uid_floor is not None:
            shard, mailbox_id, floor = self._shard, self.mailbox.id, self._uid_floor

            def raise_uidnext(txn, batch):
                state = get_mailbox(txn, shard, mailbox_id)
                if state is not None and state.uidnext < floor:
                    state.uidnext = floor
                    put_mailbox(txn, shard, mailbox_id, state)

            shard.write(raise_uidnext)
        return self.counts


def begin_account(store, account: str, plan: dict[str, int | None]) -> None:
    """An account new to the store gets its record and INBOX only: its other default
    mailboxes (Sent, Drafts...) are made by finish_account, after the import, so that they
    take no id a source folder's UIDVALIDITY needs. INBOX comes first, whatever happens:
    mail delivered meanwhile, or after an import that stopped, has somewhere to go.
    `plan`: every source folder's name and UIDVALIDITY (storage/imports.py's ids avoid them)."""
    shard = store.shard(account)

    def begin(txn, batch):
        if not account_exists(txn, shard, account):
            put_usage(txn, shard, account, Usage())
            _prepare(txn, shard, batch, account, INBOX, plan, subscribe=True)

    with shard.read() as txn:
        if account_exists(txn, shard, account):
            return
    shard.write(begin)


def finish_account(store, account: str) -> None:
    """The default mailboxes (storage/names.py) the import did not bring, made now."""
    shard = store.shard(account)

    def finish(txn, batch):
        for name, special_use in DEFAULT_MAILBOXES:
            try:
                mailboxes.create(txn, shard, batch, account, name, special_use, subscribe=True)
            except MailboxExistsError:
                pass

    shard.write(finish)


def _prepare(txn, shard: Shard, batch, account: str, name: str, plan: dict[str, int | None],
             special_use: str | None = None, subscribe: bool = False) -> Mailbox:
    """The target mailbox, made or found, under the source's UIDVALIDITY (plan[name]) where
    it can be. Its missing parents are made first, each under its own source UIDVALIDITY if
    it is a source folder too; a mailbox that cannot have the source's takes an id no source
    folder of `plan` needs."""
    name = normalize_name(name)
    wanted = plan.get(name)
    try:
        mailbox_id, state = mailboxes.find(txn, shard, account, name)
    except MailboxNotFoundError:
        for parent in parents(name):
            if txn.get(mailboxes.name_key(account, parent), db=shard.db["names"]) is None:
                _prepare(txn, shard, batch, account, parent, plan)
        if special_use is None:  # a source's "Sent" is the account's \Sent, as a default one would be
            special_use = dict(DEFAULT_MAILBOXES).get(name)
        made = mailboxes.create(txn, shard, batch, account, name, special_use, subscribe=subscribe)
        # A new mailbox has no history: what an earlier one with this id left in the ledger goes.
        avoid = set(plan.values())
        if made.id == wanted:
            target = None
        elif wanted is not None and _free(txn, shard, account, wanted):
            target = wanted
        elif made.id in avoid:  # another source folder's UIDVALIDITY: leave it to that one
            target = _fresh_id(txn, shard, avoid)
        else:
            target = None
        if target is None:
            _forget(txn, shard, made.id)
            return made
        return _renumber(txn, shard, batch, account, made.id, get_mailbox(txn, shard, made.id), target)
    if (wanted is not None and mailbox_id != wanted and state.exists == 0
            and _free(txn, shard, account, wanted)):
        return _renumber(txn, shard, batch, account, mailbox_id, state, wanted)
    return mailboxes.to_mailbox(mailbox_id, state)


def _fresh_id(txn, shard: Shard, avoid: set[int | None]) -> int:
    while True:
        candidate = mailboxes.new_id(txn, shard)
        if candidate not in avoid:
            return candidate


def _forget(txn, shard: Shard, mailbox_id: int) -> None:
    """The ledger's entries under this id, gone (a mailbox deleted, an id made again)."""
    cursor = txn.cursor(db=shard.db["imported"])
    prefix = pack_u32(mailbox_id)
    if not cursor.set_range(prefix):
        return
    while cursor.key()[:4] == prefix:
        if not cursor.delete():
            break


def _free(txn, shard: Shard, account: str, uidvalidity: int) -> bool:
    """No mailbox of the shard has this id now, nor left its directory behind."""
    if not 0 < uidvalidity < 2**32:
        return False
    if txn.get(pack_u32(uidvalidity), db=shard.db["mailboxes"]) is not None:
        return False
    return not shard.mailbox_dir(account, uidvalidity).exists()


def _renumber(txn, shard: Shard, batch, account: str, old_id: int, state, new_id: int) -> Mailbox:
    """An empty mailbox moved to id `new_id` (a new UIDVALIDITY: clients holding the old one
    resynchronize an empty mailbox, which costs them nothing)."""
    fresh = MailboxRecord(account=account, name=state.name, special_use=state.special_use, recent_upto=0)
    metadata.copy(txn, shard, account, old_id, new_id)
    metadata.drop(txn, shard, account, old_id)
    urlauth.drop(txn, shard, account, old_id)
    txn.delete(pack_u32(old_id), db=shard.db["mailboxes"])
    note_dir(txn, shard, batch, account, old_id)  # its directory goes after the commit
    put_mailbox(txn, shard, new_id, fresh)
    txn.put(mailboxes.name_key(account, state.name), pack_u32(new_id), db=shard.db["names"])
    note_dir(txn, shard, batch, account, new_id)
    _forget(txn, shard, new_id)
    counter = txn.get(b"uidvalidity", db=shard.db["counters"])
    if counter is None or unpack_u32(counter) < new_id:
        # The counter only grows: no mailbox made later gets this id.
        txn.put(b"uidvalidity", pack_u32(new_id), db=shard.db["counters"])
    return mailboxes.to_mailbox(new_id, fresh)


def _record(path: Path, base: str, size: int, date: float) -> tuple[MessageRecord, bytes]:
    """The index's view of the message, parsed from its file (a window at a time when big)."""
    with open(path, "rb") as file:
        raw = file.read() if size <= PARSE_IN_MEMORY else FileView(file.fileno(), size)
        parsed = parse_message(raw)
        texts = fts.compress_texts(fts.fields_of(parsed))
    return MessageRecord.of(parsed, base=base, size=size, internal_date=date), texts


def _keepable(uid: int | None) -> int | None:
    """The source's UID, or None (a new one) when it is no UID this store can keep."""
    return uid if uid is not None and 0 < uid < UID_CEILING else None


def _ledger_key(mailbox_id: int, key: str) -> bytes:
    return pack_u32(mailbox_id) + b"k" + hashlib.blake2b(key.encode("utf-8", "surrogateescape"),
                                                          digest_size=16).digest()


def _uid_index_key(mailbox_id: int, uid: int) -> bytes:
    """Set when a message kept its source UID: that UID below UIDNEXT was the source's."""
    return pack_u32(mailbox_id) + b"u" + pack_u32(uid)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

