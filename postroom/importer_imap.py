"""A live IMAP server as a source of `postroom store import`: imap://user@host[:port]
(STARTTLS, required: the password never travels in clear) or imaps://user@host[:port]
(implicit TLS, RFC 8314), the password read from standard input.

Every selectable folder of LIST "" "*" is read with EXAMINE (read-only: nothing changes on
the source, \\Seen included, RFC 3501 §6.3.2), its UIDVALIDITY and UIDNEXT kept as a
Dovecot Maildir's are (storage/imports.py). UID SEARCH ALL lists its messages; the ones an
earlier run brought in are skipped before anything is fetched (the ledger's key is
"imap:<UIDVALIDITY>:<UID>"); the others' FLAGS, INTERNALDATE and RFC822.SIZE are fetched
BATCH at a time, then each body with BODY.PEEK[] in pieces of PIECE bytes (partial
fetches, RFC 3501 §6.4.5), so no message is ever whole in memory. Folder names are modified
UTF-7 (RFC 3501 §5.1.3), their levels joined with "/" whatever the server's delimiter; a
folder's special-use attribute (RFC 6154) goes with it to a mailbox made for it.
"""

from __future__ import annotations

import imaplib
import math
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import unquote, urlsplit

from imapd import utf7
from postroom.importer_source import Folder, Message, SourceError

