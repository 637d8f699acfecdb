"""Consistent copies of a live store, for `postroom backup` (postroom/backup.py).

The index is the truth and the files follow it (storage/shard.py), so a copy is made from
the index: each shard's index is copied with LMDB's own copy under ONE read transaction (a
snapshot no commit of a live process changes), and the files that snapshot names are then
given a second name in the copy (a hard link: message files are immutable, only renamed;
a copy with its mtime, the internal date, where a link cannot reach), each under the name
the snapshot gives it (UID, size, flags). A file is looked for where storage/settle.py would
look: in cur/ or new/ under any flags suffix, or in a writer's directory (committed, not yet
renamed). So the copy's cur/ holds exactly what its index knows, whatever the daemons do
meanwhile:
- a message delivered after the snapshot is in neither the copy's index nor its files;
- a message whose flags changed after the snapshot is found under its new name and linked
  under the snapshot's;
- a message moved to another mailbox after the snapshot (a new file name, the same file,
  the same EMAILID: storage/messages.py) is found by its EMAILID and linked under the
  snapshot's name, as are messages expunged whose copy lives on in another mailbox;
- a message expunged after the snapshot may have lost its file before it was linked, with
  no other copy left: it is then expunged in the copy too (`finish`), through the store's
  own expunge, once the live index confirms it is gone. One the live index still has
  without its file is a fault of the live store: it is left for `store check` to report, in
  the copy as in the original.

The queue is copied the same way (`Queue.snapshot` of storage/queue.py has the index's
shape: records, one spool file each). Other LMDB environments (rates, logins, greylist)
are copied under a read transaction of their own (`copy_environment`).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from storage import mailboxes, maildir, messages, objectid, records
from storage.datadir import DataDir
from storage.errors import StoreError
from storage.maildir import make_private_dirs
from storage.records import MailboxRecord, ObjectIds
from storage.settle import locate
from storage.shard import Shard, uid_key, unpack_u32
from storage.store import Store

MOVES = 5  # a file renamed (new flags) this many times while we link it: give up on it


@dataclass(frozen=True)
class Gone:
    """A message of the snapshot whose file was gone before it could be copied."""

    account: str
    mailbox_id: int
    mailbox: str
    uid: int
    base: str
    email_id: str = ""
    target: Path | None = None  # where the copy wants its file


@dataclass
class CopyStats:
    mailboxes: int = 0
    messages: int = 0
    bytes: int = 0
    linked: int = 0  # files given a second name (same file system)
    copied: int = 0  # files copied (another file system)
    found_elsewhere: int = 0  # moved (or expunged but copied) since the snapshot: found by EMAILID
    gone: list[Gone] = field(default_factory=list)

    def add(self, other: CopyStats) -> None:
        self.mailboxes += other.mailboxes
        self.messages += other.messages
        self.bytes += other.bytes
        self.linked += other.linked
        self.copied += other.copied
        self.found_elsewhere += other.found_elsewhere
        self.gone.extend(other.gone)


class FileCopier:
    """Links where it can, copies where it cannot (and stops trying links once a link
    has crossed file systems)."""

    def __init__(self) -> None:
        self.can_link = True

    def place(self, source: Path, target: Path, stats: CopyStats) -> None:
        """`target` becomes `source`'s content; FileNotFoundError if `source` is gone."""
        if self.can_link:
            try:
                os.link(source, target)
                stats.linked += 1
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                if e.errno == errno.EXDEV:
                    self.can_link = False
        shutil.copyfile(source, target)
        shutil.copystat(source, target)  # the mtime is the message's internal date
        stats.copied += 1


def copy_environment(env: lmdb.Environment, target: Path) -> None:
    """A compact copy of an open LMDB environment at `target` (a new directory), from
    one read transaction: what the copy holds was all true at one moment."""
    make_private_dirs(target)
    with env.begin() as txn:
        env.copy(str(target), compact=True, txn=txn)


def copy_environment_at(path: Path, target: Path) -> None:
    """copy_environment for one that this process has not opened (rates, logins, greylist:
    only the daemons open them)."""
    env = lmdb.open(str(path), create=False, max_dbs=64, readahead=False, lock=True)
    try:
        copy_environment(env, target)
    finally:
        env.close()


def snapshot_shard(shard: Shard, target: Path, copier: FileCopier) -> CopyStats:
    """The shard's index and message files, as one read transaction sees them, at `target`
    (the copy's directory for this shard: it gets index.lmdb/ and the account trees)."""
    stats = CopyStats()
    index = target / "index.lmdb"
    make_private_dirs(index)
    with shard.read() as txn:
        shard.env.copy(str(index), compact=True, txn=txn)
        for key, raw in txn.cursor(db=shard.db["mailboxes"]):
            mailbox_id = unpack_u32(key)
            state = records.decode(raw, MailboxRecord)
            stats.mailboxes += 1
            _snapshot_mailbox(txn, shard, mailbox_id, state, target, copier, stats)
    if stats.gone:
        _find_elsewhere(shard, copier, stats)
    return stats


