"""A Maildir as a source of `postroom store import`: Dovecot's, Python's `mailbox`, any
maildir(5) writer.

Layout: the root's cur/ and new/ are INBOX; its folders are Maildir++ subdirectories
(`.Sent`, `.Work.Projects`: "." separates levels, names in IMAP's modified UTF-7 as Dovecot
writes them, RFC 3501 §5.1.3), and a folder inside a folder (`.Work/.Projects`, as Python's
`Maildir.add_folder` nests them) is a level too. tmp/ is never read: what is there is not
delivered yet.

A message's flags are its name's info suffix `:2,` (maildir(5)): D \\Draft, F \\Flagged,
R \\Answered, S \\Seen, T \\Deleted; Dovecot's lowercase letters a-z are keywords, the
n-th line of the folder's `dovecot-keywords` ("0 $Forwarded"). Its internal date is the
file's mtime (Dovecot keeps it there, and so does Postroom). Dovecot's `dovecot-uidlist`
gives the folder's UIDVALIDITY and UIDNEXT (header "3 V<uidvalidity> N<uidnext> ...") and
each file's UID ("<uid> [ext...] :<file name>"), matched on the name before `:2,`: they are
kept, so clients do not fetch the mailbox again. A file the uidlist does not know (it came
after Dovecot last looked) gets a new UID above the source's UIDNEXT.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from imapd import utf7
from postroom.importer_source import Folder, Message, SourceError, crlf_pieces

MAX_LINE = 64 << 10  # bytes of a dovecot-uidlist or dovecot-keywords line read at most
_LETTERS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir()


def folders(root: Path) -> Iterator[Folder]:
    if not is_maildir(root):
        raise SourceError(f"{root}: not a Maildir (no cur/ directory)")
    yield _folder(root, "INBOX")
    yield from _subfolders(root, [])


def _subfolders(directory: Path, parents: list[str]) -> Iterator[Folder]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"{directory}: {e.strerror}") from None
    for entry in entries:
        # A symbolic link is not followed: one to "." would nest the Maildir in itself
        # without end, one elsewhere would import what is not the user's mail.
        if not entry.name.startswith(".") or entry.name in (".", "..") or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if not is_maildir(path):
            continue
        levels = parents + [_decode(level) for level in entry.name[1:].split(".") if level]
        if not levels:
            continue
        if levels[0].upper() == "INBOX" and len(levels) == 1:
            continue  # a ".INBOX" beside the root's own INBOX: Courier's habit, the same mail
        name = "/".join(levels)
        yield _folder(path, name)
        yield from _subfolders(path, levels)


def _decode(level: str) -> str:
    try:
        return utf7.decode(level.encode("ascii"))
    except (UnicodeError, utf7.UTF7Error):
        return level  # not modified UTF-7 (a Python `mailbox` folder with an "&"): as it is


def _folder(path: Path, name: str) -> Folder:
    """The folder as its uidlist's header describes it; its files are listed, and the
    uidlist read, only when its turn comes (a big Maildir has many of both)."""
    uidvalidity, uidnext = _read_uidlist_header(path / "dovecot-uidlist")
    folder = Folder(name=name, uidvalidity=uidvalidity, uidnext=uidnext, messages=lambda known: iter(()))

    def messages(known) -> Iterator[Message]:
        _, _, uids = _read_uidlist(path / "dovecot-uidlist")
        files = _message_files(path)
        folder.count = len(files)
        yield from _messages(files, uids, _read_keywords(path / "dovecot-keywords"))

    folder.messages = messages
    return folder


def _read_uidlist_header(path: Path) -> tuple[int | None, int | None]:
    try:
        with open(path, "rb") as file:
            header = file.readline(4096)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    return _parse_header(header.decode("utf-8", "replace").split(), path)


def _message_files(path: Path) -> list[tuple[str, Path]]:
    """(base name, path) of every message in cur/ and new/; only names, never contents."""
    found = []
    for sub in ("cur", "new"):
        if (path / sub).is_symlink():  # its files are elsewhere: not this Maildir's mail
            raise SourceError(f"{path / sub}: a symbolic link, not followed")
        try:
            with os.scandir(path / sub) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    found.append((_base(entry.name), Path(entry.path)))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise SourceError(f"{path / sub}: {e.strerror}") from None
    return found


def _messages(files: list[tuple[str, Path]], uids: dict[str, int], keywords: dict[str, str]) -> Iterator[Message]:
    # Ascending UID, then the files the uidlist does not know, oldest (by name) first.
    ordered = sorted(files, key=lambda f: (f[0] not in uids, uids.get(f[0], 0), f[0]))
    for base, path in ordered:
        info = path.name.partition(":2,")[2] if ":2," in path.name else ""
        flags = tuple(dict.fromkeys(_flag(letter, keywords) for letter in info if _flag(letter, keywords)))
        try:
            date = path.stat().st_mtime  # the internal date, as Dovecot keeps it
        except FileNotFoundError:
            moved = _find(path, base)
            if moved is None:
                continue  # expunged on the source since the listing
            path = moved
            date = path.stat().st_mtime
            info = path.name.partition(":2,")[2]
            flags = tuple(dict.fromkeys(_flag(letter, keywords) for letter in info if _flag(letter, keywords)))
        yield Message(key=f"maildir:{base}", uid=uids.get(base), flags=flags, internal_date=date,
                      chunks=lambda path=path, base=base: _read(path, base))


def _flag(letter: str, keywords: dict[str, str]) -> str | None:
    return _LETTERS.get(letter) or keywords.get(letter)


def _read(path: Path, base: str) -> Iterator[bytes]:
    """The file's bytes, CRLF."""
    try:
        file = _open_regular(path)
    except FileNotFoundError:
        # Renamed since the listing: Dovecot moves new/ to cur/, and renames for a flag change
        moved = _find(path, base)
        if moved is None:
            raise
        file = _open_regular(moved)
    with file:
        yield from crlf_pieces(file)