PIECE = 1 << 20
BATCH = 200
TIMEOUT = 60.0  # seconds a server may stay silent
COMMAND_TIME = 600.0  # seconds a server may take to answer one command, however it trickles
# A line of an answer: UID SEARCH ALL of a folder of 160,000 messages is more than imaplib's
# own limit (1 MB, its _MAXLINE): this one lets ~6 million UIDs through, memory still bounded.
MAX_LINE = 64 << 20
MAX_LITERAL = 2 * PIECE  # a literal: at most the piece asked for (with room); more is a hostile server
# All of one command's answer (imaplib keeps every untagged line until the command ends: a
# server sending "* OK" lines without end would fill the memory before COMMAND_TIME).
MAX_ANSWER = 256 << 20
MAX_MESSAGE = 1 << 30  # bytes of one message, at most
_SPECIAL_USE = {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
_LIST = re.compile(rb'^\((?P<attrs>[^)]*)\) (?P<delim>NIL|"(?:[^"\\]|\\.)*") ?(?P<name>.*)$', re.DOTALL)
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_FETCH_DATE = re.compile(rb'\bINTERNALDATE "([^"]+)"')
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


@dataclass(frozen=True)
class Server:
    tls: bool  # implicit (imaps), else STARTTLS
    host: str
    port: int
    user: str


def is_url(source: str) -> bool:
    return source.startswith(("imap://", "imaps://"))


def parse_url(source: str) -> Server:
    parts = urlsplit(source)
    try:
        port = parts.port
    except ValueError:
        raise SourceError(f"{source}: bad port") from None
    if not parts.username or not parts.hostname:
        raise SourceError(f"{source}: expected imap://USER@HOST[:PORT] or imaps://USER@HOST[:PORT]")
    if parts.password is not None:
        raise SourceError("put no password in the URL (it would show in `ps`): give it on standard input")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SourceError(f"{source}: a folder in the URL is not supported: every folder is imported")
    tls = parts.scheme == "imaps"
    return Server(tls, parts.hostname, port or (993 if tls else 143), unquote(parts.username))


class _Bounded:
    """imaplib's reads, bounded against a server that lies or never ends: a line of at most
    MAX_LINE bytes, a literal of at most MAX_LITERAL (imaplib reads any size it is told, whole,
    into memory), an answer of at most MAX_ANSWER bytes, and within COMMAND_TIME of its
    command (a socket timeout alone lets a server that sends a byte a minute go on for
    ever). Reads go through the buffer a socket read at a time, so the deadline is checked
    between any two of them."""

    _deadline = math.inf
    _answered = 0  # bytes of the answer to the last command so far

    def send(self, data):
        self._deadline = time.monotonic() + COMMAND_TIME
        self._answered = 0
        super().send(data)

    def _took(self, data: bytes) -> bytes:
        self._answered += len(data)
        if self._answered > MAX_ANSWER:
            raise self.abort(f"an answer of more than {MAX_ANSWER} bytes")
        return data

    def _buffered(self) -> bytes:
        """What the buffer holds, after at most one read of the socket."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self.abort(f"no complete answer in {COMMAND_TIME:.0f} s")
        self.sock.settimeout(min(left, TIMEOUT))
        try:
            data = self.file.peek(1)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise self.abort(f"no complete answer in {COMMAND_TIME:.0f} s") from None
            raise
        if not data:
            raise self.abort("the server closed the connection")
        return data

    def readline(self):
        parts, size = [], 0
        while True:
            data = self._buffered()
            end = data.find(b"\n")
            part = self._took(self.file.read(end + 1 if end >= 0 else len(data)))
            parts.append(part)
            size += len(part)
            if end >= 0:
                return b"".join(parts)
            if size > MAX_LINE:
                raise self.error(f"a line of more than {MAX_LINE} bytes")

    def read(self, size):
        if size > MAX_LITERAL:
            raise self.abort(f"a literal of {size} bytes, more than was asked for")
        parts, left = [], size
        while left > 0:
            part = self._took(self.file.read(min(left, len(self._buffered()))))
            parts.append(part)
            left -= len(part)
        return b"".join(parts)


class _IMAP4(_Bounded, imaplib.IMAP4):
    pass


class _IMAP4_SSL(_Bounded, imaplib.IMAP4_SSL):
    pass


def connect(server: Server, password: str, cafile: str | None) -> imaplib.IMAP4:
    """A logged-in session, or SourceError saying what went wrong."""
    where = f"{server.host}:{server.port}"
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        raise SourceError(f"{cafile}: cannot read certificates: {getattr(e, 'strerror', None) or e}") from None
    try:
        if server.tls:
            imap = _IMAP4_SSL(server.host, server.port, ssl_context=context, timeout=TIMEOUT)
        else:
            imap = _IMAP4(server.host, server.port, timeout=TIMEOUT)
            if "STARTTLS" not in imap.capabilities:
                imap.shutdown()
                raise SourceError(f"{where} offers no STARTTLS: the password will not be sent in clear "
                                  "(use imaps:// if it listens with TLS)")
            imap.starttls(ssl_context=context)
    except ssl.SSLCertVerificationError as e:
        raise SourceError(f"{where}: certificate not trusted ({e.verify_message}): "
                          "give --cafile FILE for a private CA or a self-signed certificate") from None
    except (ssl.SSLError, imaplib.IMAP4.error) as e:
        raise SourceError(f"{where}: TLS failed: {e}") from None
    except (OSError, socket.timeout) as e:
        raise SourceError(f"{where}: cannot connect: {e.strerror or e}") from None
    try:
        imap.login(server.user, password)
    except imaplib.IMAP4.error as e:
        _close(imap)
        raise SourceError(f"{where}: login as {server.user} refused: {_text(e)}") from None
    except (OSError, imaplib.IMAP4.abort) as e:
        raise SourceError(f"{where}: connection lost at login: {e}") from None
    return imap


def folders(imap: imaplib.IMAP4, where: str) -> Iterator[Folder]:
    """Every folder with its UIDVALIDITY, UIDNEXT and size from STATUS (RFC 3501 §6.3.10):
    the importer learns them all before it makes the first mailbox. Its messages are listed
    when its turn comes."""
    for raw_name, name, special_use in _list(imap, where):
        uidvalidity, uidnext, count = _status(imap, raw_name, name, where)
        folder = Folder(name=name, count=count, uidvalidity=uidvalidity, uidnext=uidnext, special_use=special_use,
                        messages=lambda known: iter(()))

        def messages(known, raw_name=raw_name, folder=folder) -> Iterator[Message]:
            uidvalidity, uids = _examine(imap, raw_name, folder.name, where)
            if uidvalidity != folder.uidvalidity:
                raise SourceError(f"{where}: folder {folder.name!r} changed UIDVALIDITY during the import: "
                                  "run it again")
            folder.count = len(uids)
            yield from _messages(imap, where, uidvalidity, [u for u in uids if not known(_key(uidvalidity, u), u)])

        folder.messages = messages
        yield folder


def _status(imap: imaplib.IMAP4, raw_name: str, name: str, where: str) -> tuple[int | None, int | None, int | None]:
    status, data = _command(imap.status, where, _quote(raw_name), "(UIDVALIDITY UIDNEXT MESSAGES)")
    text = b" ".join(d if isinstance(d, bytes) else b" ".join(d) for d in data if d)
    found = {}
    for item in ("UIDVALIDITY", "UIDNEXT", "MESSAGES"):
        m = re.search(rb"\b" + item.encode() + rb" (\d+)", text)
        found[item] = int(m[1]) if m else None
    return found["UIDVALIDITY"], found["UIDNEXT"], found["MESSAGES"]


def _list(imap: imaplib.IMAP4, where: str) -> list[tuple[str, str, str | None]]:
    """(name as the server spells it, name here, special use) of every selectable folder."""
    status, data = _command(imap.list, where, '""', "*")
    found = []
    for item in data:
        if item is None:
            continue
        if isinstance(item, tuple):  # a name sent as a literal
            head, literal = item
            m = _LIST.match(head)
            name_bytes = literal
        else:
            m = _LIST.match(item)
            name_bytes = _unquote(m["name"]) if m else b""
        if not m:
            continue
        attrs = {a.decode("ascii", "replace").title() for a in m["attrs"].split()}
        if {"\\Noselect", "\\Nonexistent"} & attrs:
            continue
        delim = _unquote(m["delim"]).decode("ascii", "replace") if m["delim"] != b"NIL" else None
        raw_name = name_bytes.decode("utf-8", "surrogateescape")
        try:
            decoded = utf7.decode(name_bytes)
        except (UnicodeError, utf7.UTF7Error):
            decoded = raw_name
        levels = decoded.split(delim) if delim else [decoded]
        name = "/".join(level for level in levels if level) or decoded
        if name.upper() == "INBOX":
            name = "INBOX"
        special = next((a for a in attrs if a in _SPECIAL_USE), None)
        found.append((raw_name, name, special))
    found.sort(key=lambda f: (f[1] != "INBOX", f[1]))
    return found


def _examine(imap: imaplib.IMAP4, raw_name: str, name: str, where: str) -> tuple[int | None, list[int]]:
    try:
        status, data = imap.select(_quote(raw_name), readonly=True)
    except imaplib.IMAP4.abort as e:
        raise SourceError(f"{where}: connection lost: {e}") from None
    except (imaplib.IMAP4.error, OSError) as e:
        status, data = "NO", e
    if status != "OK":
        raise SourceError(f"{where}: cannot open folder {name!r}: {_text(data)}")
    uidvalidity = _response_number(imap, "UIDVALIDITY")
    status, data = _command(imap.uid, where, "SEARCH", "ALL")
    uids = sorted(int(u) for u in b" ".join(d for d in data if isinstance(d, bytes)).split() if u.isdigit())
    return uidvalidity, uids


def _messages(imap: imaplib.IMAP4, where: str, uidvalidity: int | None, uids: list[int]) -> Iterator[Message]:
    """Messages of the folder selected last (the importer reads folders one after another)."""
    for start in range(0, len(uids), BATCH):
        batch = uids[start:start + BATCH]
        status, data = _command(imap.uid, where, "FETCH", ",".join(map(str, batch)),
                                "(UID FLAGS INTERNALDATE RFC822.SIZE)")
        details = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes) or not (uid := _FETCH_UID.search(line)):
                continue
            flags = _FETCH_FLAGS.search(line)
            date = _FETCH_DATE.search(line)
            size = _FETCH_SIZE.search(line)
            details[int(uid[1])] = (
                tuple(f.decode("utf-8", "replace") for f in flags[1].split()) if flags else (),
                _internal_date(date[1]) if date else None,
                int(size[1]) if size else None,
            )
        for uid in batch:
            if uid not in details:
                continue  # expunged on the source since the search
            flags, date, size = details[uid]
            yield Message(key=_key(uidvalidity, uid), uid=uid, flags=flags, internal_date=date,
                          chunks=lambda uid=uid, size=size: _body(imap, where, uid, size))


def _key(uidvalidity: int | None, uid: int) -> str:
    return f"imap:{uidvalidity}:{uid}"


def _body(imap: imaplib.IMAP4, where: str, uid: int, size: int | None) -> Iterator[bytes]:
    offset = 0
    while True:
        status, data = _command(imap.uid, where, "FETCH", str(uid), f"(BODY.PEEK[]<{offset}.{PIECE}>)")
        piece = next((item[1] for item in data if isinstance(item, tuple)), None)
        if piece is None:
            if offset == 0:
                raise OSError(f"the server sent no body for UID {uid}")
            return
        if offset + len(piece) > MAX_MESSAGE:
            # A server that answers every piece in full, whatever the offset, would fill
            # the disk: no mail is this big.
            raise OSError(f"UID {uid} is more than {MAX_MESSAGE} bytes (RFC822.SIZE {size})")
        if piece:
            yield piece
        offset += len(piece)
        if len(piece) < PIECE or (size is not None and offset >= size):
            return


def _command(method, where: str, *args):
    try:
        status, data = method(*args)
    except imaplib.IMAP4.abort as e:
        raise SourceError(f"{where}: connection lost: {e}") from None
    except imaplib.IMAP4.error as e:
        raise SourceError(f"{where}: {_text(e)}") from None
    except OSError as e:
        raise SourceError(f"{where}: connection lost: {e.strerror or e}") from None
    if status != "OK":
        raise SourceError(f"{where}: {args[0] if args else 'command'} failed: {_text(data)}")
    return status, data


def _response_number(imap: imaplib.IMAP4, name: str) -> int | None:
    _, data = imap.response(name)
    for item in data or ():
        if isinstance(item, bytes) and item.strip().isdigit():
            return int(item.strip())
    return None


def _internal_date(text: bytes) -> float | None:
    try:
        return datetime.strptime(text.decode("ascii").strip(), "%d-%b-%Y %H:%M:%S %z").timestamp()
    except (UnicodeError, ValueError):
        return None


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: bytes) -> bytes:
    if text.startswith(b'"') and text.endswith(b'"') and len(text) >= 2:
        return re.sub(rb"\\(.)", rb"\1", text[1:-1])
    return text


def _text(data) -> str:
    if isinstance(data, BaseException):
        data = data.args[0] if data.args else str(data)
    if isinstance(data, list):
        data = b" ".join(d for d in data if isinstance(d, bytes))
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return str(data).strip()[:200]


def _close(imap: imaplib.IMAP4) -> None:
    try:
        imap.shutdown()
    except OSError:
        pass


def logout(imap: imaplib.IMAP4) -> None:
    try:
        imap.logout()
    except (OSError, imaplib.IMAP4.error):
        pass
