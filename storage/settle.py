"""Making the files match the index: right after each commit, and at start after a crash.

The index is the truth and commits first; the files follow (storage/shard.py). Each commit
records what its files must still be made to match (storage/unsettled.py), and `settle`
carries that out once it is committed: a new message renamed from its writer's directory
into cur/, an expunged one unlinked, a name changed to mirror new flags, a mailbox directory
made or removed. Every step reads the index to decide, so it can be done again at any time,
by any process, with the same result.

`recover` runs when a process first opens a shard: it settles every record left unsettled
(a process died between a commit and its file work) and empties the directories of dead
writers (storage/writers.py): a file the index knows is moved into place, any other was never
acknowledged and is deleted. Afterwards cur/ holds exactly the messages the index knows, so
`store check` finds nothing, and no UID in a file name was ever handed out twice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lmdb

from conf.logfmt import EventLogger
from storage import maildir
from storage.records import get_mailbox, unpack_entry
from storage.shard import Batch, Shard, unpack_uid_key
from storage.unsettled import DirWork, FileWork, parse
from storage.writers import LOCK_SUFFIX, dead_writers

_log = EventLogger("storage.settle")


def settle(shard: Shard, keys: list[bytes]) -> tuple[list[tuple[bytes, bytes]], set[Path]]:
    """Carry out the committed records `keys`: ((key, value) of each one done, the
    directories changed, which must be fsynced before the records are deleted)."""
    done: list[tuple[bytes, bytes]] = []
    changed: set[Path] = set()
    db = shard.db["unsettled"]
    with shard.read() as txn:
        for key in dict.fromkeys(keys):
            value = txn.get(key, db=db)
            if value is None:
                continue  # settled and deleted already, by this process or another
            try:
                changed |= _settle(txn, shard, parse(key, value))
            except OSError as e:  # left for the next start; readers find the file meanwhile
                _log.error("settle_failed", shard=shard.number, key=bytes(key[:80]), error=str(e))
                continue
            done.append((bytes(key), bytes(value)))
    return done, changed


def match(shard: Shard, made: list[tuple[Path, bytes]]) -> None:
    """Files of journaled messages made once their commit was in LMDB (Shard._place_committed),
    each under the name that commit gave it: renamed to the name the index gives it now, or
    removed if it is expunged. A flag change or an expunge that committed between LMDB's
    commit and the file found no file to rename or remove; one that commits after this look
    finds the file and settles it. A file no longer under its first name was settled by
    another process that saw it: it is left as that one put it."""
    with shard.read() as txn:
        for path, key in made:
            location = txn.get(key, db=shard.db["bases"])
            desired = None  # expunged: the file goes
            if location is not None:
                mailbox_id, uid = unpack_uid_key(location)
                raw = txn.get(location, db=shard.db["flags"])
                if raw is None:
                    continue  # an index at odds with itself: `store check` reports it
                entry = unpack_entry(raw)
                desired = path.with_name(maildir.file_name(key.decode("utf-8", "surrogateescape"), uid,
                                                           entry.size, entry.bits))
            if desired == path:
                continue
            try:
                if desired is None:
                    os.unlink(path)
                else:
                    os.rename(path, desired)
            except FileNotFoundError:
                pass
            except OSError as e:  # the file stays under its first name: `store check` reports it
                _log.error("settle_failed", shard=shard.number, key=key[:80], error=str(e))


def recover(shard: Shard) -> None:
    """Finish what dead processes left: the records they did not settle, and their files.
    What live processes committed they settle themselves."""
    with dead_writers(shard.tmp_root, skip=shard.writer) as (dead, alive):
        with shard.read() as txn:
            orphaned = any(_orphaned(parse(key, value), alive) for key, value in txn.cursor(db=shard.db["unsettled"]))
        if not dead and not orphaned:
            return
        counts = shard.write(lambda txn, batch: _recover(txn, shard, batch, dead, alive))
    if any(counts.values()):
        _log.warning("recovered", shard=shard.number, **counts)


def _orphaned(work: FileWork | DirWork | None, alive: set[str]) -> bool:
    return work is not None and work.writer not in alive


def _recover(txn: lmdb.Transaction, shard: Shard, batch: Batch, dead: list[Path], alive: set[str]) -> dict:
    counts = {"finished": 0, "discarded": 0, "settled": 0}
    changed: set[Path] = set()
    bases = shard.db["bases"]
    for writer in dead:
        try:
            names = os.listdir(writer)
        except FileNotFoundError:
            continue
        for name in names:
            path = writer / name
            location = txn.get(name.encode("utf-8", "surrogateescape"), db=bases)
            if location is None:
                _unlink(path)  # never committed: its sender heard no 250 and sends it again
                changed.add(writer)
                counts["discarded"] += 1
                continue
            mailbox_id, _ = unpack_uid_key(location)
            state = get_mailbox(txn, shard, mailbox_id)
            if state is None:
                _unlink(path)
                counts["discarded"] += 1
                continue
            changed |= _settle(txn, shard, FileWork(name, state.account, mailbox_id,
                                                    path.relative_to(shard.path)))
            counts["finished"] += 1
    cursor = txn.cursor(db=shard.db["unsettled"])
    for key, value in list(cursor.iternext()):
        work = parse(key, value)
        if not _orphaned(work, alive):
            continue  # a live process's, or one this version does not know
        changed |= _settle(txn, shard, work)
        txn.delete(key, db=shard.db["unsettled"])
        counts["settled"] += 1
    batch.sync_dirs |= {d for d in changed if d.is_dir()}
    return counts


def _settle(txn: lmdb.Transaction, shard: Shard, work: FileWork | DirWork | None) -> set[Path]:
    if isinstance(work, FileWork):
        return _settle_file(txn, shard, work)
    if isinstance(work, DirWork):
        return _settle_dir(txn, shard, work)
    return set()


def _settle_file(txn: lmdb.Transaction, shard: Shard, work: FileWork) -> set[Path]:
    directory = shard.mailbox_dir(work.account, work.mailbox_id)
    location = txn.get(work.base.encode("utf-8", "surrogateescape"), db=shard.db["bases"])
    desired = None  # the index no longer has it: the file goes
    if location is not None:
        mailbox_id, uid = unpack_uid_key(location)
        raw = txn.get(location, db=shard.db["flags"])
        if raw is None:
            return set()  # an index at odds with itself: leave the file for `store check`
        entry = unpack_entry(raw)
        directory = shard.mailbox_dir(work.account, mailbox_id)
        desired = directory / "cur" / maildir.file_name(work.base, uid, entry.size, entry.bits)
    hint = shard.path / work.hint if work.hint is not None else None
    for _ in range(5):  # another process may be settling the same file: look again
        current = locate(shard.tmp_root, directory, work.base, desired, hint)
        if current is None:
            return set()  # an expunged file already gone; or a deleted mailbox's
        if desired is None:
            _unlink(current)
            return {current.parent}
        if current == desired:
            return set()
        made = set()
        if not desired.parent.is_dir():
            # The mailbox's directory is made after its own commit: a delivery by another
            # process can get here first.
            maildir.make_dirs(directory)
            made = {directory, directory.parent, directory.parent.parent}
        try:
            os.rename(current, desired)
        except FileNotFoundError:
            continue
        return {desired.parent} | made
    raise OSError(f"message file {work.base} kept moving while it was settled")


def _settle_dir(txn: lmdb.Transaction, shard: Shard, work: DirWork) -> set[Path]:
    directory = shard.mailbox_dir(work.account, work.mailbox_id)
    state = get_mailbox(txn, shard, work.mailbox_id)
    if state is None or state.account != work.account:
        if not directory.exists():
            return set()
        shutil.rmtree(directory)
        return {directory.parent}
    changed = {directory}
    if not (directory / "cur").is_dir():
        maildir.make_dirs(directory)
        changed |= {directory / "cur", directory.parent, directory.parent.parent}
    # The mailbox's name and UID high-water mark, for a rebuild from the files alone.
    maildir.write_meta(directory, {"name": state.name, "special_use": state.special_use,
                                   "uidnext": state.uidnext})
    return changed


def locate(tmp_root: Path, directory: Path, base: str, *likely: Path | None) -> Path | None:
    """Where the file of message `base` of the mailbox in `directory` is now: one of the
    `likely` paths, a writer's directory (committed and not yet renamed), or cur/ or new/
    under another flags suffix."""
    for path in likely:
        if path is not None and os.path.exists(path):
            return path
    try:
        writers = os.listdir(tmp_root)
    except FileNotFoundError:
        writers = []
    for writer in writers:
        path = tmp_root / writer / base
        if not writer.endswith(LOCK_SUFFIX) and os.path.exists(path):
            return path
    for sub in ("cur", "new"):
        try:
            with os.scandir(directory / sub) as entries:
                for entry in entries:
                    if entry.name == base or entry.name.startswith(base + ","):
                        return Path(entry.path)
        except FileNotFoundError:
            continue
    return None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