def _snapshot_mailbox(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, state: MailboxRecord, target: Path,
                      copier: FileCopier, stats: CopyStats) -> None:
    source_dir = shard.mailbox_dir(state.account, mailbox_id)
    target_dir = target / state.account / str(mailbox_id)
    maildir.make_dirs(target_dir)
    maildir.write_meta(target_dir, {"name": state.name, "special_use": state.special_use, "uidnext": state.uidnext})
    names: dict[str, Path] | None = None  # listed when a file is not under the snapshot's name
    for uid, entry in messages.entries(txn, shard, mailbox_id):
        file = records.get_message_file(txn, shard, mailbox_id, uid)
        if file is None:
            continue  # an index at odds with itself: `store check` reports it in the copy too
        stats.messages += 1
        stats.bytes += entry.size
        name = maildir.file_name(file.base, uid, entry.size, entry.bits)
        wanted = target_dir / "cur" / name
        likely = source_dir / "cur" / name  # where it is unless its flags changed since
        if not os.path.exists(likely):
            # One listing of the mailbox for all its renamed files, not a scan for each.
            names = _by_base(source_dir) if names is None else names
            likely = names.get(file.base)
        for _ in range(MOVES):
            source = locate(shard.tmp_root, source_dir, file.base, likely)
            if source is None:
                raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["msgs"])
                ids = records.decode(raw, ObjectIds)
                stats.gone.append(Gone(state.account, mailbox_id, state.name, uid, file.base,
                                       objectid.email_id(ids.email_id, ids.base), wanted))
                break
            try:
                copier.place(source, wanted, stats)
                break
            except FileNotFoundError:
                likely = None  # renamed under us (a flag change, a settle): look again
        else:
            raise StoreError(f"message file {file.base} kept moving while it was copied")


def _find_elsewhere(shard: Shard, copier: FileCopier, stats: CopyStats) -> None:
    """The files of gone messages, looked for by EMAILID in the live index as it is now: a
    message moved since the snapshot, or one expunged of which a copy is left, is the same
    file under another name. What is found is linked where the snapshot wants it."""
    wanted: dict[tuple[str, str], list[Gone]] = {}
    for message in stats.gone:
        wanted.setdefault((message.account, message.email_id), []).append(message)
    with shard.read() as txn:
        for account in sorted({account for account, _ in wanted}):
            for mailbox in mailboxes.listing(txn, shard, account):
                for uid, _ in messages.entries(txn, shard, mailbox.id):
                    ids = records.decode(txn.get(uid_key(mailbox.id, uid), db=shard.db["msgs"]), ObjectIds)
                    found = wanted.pop((account, objectid.email_id(ids.email_id, ids.base)), None)
                    if found is None:
                        continue
                    source = locate(shard.tmp_root, shard.mailbox_dir(account, mailbox.id), ids.base)
                    for message in found:
                        try:
                            if source is None:
                                raise FileNotFoundError(ids.base)
                            copier.place(source, message.target, stats)
                            stats.gone.remove(message)
                            stats.found_elsewhere += 1
                        except FileNotFoundError:
                            pass  # moving again: it stays gone
                if not wanted:
                    return


def _by_base(directory: Path) -> dict[str, Path]:
    found = {}
    for sub in ("cur", "new"):
        try:
            with os.scandir(directory / sub) as entries:
                for entry in entries:
                    parsed = maildir.parse_file_name(entry.name)
                    found[parsed[0] if parsed else entry.name] = Path(entry.path)
        except FileNotFoundError:
            continue
    return found


def still_indexed(shard: Shard, base: str) -> bool:
    """Whether the live index still has the message whose file is `base`."""
    with shard.read() as txn:
        return txn.get(base.encode("utf-8", "surrogateescape"), db=shard.db["bases"]) is not None


def finish(copy: DataDir, gone: list[Gone]) -> int:
    """Expunge, in the copy, the messages expunged live while their files were being
    copied (the caller has checked that the live index no longer has them): the copy then
    reads as if those expunges had come before its snapshot. Opening the copy's store also
    settles what its snapshot had committed and not yet settled (storage/settle.py).
    Returns how many were expunged."""
    removed = 0
    with Store(copy) as store:
        store.recover()
        by_mailbox: dict[tuple[str, str], list[int]] = {}
        for message in gone:
            by_mailbox.setdefault((message.account, message.mailbox), []).append(message.uid)
        for (account, mailbox), uids in sorted(by_mailbox.items()):
            removed += len(store.remove(account, mailbox, uids))
    return removed
