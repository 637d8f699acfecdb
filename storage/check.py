"""`postroom store check` and `store rebuild`: files and index, compared and made to agree.

check (with repair=False, report only) trusts the index and looks for every difference a
crash can leave (see storage/shard.py): a file in tmp/ whose writer is gone, a file in
cur/ or new/ the index does not know (a delivery that never returned, or a message dropped
in by another Maildir tool: repair indexes it under a new UID, so nothing is lost), a file
of an expunged message still on disk (repair deletes it), a file whose name carries stale
flags (repair renames it), an indexed message without its file (repair expunges it), and
counters that drifted.

rebuild trusts the files: it drops the account's index and recreates it from the mailbox
directories, their `postroom.json`, and the file names (`,U=` UID, `:2,` flags, mtime as
internal date). Where the UIDs in the names are not unique, the mailbox gets a new
UIDVALIDITY and new UIDs, as RFC 3501 §2.3.1.1 requires. Keywords live only in the index
and are lost.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from storage import fts, journal, mailboxes, maildir, messages, metadata, records, unsettled
from storage.errors import MailboxNameError, StoreError
from storage.mime import parse_message
from storage.names import DEFAULT_MAILBOXES, normalize_name, parents
from storage.records import Entry, MailboxRecord, MessageRecord, Usage
from storage.shard import Batch, Shard, pack_u32, uid_key, unpack_u32
from storage.store import Store

TMP_MAX_AGE = 36 * 3600  # maildir(5): a tmp/ file this old is abandoned
# A delivery's file is made just after LMDB's commit (storage/shard.py _place_committed): a
# file-not-made that two scans in a row see is looked at again this often, this long apart,
# before it is reported (a live process that cannot make it logs file_place_failed).
NOT_MADE_LOOKS = 5
NOT_MADE_PAUSE = 0.2


@dataclass(frozen=True)
class Problem:
    account: str
    mailbox: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.account} {self.mailbox}: {self.kind}: {self.detail}"


def accounts_on_disk(store: Store) -> list[str]:
    found = []
    for shard in store.shards():
        if shard.path.is_dir():
            found.extend(p.name for p in shard.path.iterdir() if p.is_dir() and "@" in p.name)
    return sorted(found)


def check(store: Store, account: str | None = None, *, repair: bool = False) -> list[Problem]:
    """Differences between files and index. Repair runs inside the shard's write transaction,
    so no delivery or flag change of a live daemon can slip between what is read and what is
    mended. A report without repair keeps only what two scans in a row both see, so a
    delivery committing during the first is not reported (and a file not made yet, only
    what is still so a second later: see NOT_MADE_LOOKS)."""
    problems: list[Problem] = []
    for name in [account] if account else accounts_on_disk(store):
        shard = store.shard(name)
        if not shard.account_dir(name).is_dir():
            continue
        try:
            shard.checkpoint()  # this process's settled work, flushed: no longer taken for work in flight
        except (StoreError, OSError):
            pass  # a full disk, say: its keys then count as in flight, as another process's would
        if repair:
            problems.extend(shard.write(lambda txn, batch, n=name, s=shard: _check_account(txn, s, batch, n, True)))
            continue
        with shard.read() as txn:
            found = _check_account(txn, shard, None, name, False)
        if found:
            found = _seen_again(shard, name, found)
        for _ in range(NOT_MADE_LOOKS):
            if not any(p.kind == "file-not-made" for p in found):
                break
            time.sleep(NOT_MADE_PAUSE)
            found = _seen_again(shard, name, found)
        problems.extend(found)
    return problems


def _seen_again(shard: Shard, account: str, found: list[Problem]) -> list[Problem]:
    """The problems of `found` that a new scan of the account sees too."""
    with shard.read() as txn:
        again = set(_check_account(txn, shard, None, account, False))
    return [p for p in found if p in again]


@dataclass(frozen=True)
class _InFlight:
    """What live processes have committed and not yet settled (storage/settle.py): not a
    problem, and nothing a repair may touch."""

    bases: frozenset[str]
    mailboxes: frozenset[int]


def _in_flight(txn, shard: Shard, batch: Batch | None, account: str) -> _InFlight:
    # A repair shares its transaction with the deliveries of its batch: their files are made
    # once it is in the log (Batch.place), so not yet.
    bases = {key.decode("utf-8", "surrogateescape") for *_, key in batch.placed} if batch is not None else set()
    boxes = set()
    for key, value in txn.cursor(db=shard.db["unsettled"]):
        work = unsettled.parse(key, value)
        if isinstance(work, unsettled.FileWork):
            bases.add(work.base)
        elif isinstance(work, unsettled.DirWork) and work.account == account:
            boxes.add(work.mailbox_id)
    try:
        writers = [d for d in os.scandir(shard.tmp_root) if d.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        writers = []
    for writer in writers:  # the dead ones were recovered when the shard was opened
        bases.update(entry.name for entry in _files(Path(writer.path)))
    return _InFlight(frozenset(bases), frozenset(boxes))


def _check_account(txn, shard: Shard, batch: Batch | None, account: str, repair: bool) -> list[Problem]:
    problems: list[Problem] = []
    known = {m.id: m for m in mailboxes.listing(txn, shard, account)}
    in_flight = _in_flight(txn, shard, batch, account)
    scans = []
    on_disk = set()
    for directory in sorted(shard.account_dir(account).iterdir()):
        if not directory.name.isdigit():
            continue
        mailbox_id = int(directory.name)
        on_disk.add(mailbox_id)
        if mailbox_id in in_flight.mailboxes:
            continue
        if mailbox_id not in known:
            files = sum(len(_files(directory / sub)) for sub in ("cur", "new"))
            if files:
                # Mail is never deleted on the index's word: rebuild takes it back in.
                problems.append(Problem(account, directory.name, "directory-not-in-index",
                                        f"{files} message file(s) of a mailbox the index does not know: "
                                        f"run 'postroom store rebuild {account}'"))
            else:
                problems.append(Problem(account, directory.name, "directory-not-in-index",
                                        "an empty directory left by a deleted mailbox (repair removes it)"))
                if repair:
                    shutil.rmtree(directory, ignore_errors=True)
            continue
        scans.append(_scan_mailbox(txn, shard, account, known[mailbox_id], directory, problems, repair,
                                   in_flight.bases))
    for mailbox_id, mailbox in known.items():
        if mailbox_id not in on_disk and mailbox_id not in in_flight.mailboxes:
            problems.append(Problem(account, mailbox.name, "directory-missing",
                                    f"{mailbox.exists} message(s) without their directory "
                                    "(repair recreates it, makes again those whose bytes the journal holds, "
                                    "and expunges the others)"))
            if repair:
                directory = shard.mailbox_dir(account, mailbox_id)
                maildir.make_dirs(directory)
                maildir.write_meta(directory, {"name": mailbox.name, "special_use": mailbox.special_use})
                # Those whose bytes the journal still has are made again; the others go.
                gone = []
                for uid, _ in messages.entries(txn, shard, mailbox_id):
                    file = records.get_message_file(txn, shard, mailbox_id, uid)
                    if file is None or _made_from_journal(txn, shard, file.base) is not True:
                        gone.append((uid, uid))
                if gone:
                    messages.expunge(txn, shard, batch, account, mailbox_id,
                                     records.get_mailbox(txn, shard, mailbox_id), gone, only_deleted=False)
    # A file the index does not know but that shares its inode with one it does is the new
    # link of a copy or move that never committed: indexing it would duplicate the message.
    indexed_inodes = set().union(*(scan.indexed_inodes for scan in scans)) if scans else set()
    for scan in scans:
        for entry in scan.unknown:
            if entry.inode() in indexed_inodes:
                problems.append(Problem(account, scan.mailbox.name, "copy-link-left",
                                        f"{entry.name} (an uncommitted copy or move; repair removes it)"))
                if repair:
                    _unlink(entry)
            else:
                problems.append(Problem(account, scan.mailbox.name, "file-not-in-index",
                                        f"{entry.name} (repair indexes it)"))
                scan.unindexed.append(Path(entry.path))
        lost = []
        for base, uid in scan.missing:
            made = _made_from_journal(txn, shard, base, make=repair)
            if made is not None:
                # A 250'd message whose file its process could not make (a full disk): its
                # bytes are in the journal (storage/journal.py). Never expunged for it.
                outcome = "made again" if made else "repair makes the file" if not repair else "could not be made yet"
                problems.append(Problem(account, scan.mailbox.name, "file-not-made",
                                        f"UID {uid} ({base}): its bytes are in the journal ({outcome})"))
                continue
            problems.append(Problem(account, scan.mailbox.name, "file-missing",
                                    f"UID {uid} ({base}) (repair expunges it)"))
            lost.append((base, uid))
        if repair and (scan.unindexed or lost):
            _repair_messages(txn, shard, batch, account, scan.mailbox.id, scan.unindexed, lost)
    if repair:
        _fix_counters(txn, shard, account)
    return problems


@dataclass
class _Scan:
    mailbox: mailboxes.Mailbox
    indexed_inodes: set[int] = field(default_factory=set)
    unknown: list[os.DirEntry] = field(default_factory=list)
    unindexed: list[Path] = field(default_factory=list)
    missing: list[tuple[str, int]] = field(default_factory=list)


def _scan_mailbox(txn, shard: Shard, account: str, mailbox: mailboxes.Mailbox, directory: Path,
                  problems: list[Problem], repair: bool, in_flight: frozenset[str]) -> _Scan:
    scan = _Scan(mailbox)
    where = mailbox.name
    for entry in _files(directory / "tmp"):
        if _abandoned(entry):
            problems.append(Problem(account, where, "tmp-orphan", f"{entry.name} (its writer is gone)"))
            if repair:
                _unlink(entry)
    indexed = {}  # base -> (uid, bits, size)
    for uid, e in messages.entries(txn, shard, mailbox.id):
        file = records.get_message_file(txn, shard, mailbox.id, uid)
        indexed[file.base] = (uid, e.bits, file.size)
    expunged = set()
    cursor = txn.cursor(db=shard.db["expunged"])
    if cursor.set_range(uid_key(mailbox.id, 0)):
        for key, value in cursor:
            if key[:4] != pack_u32(mailbox.id):
                break
            expunged.add(bytes(value).decode())
    seen = set()
    for sub in ("cur", "new"):
        for entry in _files(directory / sub):
            parsed = maildir.parse_file_name(entry.name)
            base = parsed[0] if parsed else entry.name.split(":")[0].split(",")[0]
            if base in in_flight:
                seen.add(base)
                scan.indexed_inodes.add(entry.inode())
            elif base in indexed:
                seen.add(base)
                scan.indexed_inodes.add(entry.inode())
                uid, bits, size = indexed[base]
                expected = maildir.file_name(base, uid, size, bits)
                if sub != "cur" or entry.name != expected:
                    problems.append(Problem(account, where, "name-differs",
                                            f"{sub}/{entry.name} should be cur/{expected}"))
                    if repair:
                        os.rename(entry, directory / "cur" / expected)
            elif base in expunged:
                problems.append(Problem(account, where, "expunged-file-left", f"{sub}/{entry.name}"))
                if repair:
                    _unlink(entry)
            else:
                scan.unknown.append(entry)
    scan.missing = [(base, uid) for base, (uid, _, _) in indexed.items() if base not in seen and base not in in_flight]
    return scan


def _made_from_journal(txn, shard: Shard, base: str, *, make: bool = True) -> bool | None:
    """None when the journal does not hold message `base`'s bytes; else whether its file was
    made from them (False with make=False, or when it could not be: a full disk)."""
    key = base.encode("utf-8", "surrogateescape")
    if txn.get(key, db=shard.db["journal"]) is None:
        return None
    return make and journal.place_again(shard, txn, [key])[1] is None


def _repair_messages(txn, shard: Shard, batch: Batch, account: str, mailbox_id: int,
                     unindexed: list[Path], missing: list[tuple[str, int]]) -> None:
    state = records.get_mailbox(txn, shard, mailbox_id)
    if missing:
        messages.expunge(txn, shard, batch, account, mailbox_id, state,
                         [(uid, uid) for _, uid in missing], only_deleted=False)
    for path in unindexed:
        raw = Path(path).read_bytes()
        parsed = maildir.parse_file_name(Path(path).name)
        bits = parsed[3] if parsed else maildir.bits_from_letters(Path(path).name.partition(":2,")[2])
        record, texts = _record(raw, Path(path), maildir.new_base())
        messages.insert(txn, shard, batch, account, mailbox_id, state, source=Path(path), record=record, bits=bits,
                        keywords=(), quota=messages.NO_QUOTA, texts=texts)


def _fix_counters(txn, shard: Shard, account: str) -> None:
    used = count = 0
    for mailbox in mailboxes.listing(txn, shard, account):
        state = records.get_mailbox(txn, shard, mailbox.id)
        exists = size = unseen = 0
        for uid, e in messages.entries(txn, shard, mailbox.id):
            exists += 1
            size += e.size
            unseen += 0 if e.bits & maildir.SEEN else 1
            indexed_unseen = txn.get(uid_key(mailbox.id, uid), db=shard.db["unseen"]) is not None
            if indexed_unseen == bool(e.bits & maildir.SEEN):
                messages.put_entry(txn, shard, mailbox.id, uid, e)  # re-syncs the unseen index
        if (state.exists, state.size, state.unseen) != (exists, size, unseen):
            state.exists, state.size, state.unseen = exists, size, unseen
            records.put_mailbox(txn, shard, mailbox.id, state)
        used, count = used + size, count + exists
    records.put_usage(txn, shard, account, Usage(used, count))


def rebuild(store: Store, account: str) -> dict:
    """Recreate the account's index from its files alone; a summary of what was found."""
    shard = store.shard(account)
    return shard.write(lambda txn, batch: _rebuild(txn, shard, batch, account))


