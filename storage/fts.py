"""Full-text index of a mailbox, kept in its shard's LMDB: what SEARCH BODY/TEXT/SUBJECT/
FROM/TO/CC/BCC/HEADER answer from, without re-reading message files.

Text is normalized once (NFKC, then case-folded) and split into tokens of word characters.
Each (mailbox, field, token) has a posting list of UIDs in chunks of up to CHUNK UIDs, keyed
by their first UID (UIDs only grow, so appending keeps them sorted):
    terms  id field token \\0 first-uid  -> UIDs, u32 little-endian
    vocab  id field token                -> b""  (each distinct token once: what substring
                                                  queries scan)
    texts  id uid                        -> zlib(JSON {field: normalized text}): what
                                            confirms a match the tokens alone cannot prove
    pending id                           -> b"": mailboxes with messages not yet indexed
Fields: b body (decoded text parts, HTML stripped), h all header lines, s subject, f from,
t to, c cc, k bcc.

Posting lists are built in the background from the stored texts (index_pending, run by the
shard's committer when it has nothing else to do); UIDs above the mailbox record's
`indexed_upto` are not on them yet, and search confirms those from their text.

Postings of expunged messages are not removed (that would need every token again): search
intersects candidates with the UIDs that exist. They go with their mailbox (deleted, or
rebuilt by `store rebuild`).
A message with more distinct tokens than MAX_TOKENS is put on the `*` list and is always a
candidate, so a huge message is still found, only more slowly.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import zlib
from array import array
from collections.abc import Iterable

import lmdb
import msgspec

from storage.mime import ParsedMessage
from storage.records import MailboxRecord, get_mailbox, put_mailbox
from storage.shard import Shard, uid_key

FIELDS = ("b", "h", "s", "f", "t", "c", "k")
CHUNK = 1024
MAX_TOKEN_CHARS = 120
MAX_TOKENS = 20_000
OVERFLOW = "*"
# Seconds a step of the background indexer reads messages for: under load a step of 300
# took 1.7 s, all of it with the shard's writer lock held, and an IMAP SELECT of the shard
# waited 11-30 s behind such steps (an attack helper's run, 2026-12-04).
TURN_SECONDS = 0.05

_WORD = re.compile(r"\w+")
assert array("I").itemsize == 4, "posting lists are arrays of 32-bit UIDs"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(normalized: str) -> list[str]:
    return _WORD.findall(normalized)


def fields_of(parsed: ParsedMessage) -> dict[str, str]:
    """The normalized text of each field, from storage.mime.parse_message's result."""
    f = parsed.fields
    return {
        "b": normalize(parsed.body),
        "h": normalize(parsed.headers),
        "s": normalize(f["subject"]),
        "f": normalize(f["from"]),
        "t": normalize(f["to"]),
        "c": normalize(f["cc"]),
        "k": normalize(f["bcc"]),
    }


def compress_texts(texts: dict[str, str]) -> bytes:
    try:
        # The bytes json.dumps(separators=(",", ":"), ensure_ascii=False) gives, a tenth of the time.
        encoded = msgspec.json.encode(texts)
    except UnicodeEncodeError:  # a lone surrogate from a broken header: JSON escapes it
        encoded = json.dumps(texts, separators=(",", ":")).encode()
    return zlib.compress(encoded, 1)


def store_texts(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int, texts: dict[str, str] | bytes) -> None:
    """At delivery: keep the message's normalized text (a dict, or compress_texts' bytes),
    and queue the mailbox for indexing. Search is already exact for it (by confirmation);
    the posting lists follow in the background (`index_pending`)."""
    record = texts if isinstance(texts, bytes) else compress_texts(texts)
    txn.put(uid_key(mailbox_id, uid), record, db=shard.db["texts"])
    txn.put(mailbox_id.to_bytes(4, "big"), b"", db=shard.db["pending"])


def indexed_upto(state: MailboxRecord | None) -> int:
    """Every UID up to this one is on the posting lists (or expunged)."""
    return state.indexed_upto if state is not None else 0


def index_pending(txn: lmdb.Transaction, shard: Shard, limit: int = 300, seconds: float | None = TURN_SECONDS) -> bool:
    """Index up to `limit` messages of queued mailboxes, reading them for `seconds` at most
    (None: no bound); True while work remains. One token's UIDs from the whole step are
    appended at once, so a word common to every message costs one update per step, not one
    per message. The step holds the shard's writer lock: every other writer of the shard, in
    any process (an IMAP SELECT's claim of \\Recent), waits for it."""
    pending = txn.cursor(db=shard.db["pending"])
    if not pending.first():
        return False
    mailbox_id = int.from_bytes(pending.key(), "big")
    state = get_mailbox(txn, shard, mailbox_id)
    if state is None:
        txn.delete(pending.key(), db=shard.db["pending"])
        return True
    start = indexed_upto(state) + 1
    postings_by_key: dict[bytes, list[int]] = {}
    box = mailbox_id.to_bytes(4, "big")
    last = start - 1
    cursor = txn.cursor(db=shard.db["texts"])
    done = 0
    stopped = False
    deadline = None if seconds is None else time.monotonic() + seconds
    if cursor.set_range(uid_key(mailbox_id, start)):
        for key, value in cursor:
            if key[:4] != box:
                break
            if done >= limit or (deadline is not None and done and time.monotonic() > deadline):
                stopped = True
                break
            uid = int.from_bytes(key[4:8], "big")
            _collect(postings_by_key, box, uid, json.loads(zlib.decompress(value)))
            last = uid
            done += 1
    terms = txn.cursor(db=shard.db["terms"])
    for prefix, uids in postings_by_key.items():
        _append(txn, terms, shard, prefix, uids)
    finished = not stopped
    state.indexed_upto = state.uidnext - 1 if finished else last
    put_mailbox(txn, shard, mailbox_id, state)
    if finished:
        txn.delete(box, db=shard.db["pending"])
    return True