def _open_regular(path: Path) -> BinaryIO:
    """The message file, open, if it is a regular file. A Maildir is often the user's to
    write: a symbolic link in it (to /etc/shadow) would import a file the user cannot
    read, a FIFO would hang the import, /dev/zero would fill the disk. O_NONBLOCK: opening
    a FIFO with no writer returns at once instead of waiting for one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link, not followed") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device...), not read")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _find(path: Path, base: str) -> Path | None:
    """The message file `base` now, in cur/ or new/ of the folder, under any info suffix."""
    folder = path.parent.parent
    for sub in ("cur", "new"):
        try:
            with os.scandir(folder / sub) as entries:
                for entry in entries:
                    if entry.name == base or _base(entry.name) == base:
                        return Path(entry.path)
        except OSError:
            continue
    return None


def _base(name: str) -> str:
    """A message file's unique part: its name without the info suffix (which changes with flags)."""
    for marker in (":2,", "!2,"):  # "!" where ":" is not allowed in names
        if marker in name:
            return name.split(marker, 1)[0]
    return name


def _read_uidlist(path: Path) -> tuple[int | None, int | None, dict[str, int]]:
    """(UIDVALIDITY, UIDNEXT, {base: UID}) from a dovecot-uidlist; Nones and {} without one."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return None, None, {}
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    uids: dict[str, int] = {}
    taken: set[int] = set()
    with file:
        uidvalidity, uidnext = _parse_header(file.readline(4096).decode("utf-8", "replace").split(), path)
        for raw in _lines(file):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            head, colon, name = line.partition(" :")
            if not colon:  # version 1 lines, "<uid> <name>"
                head, _, name = line.partition(" ")
            uid = _number(head.split(" ", 1)[0])
            if uid and name and uid not in taken:
                # A UID given to a second file (a corrupt uidlist) stays the first one's: the
                # second gets a new UID, where keeping it would skip it as "in already".
                taken.add(uid)
                uids[_base(name)] = uid
    return uidvalidity, uidnext, uids


def _lines(file: BinaryIO) -> Iterator[bytes]:
    """The file's lines, each read MAX_LINE bytes at most: a longer one (no uidlist has
    one; a file the user wrote could be one line of gigabytes) is skipped to its end."""
    while raw := file.readline(MAX_LINE):
        if raw.endswith(b"\n") or len(raw) < MAX_LINE:
            yield raw
            continue
        while (rest := file.readline(MAX_LINE)) and not rest.endswith(b"\n"):
            pass


def _parse_header(header: list[str], path: Path) -> tuple[int | None, int | None]:
    uidvalidity = uidnext = None
    if header and header[0] == "1" and len(header) >= 3:  # version 1: "1 <uidvalidity> <uidnext>"
        uidvalidity, uidnext = _number(header[1]), _number(header[2])
    elif header and header[0] in ("2", "3"):
        for field in header[1:]:
            if field[:1] == "V":
                uidvalidity = _number(field[1:])
            elif field[:1] == "N":
                uidnext = _number(field[1:])
    else:
        raise SourceError(f"{path}: not a dovecot-uidlist this import knows (header {' '.join(header)[:40]!r})")
    if uidvalidity is not None and not 0 < uidvalidity < 2**32:
        uidvalidity = None
    return uidvalidity, uidnext


def _read_keywords(path: Path) -> dict[str, str]:
    """{letter: keyword} from a dovecot-keywords ("<index> <keyword>" lines; a is 0)."""
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_LINE * 26).decode("utf-8", "replace")  # 26 keywords at most (a-z)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    keywords = {}
    for line in text.splitlines():
        index, _, keyword = line.partition(" ")
        number = _number(index)
        if number is not None and number < 26 and keyword.strip():
            keywords[chr(ord("a") + number)] = keyword.strip()
    return keywords


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 12 else None