def _rebuild(txn, shard: Shard, batch: Batch, account: str) -> dict:
    # A message whose file its process could not make has its bytes in the journal alone:
    # made first, and flushed, as the rebuild reads the files and may rename them.
    keys = [bytes(key) for key, _ in txn.cursor(db=shard.db["journal"])]
    if keys:
        _, error = journal.place_again(shard, txn, keys)
        if error is not None:
            raise StoreError(f"a journaled message's file could not be made: {error}")
        shard.flush()
    # What the old index knew, so that no UID is handed out again and MODSEQ never goes back.
    prior = {m.id: (m.uidnext, m.highestmodseq) for m in mailboxes.listing(txn, shard, account)}
    for mailbox in mailboxes.listing(txn, shard, account):
        mailboxes.drop_messages(txn, shard, mailbox.id)
        txn.delete(pack_u32(mailbox.id), db=shard.db["mailboxes"])
        txn.delete(mailboxes.name_key(account, mailbox.name), db=shard.db["names"])
    for name in mailboxes.subscriptions(txn, shard, account):
        txn.delete(mailboxes.name_key(account, name), db=shard.db["subs"])
    records.put_usage(txn, shard, account, Usage())

    summary = {"mailboxes": 0, "messages": 0, "renumbered": 0}
    account_dir = shard.account_dir(account)
    directories = sorted(d for d in account_dir.iterdir() if d.name.isdigit()) if account_dir.is_dir() else []
    for directory in directories:
        _rebuild_mailbox(txn, shard, batch, account, directory, summary, prior)
    for mailbox in mailboxes.listing(txn, shard, account):
        for parent in parents(mailbox.name):  # "Recovered/<id>" and the like need their parents
            if txn.get(mailboxes.name_key(account, parent), db=shard.db["names"]) is None:
                mailboxes.create(txn, shard, batch, account, parent)
    for name, special_use in DEFAULT_MAILBOXES:
        if txn.get(mailboxes.name_key(account, name), db=shard.db["names"]) is None:
            mailboxes.create(txn, shard, batch, account, name, special_use, subscribe=True)
    # Annotations live in the index alone (storage/metadata.py): those of a mailbox that
    # came back under its id stay; those of a mailbox whose files are gone go.
    live = {m.id for m in mailboxes.listing(txn, shard, account)} | {metadata.SERVER}
    for mailbox_id in {mailbox_id for mailbox_id, _ in metadata.digests(txn, shard, account)} - live:
        metadata.drop(txn, shard, account, mailbox_id)
    _fix_counters(txn, shard, account)
    return summary