def _collect(postings_by_key: dict[bytes, list[int]], box: bytes, uid: int, texts: dict[str, str]) -> None:
    count = 0
    for field in FIELDS:
        text = texts.get(field)
        if not text:
            continue
        for token in set(tokenize(text)):
            count += 1
            if count > MAX_TOKENS or len(token) > MAX_TOKEN_CHARS:
                # Not every token is on the lists whole: search confirms this message from its text.
                overflow = postings_by_key.setdefault(box + OVERFLOW.encode() + b"\0", [])
                if not overflow or overflow[-1] != uid:
                    overflow.append(uid)
                if count > MAX_TOKENS:
                    return
            postings_by_key.setdefault(box + field.encode() + token[:MAX_TOKEN_CHARS].encode() + b"\0", []).append(uid)


def _append(txn: lmdb.Transaction, cursor: lmdb.Cursor, shard: Shard, prefix: bytes, uids: list[int]) -> None:
    """Add ascending UIDs to the posting list `prefix`: fill its last chunk, then new chunks."""
    if cursor.set_range(prefix + uids[0].to_bytes(4, "big")):
        found = cursor.prev()
    else:
        found = cursor.last()
    if found and cursor.key().startswith(prefix) and len(cursor.key()) == len(prefix) + 4:
        key, value = bytes(cursor.key()), bytes(cursor.value())
        room = CHUNK - len(value) // 4
        if room > 0:
            txn.put(key, value + array("I", uids[:room]).tobytes(), db=shard.db["terms"])
            uids = uids[room:]
    elif prefix[4:5] != OVERFLOW.encode():
        txn.put(prefix[:-1], b"", db=shard.db["vocab"])  # a token new to this mailbox
    for i in range(0, len(uids), CHUNK):
        chunk = uids[i:i + CHUNK]
        txn.put(prefix + chunk[0].to_bytes(4, "big"), array("I", chunk).tobytes(), db=shard.db["terms"])


def texts(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> dict[str, str] | None:
    raw = txn.get(uid_key(mailbox_id, uid), db=shard.db["texts"])
    return json.loads(zlib.decompress(raw)) if raw is not None else None


def remove_texts(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int) -> None:
    txn.delete(uid_key(mailbox_id, uid), db=shard.db["texts"])


def postings(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, field: str, token: str,
             prefix_match: bool = False) -> set[int]:
    """UIDs with `token` in `field` (or any token starting with it, with prefix_match)."""
    box = mailbox_id.to_bytes(4, "big")
    start = box + field.encode() + token[:MAX_TOKEN_CHARS].encode()
    exact = start + b"\0"
    out: set[int] = set()
    cursor = txn.cursor(db=shard.db["terms"])
    if not cursor.set_range(start if prefix_match else exact):
        return out
    for key, value in cursor:
        if not key.startswith(start if prefix_match else exact):
            break
        out.update(array("I", bytes(value)))
    return out


def tokens_containing(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, field: str, fragment: str,
                      where: str) -> Iterable[str]:
    """Distinct tokens of the field that contain `fragment` ("infix"), end with it ("suffix")."""
    prefix = mailbox_id.to_bytes(4, "big") + field.encode()
    cursor = txn.cursor(db=shard.db["vocab"])
    if not cursor.set_range(prefix):
        return
    needle = fragment.encode()
    for key in cursor.iternext(values=False):
        if not key.startswith(prefix):
            return
        word = key[len(prefix):]
        if (needle in word) if where == "infix" else word.endswith(needle):
            yield word.decode()


def overflow(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> set[int]:
    return postings(txn, shard, mailbox_id, OVERFLOW, "")


def delete_mailbox(txn: lmdb.Transaction, shard: Shard, mailbox_id: int) -> None:
    box = mailbox_id.to_bytes(4, "big")
    txn.delete(box, db=shard.db["pending"])
    for name in ("terms", "vocab", "texts"):
        cursor = txn.cursor(db=shard.db[name])
        if cursor.set_range(box):
            while cursor.key()[:4] == box:
                if not cursor.delete():
                    break
