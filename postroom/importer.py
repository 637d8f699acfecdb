"""`postroom store import ACCOUNT SOURCE`: mail moved in from another server.

SOURCE is a Maildir directory (postroom/importer_maildir.py: Dovecot's, with its UIDs and
UIDVALIDITY kept), an mbox file (postroom/importer_mbox.py, into `--into`, INBOX by
default), or imap://USER@HOST[:PORT] / imaps://... (postroom/importer_imap.py, the password
on standard input). The store side (storage/imports.py) keeps UIDVALIDITY and UIDs where it
can and keeps a ledger, so running the command again imports only what is new.

Progress goes to stderr (a bar on a terminal, a line every PROGRESS_EVERY seconds
otherwise), a summary to stdout: one line per folder and a total. A source that cannot be
read at all is one line on stderr and exit 1; a message that cannot be read is named on
stderr, counted, and the import goes on (exit 1 at the end, so that a script notices).
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import TextIO

from postroom import importer_imap, importer_maildir, importer_mbox
from postroom.importer_source import Folder, SourceError
from storage import (
    INBOX,
    Accounts,
    ImportCounts,
    ImportMailbox,
    MailboxError,
    Store,
    clean_flags,
    finish_import,
    parse_address,
)

PROG = "postroom"
PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
MAX_ERRORS_SHOWN = 20


def store_import(store: Store, accounts: Accounts, args: argparse.Namespace, audit) -> int:
    try:
        return _import(store, accounts, args, audit)
    except SourceError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def _import(store: Store, accounts: Accounts, args: argparse.Namespace, audit) -> int:
    account = str(parse_address(args.account))
    if accounts.get_user(account) is None:
        raise SourceError(f"no user {account}: add it first (postroom user add {account})")
    source = args.source
    progress = Progress(sys.stderr)
    totals, problems, folders_done = ImportCounts(), 0, 0
    imap = None
    try:
        if importer_imap.is_url(source):
            server = importer_imap.parse_url(source)
            imap = importer_imap.connect(server, _password(server), args.cafile)
            folders = importer_imap.folders(imap, f"{server.host}:{server.port}")
        else:
            path = Path(source)
            if path.is_dir():
                folders = importer_maildir.folders(path)
            elif path.is_file():
                folders = importer_mbox.folders(path, args.into or INBOX)
            elif path.exists():
                raise SourceError(f"{source}: neither a Maildir directory nor an mbox file")
            else:
                raise SourceError(f"{source}: no such file or directory (nor an imap:// or imaps:// URL)")
        if args.into and not (not importer_imap.is_url(source) and Path(source).is_file()):
            raise SourceError("--into is for an mbox file (a Maildir or an IMAP account brings its own folders)")
        # Every folder's name and UIDVALIDITY first: a mailbox made for one folder (a parent,
        # INBOX) must not take the id another folder's UIDVALIDITY needs (storage/imports.py).
        # Parents before children: a parent that is a folder too is made under its own.
        folders = sorted(folders, key=lambda f: (f.name != INBOX, f.name))
        plan = {f.name: f.uidvalidity for f in folders}
        for folder in folders:
            counts, kept = _import_folder(store, account, folder, progress, plan)
            if counts is None:
                problems += 1
                continue
            folders_done += 1
            for name in ("imported", "skipped", "renumbered"):
                setattr(totals, name, getattr(totals, name) + getattr(counts, name))
            totals.failed.extend(counts.failed)
            print(f"{folder.name}: {_counts_text(counts)}{kept}", flush=True)
    finally:
        if imap is not None:
            importer_imap.logout(imap)
        if folders_done or problems:
            finish_import(store, account)  # the default mailboxes the source did not have
    audit("store.imported", account=account, source=_redacted(source), folders=folders_done,
          imported=totals.imported, skipped=totals.skipped, failed=len(totals.failed))
    print(f"total: {_counts_text(totals)} in {folders_done} folder(s)" + (
        f", {problems} folder(s) not imported" if problems else ""))
    return 1 if totals.failed or problems else 0


def _import_folder(store: Store, account: str, folder: Folder, progress: Progress, plan: dict
                   ) -> tuple[ImportCounts | None, str]:
    try:
        target = ImportMailbox(store, account, folder.name, uidvalidity=folder.uidvalidity, uidnext=folder.uidnext,
                               special_use=folder.special_use, plan=plan)
    except MailboxError as e:
        print(f"{PROG}: folder {folder.name!r} not imported: {e}", file=sys.stderr)
        return None, ""

    def known(key: str, uid: int | None) -> bool:
        if target.known(key, uid):
            target.skip()
            return True
        return False

    dropped: dict[str, None] = {}
    progress.start(target.name, folder)
    for message in folder.messages(known):
        if isinstance(message.key, str) and known(message.key, message.uid):
            progress.step(target.counts)
            continue
        flags, refused = clean_flags(message.flags)
        dropped.update(dict.fromkeys(refused))
        try:
            target.add(message.key, message.chunks(), uid=message.uid, flags=flags,
                       internal_date=message.internal_date)
        except OSError as e:
            name = message.key if isinstance(message.key, str) else "a message"
            target.fail(name, f"cannot read it: {e.strerror or e}")
        progress.step(target.counts)
    counts = target.finish()
    progress.finish(target.counts)
    for key, why in counts.failed[:MAX_ERRORS_SHOWN]:
        print(f"{PROG}: {target.name}: {key}: {why}", file=sys.stderr)
    if len(counts.failed) > MAX_ERRORS_SHOWN:
        print(f"{PROG}: {target.name}: and {len(counts.failed) - MAX_ERRORS_SHOWN} more", file=sys.stderr)
    if dropped:
        print(f"{PROG}: {target.name}: flags IMAP does not allow, not kept: {' '.join(dropped)}", file=sys.stderr)
    if folder.uidvalidity is None:
        kept = f" (UIDVALIDITY {target.mailbox.id})"
    elif target.kept_uidvalidity:
        kept = f" (UIDVALIDITY {target.mailbox.id} and UIDs kept)"
    else:
        kept = f" (UIDVALIDITY {target.mailbox.id}, not the source's {folder.uidvalidity}: clients fetch it again)"
    return counts, kept


def _counts_text(counts: ImportCounts) -> str:
    text = f"{counts.imported} imported, {counts.skipped} already in"
    if counts.renumbered:
        text += f", {counts.renumbered} under new UIDs"
    return text + f", {len(counts.failed)} failed"


def _password(server) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password of {server.user} at {server.host}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise SourceError("no password on standard input")
    return password


def _redacted(source: str) -> str:
    return source if importer_imap.is_url(source) else str(Path(source).resolve())


class Progress:
    """A bar on a terminal, redrawn at most ten times a second; otherwise a line now and then."""

    def __init__(self, out: TextIO):
        self._out = out
        self._tty = out.isatty()
        self._name, self._folder = "", None
        self._last = 0.0

    def start(self, name: str, folder: Folder) -> None:
        self._name, self._folder = name, folder
        self._last = time.monotonic()
        if not self._tty:
            print(f"importing {name}", file=self._out, flush=True)

    @property
    def _total(self) -> int | None:
        return self._folder.count

    def step(self, counts: ImportCounts, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self._tty else PROGRESS_EVERY):
            return
        self._last = now
        done = counts.imported + counts.skipped + len(counts.failed)
        if self._tty:
            width = 30
            if self._total:
                filled = min(width, width * done // self._total)
                bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self._total}"
            else:
                bar = f"{done}"
            self._out.write(f"\r{self._name}: {bar}\x1b[K")
            self._out.flush()
        else:
            of = f"/{self._total}" if self._total is not None else ""
            print(f"{self._name}: {done}{of}", file=self._out, flush=True)

    def finish(self, counts: ImportCounts) -> None:
        if self._tty:
            self.step(counts, force=True)
            self._out.write("\n")
            self._out.flush()