def _rebuild_mailbox(txn, shard: Shard, batch: Batch, account: str, directory: Path, summary: dict,
                     prior: dict[int, tuple[int, int]]) -> None:
    meta = maildir.read_meta(directory) or {}
    try:
        name = normalize_name(meta.get("name") or f"Recovered/{directory.name}")
    except MailboxNameError:
        name = f"Recovered/{directory.name}"
    if txn.get(mailboxes.name_key(account, name), db=shard.db["names"]) is not None:
        name = f"Recovered/{directory.name}"
    files = [(maildir.parse_file_name(e.name), Path(e.path)) for sub in ("cur", "new") for e in _files(directory / sub)]
    uids = [parsed[1] for parsed, _ in files if parsed]
    mailbox_id = int(directory.name)
    renumber = len(uids) != len(files) or len(set(uids)) != len(uids) or not 0 < mailbox_id < 2**32
    if renumber:
        # Not every file has a unique UID: clients must forget what they knew (new UIDVALIDITY).
        old_id, mailbox_id = mailbox_id, mailboxes.new_id(txn, shard)
        if 0 < old_id < 2**32:  # its annotations follow it to its new id
            metadata.move(txn, shard, account, old_id, mailbox_id)
        new_directory = shard.mailbox_dir(account, mailbox_id)
        os.rename(directory, new_directory)
        batch.undo(lambda a=new_directory, b=directory: os.rename(a, b))
        files = [(parsed, new_directory / path.parent.name / path.name) for parsed, path in files]
        directory = new_directory
        summary["renumbered"] += 1
    else:
        raw = txn.get(b"uidvalidity", db=shard.db["counters"])
        if raw is None or unpack_u32(raw) < mailbox_id:
            txn.put(b"uidvalidity", pack_u32(mailbox_id), db=shard.db["counters"])
    files.sort(key=lambda item: (item[0][1] if item[0] and not renumber else 0, item[1].stat().st_mtime, item[1].name))
    # UIDNEXT never below what the old index or the last expunge recorded; MODSEQ above
    # anything handed out before (those count up from 1; a millisecond clock is far beyond).
    known_uidnext, known_modseq = prior.get(mailbox_id, (1, 1)) if not renumber else (1, 1)
    uidnext = max(known_uidnext, int(meta.get("uidnext", 1)) if not renumber else 1)
    modseq = max(known_modseq + 1, int(time.time() * 1000))
    # The expunge history is gone with the old index, and messages whose files were lost are
    # gone unrecorded: a client from before this MODSEQ is answered from what is still here
    # (storage/vanished.py), never told that nothing vanished.
    state = MailboxRecord(account=account, name=name, uidnext=uidnext, modseq=modseq,
                          special_use=meta.get("special_use"), expunged_floor=modseq - 1)
    for index, (parsed, path) in enumerate(files):
        raw = path.read_bytes()
        uid = parsed[1] if parsed and not renumber else index + 1
        bits = parsed[3] if parsed else maildir.bits_from_letters(path.name.partition(":2,")[2])
        base = parsed[0] if parsed and not renumber else maildir.new_base()
        target = directory / "cur" / maildir.file_name(base, uid, len(raw), bits)
        if path != target:
            os.rename(path, target)
            batch.undo(lambda t=target, p=path: os.rename(t, p))
        record, texts = _record(raw, target, base)
        entry = Entry(modseq, bits, len(raw), int(record.internal_date), messages.sent_seconds(record), ())
        messages.put_entry(txn, shard, mailbox_id, uid, entry)
        txn.put(uid_key(mailbox_id, uid), records.encode(record), db=shard.db["msgs"])
        txn.put(messages.modseq_key(mailbox_id, modseq, uid), b"", db=shard.db["modseqs"])
        txn.put(base.encode(), uid_key(mailbox_id, uid), db=shard.db["bases"])
        fts.store_texts(txn, shard, mailbox_id, uid, texts)
        state.uidnext = max(state.uidnext, uid + 1)
        summary["messages"] += 1
    records.put_mailbox(txn, shard, mailbox_id, state)
    txn.put(mailboxes.name_key(account, name), pack_u32(mailbox_id), db=shard.db["names"])
    txn.put(mailboxes.name_key(account, name), b"", db=shard.db["subs"])
    maildir.write_meta(directory, {"name": name, "special_use": meta.get("special_use"), "uidnext": state.uidnext})
    summary["mailboxes"] += 1


def _record(raw: bytes, path: Path, base: str) -> tuple[MessageRecord, dict[str, str]]:
    """The index record of a message file found on disk (its mtime is its internal date),
    and its text for the full-text index."""
    parsed = parse_message(raw)
    record = MessageRecord.of(parsed, base=base, size=len(raw), internal_date=path.stat().st_mtime)
    return record, fts.fields_of(parsed)


def _files(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return [e for e in entries if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _abandoned(entry: os.DirEntry) -> bool:
    """A tmp/ file whose writing process is gone (our names carry P<pid> and the host)."""
    parts = entry.name.split(".", 2)  # <seconds>.M<usec>P<pid>Q<n>R<random>.<host>
    if len(parts) == 3 and parts[2] == maildir.HOST and "P" in parts[1]:
        pid_text = parts[1].split("P", 1)[1].split("Q", 1)[0]
        if pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists():
            return True
    try:
        return time.time() - entry.stat().st_mtime > TMP_MAX_AGE
    except FileNotFoundError:
        return False  # its writer just renamed it into place


def _unlink(entry: os.DirEntry | Path) -> None:
    try:
        os.unlink(entry)
    except FileNotFoundError:
        pass

