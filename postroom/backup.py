"""`postroom backup DIR`: a consistent copy of a live data dir, and what else a restore needs.

    DIR/
      data/           the data dir, ready to be put back where [server] data_dir says
      postroom.toml   the config file the backup was made with
      tls/            the certificate and key, when they live outside the data dir
      backup.json     what was copied, from where, when; written last: without it the
                      backup did not finish

While it runs the data is copied into DIR/data.unfinished, renamed data/ once the copy is
whole: a backup killed on the way (OOM, a reboot) leaves no data/ that `cp -a` could put
back. A partial copy is worse than none: `store check` finds nothing wrong with a data dir
whose shard directories were never copied (it makes them again, empty), and the mail of
those accounts would be gone without a word.

The daemons keep running. Each shard's index and the queue's (in a cluster, each shard
queue on disk, <shard>/queue, into the same place in the copy) are copied from one read
transaction each, and the files that snapshot names are hard-linked into the copy (copied
where DIR is on another file system): storage/snapshot.py says why the copy is consistent
whatever is delivered, flagged or expunged meanwhile. The accounts and the other LMDB
environments (rates, logins, greylist) are copied under a read transaction each; the
plain files (layout.json, srs.key, audit.log, DKIM keys) as they are; lock files not at all.
At the end the copy is checked as `postroom store check` would check it (exit 1 if it
finds anything), so a backup that says OK restores to a store that checks clean.

Linked files share their disk blocks with the live store (message files are never
rewritten, so the copy cannot change): a backup on the same file system protects against
mistakes and bad upgrades, not against losing the disk. docs/backups.md says how to copy it
elsewhere and how to restore.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from conf import Config
from conf.values import human_size
from postroom import __version__
from postroom.admin import AuditLog
from postroom.datadir import open_queues, open_store
from storage import Accounts, DataDir, Store, StoreError, open_data_dir
from storage.check import check
from storage.maildir import make_private_dirs
from storage.snapshot import CopyStats, FileCopier, copy_environment_at, finish, snapshot_shard, still_indexed

FORMAT = 1
MANIFEST = "backup.json"
UNFINISHED = "data.unfinished"  # the copy's name until it is whole (see the module's docstring)
# What the store and the queue copy themselves; the rest of the data dir is copied as found.
_SPECIAL = {"shards", "queue", "accounts.lmdb"}
# Not copied at all: the running processes' metric files ([metrics], postroom/metrics.py),
# named by pid. Restored elsewhere, a standalone daemon keeps the files of pids that run
# there (its clean-up removes only dead ones) and their old counts join the new.
_LEFT_OUT = {"metrics"}


def backup(config: Config, data_dir: DataDir, accounts: Accounts, args: argparse.Namespace, audit: AuditLog) -> int:
    target = Path(args.dir).absolute()
    source = data_dir.path.resolve()
    if target.resolve() == source or source in target.resolve().parents:
        raise StoreError(f"{target}: inside the data dir {source}: choose a directory outside it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StoreError(f"{target}: exists and is not empty: a backup goes into a new directory")
    started = time.monotonic()
    make_private_dirs(target)
    data = target / UNFINISHED
    make_private_dirs(data)

    accounts.copy_to(data / "accounts.lmdb")
    _copy_rest(source, data)

    copier = FileCopier()
    stats = CopyStats()
    with open_store(data_dir, accounts, config) as store:
        shards = store.shards()  # in a cluster, those this node holds
        for shard in shards:
            shard_stats = snapshot_shard(shard, data / shard.path.relative_to(data_dir.path), copier)
            _progress(f"shard {shard.number}: {shard_stats.messages} message(s)")
            stats.add(shard_stats)
        if len(shards) < data_dir.shards:
            others = sorted(set(range(data_dir.shards)) - {shard.number for shard in shards})
            _progress(f"shard(s) {', '.join(map(str, others))}: not held by this node, not in this backup "
                      f"(back them up on their owners)")
        # A file gone before it was linked is a message expunged since the snapshot, if the
        # live index agrees; if it still has it, the live store lacks that file (store check).
        expunged = [g for g in stats.gone if not still_indexed(store.shard(g.account), g.base)]
    # The queue (in a cluster, each shard's queue on disk), each in its place in the copy.
    queued, finished = 0, []
    with open_queues(config, data_dir) as queues:
        queues.refresh()
        for queue in queues.queues():
            copied, gone = queue.snapshot(data / queue.path.relative_to(data_dir.path),
                                          lambda a, b: copier.place(a, b, stats))
            queued, finished = queued + copied, finished + gone

    copy = open_data_dir(data, data_dir.shards)
    removed = finish(copy, expunged)
    tls = _copy_tls(config, source, target)
    if config.source is not None and Path(config.source).is_file():
        shutil.copy2(config.source, target / "postroom.toml")
    _progress("checking the copy")
    with Store(copy) as copy_store:
        problems = check(copy_store)
    os.sync()  # the copy is durable before it says so
    os.rename(data, target / "data")
    _fsync_dir(target)

    seconds = round(time.monotonic() - started, 1)
    manifest = {
        "format": FORMAT,
        "postroom": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(source),
        "config": str(config.source) if config.source is not None else None,
        "shards": data_dir.shards,
        "messages": stats.messages - removed,
        "bytes": stats.bytes,
        "linked": stats.linked,
        "copied": stats.copied,
        "queued": queued - len(finished),
        "left_out": {"expunged": removed, "delivered_from_queue": len(finished)},
        "tls": tls,
        "problems": [str(p) for p in problems],
        "seconds": seconds,
    }
    _write_manifest(target / MANIFEST, manifest)
    audit("backup", dir=str(target), messages=manifest["messages"], queued=manifest["queued"],
          problems=len(problems))

    how = f"{stats.linked} linked, {stats.copied} copied"
    print(f"backup {target}: {manifest['messages']} message(s) in {stats.mailboxes} mailbox(es), "
          f"{human_size(stats.bytes)} ({how}); {manifest['queued']} queued; {seconds} s")
    if removed or finished:
        print(f"left out, as they changed while the backup ran: {removed} message(s) expunged, "
              f"{len(finished)} queued message(s) delivered")
    unexplained = len(stats.gone) - len(expunged)
    if unexplained:
        print(f"{unexplained} message(s) whose files are missing in the live store too: "
              "run 'postroom store check'")
    for problem in problems:
        print(problem)
    print(f"copy checked: {len(problems)} problem(s)")
    return 1 if problems else 0


def _copy_rest(source: Path, data: Path) -> None:
    """Everything of the data dir but the store, the queue and the accounts: the other
    LMDB environments under a read transaction each, plain files and directories as they
    are. Lock files hold pids of this machine's processes: they are not copied."""
    for entry in sorted(source.iterdir()):
        if entry.name in _SPECIAL | _LEFT_OUT or entry.name.endswith(".lock") or entry.is_symlink():
            continue
        if entry.is_dir() and entry.name.endswith(".lmdb"):
            copy_environment_at(entry, data / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, data / entry.name, symlinks=True,
                            ignore=lambda _, names: [n for n in names if n.endswith(".lock")])
        elif entry.is_file():
            shutil.copy2(entry, data / entry.name)


def _copy_tls(config: Config, source: Path, target: Path) -> dict[str, dict[str, str]]:
    """The certificate and key, when they are outside the data dir (inside, they are in
    data/ already): into tls/ under their own names; the manifest says where they were."""
    made = target / "tls"
    make_private_dirs(made)
    copied = {}
    for name, path in (("cert", config.tls.cert), ("key", config.tls.key)):
        if path is None or not Path(path).is_file():
            continue
        path = Path(path).absolute()
        if source in path.resolve().parents:
            copied[name] = {"path": str(path), "in_backup": str(Path("data") / path.resolve().relative_to(source))}
            continue
        copy = made / path.name
        if copy.exists():  # cert and key of the same name in two directories
            copy = made / f"{name}-{path.name}"
        shutil.copy2(path, copy)
        copied[name] = {"path": str(path), "in_backup": str(copy.relative_to(target))}
    return copied


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """A rename in `path` made durable (the data is already: os.sync above)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _progress(text: str) -> None:
    print(f"postroom backup: {text}", file=sys.stderr, flush=True)

