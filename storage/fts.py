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
Fields: b body (decoded text parts, HTML stripped), h all header lines, s subject, f from,
t to, c cc, k bcc.

Postings of expunged messages are not removed (that would need every token again); search
intersects candidates with the UIDs that exist, and `store check --repair` may compact later.
A message with more distinct tokens than MAX_TOKENS is put on the `*` list and is always a
candidate, so a huge message is still found, only more slowly.
"""

from __future__ import annotations

import json
import re
import unicodedata
import zlib
from array import array
from collections.abc import Iterable

import lmdb

from storage.shard import Shard, uid_key

FIELDS = ("b", "h", "s", "f", "t", "c", "k")
CHUNK = 1024
MAX_TOKEN_CHARS = 120
MAX_TOKENS = 20_000
OVERFLOW = "*"

_WORD = re.compile(r"\w+")
assert array("I").itemsize == 4, "posting lists are arrays of 32-bit UIDs"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def tokenize(normalized: str) -> list[str]:
    return _WORD.findall(normalized)


def fields_of(parsed: dict) -> dict[str, str]:
    """The normalized text of each field, from storage.mime.parse_message's result."""
    f = parsed["fields"]
    return {
        "b": normalize(parsed["body"]),
        "h": normalize(parsed["headers"]),
        "s": normalize(f["subject"]),
        "f": normalize(f["from"]),
        "t": normalize(f["to"]),
        "c": normalize(f["cc"]),
        "k": normalize(f["bcc"]),
    }


def add(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, uid: int, texts: dict[str, str]) -> None:
    """Index one message: its texts, and its UID on the posting list of each token."""
    txn.put(uid_key(mailbox_id, uid), zlib.compress(json.dumps(texts, ensure_ascii=False).encode(), 3),
            db=shard.db["texts"])
    box = mailbox_id.to_bytes(4, "big")
    cursor = txn.cursor(db=shard.db["terms"])
    count = 0
    for field in FIELDS:
        text = texts.get(field)
        if not text:
            continue
        for token in set(tokenize(text)):
            count += 1
            if count > MAX_TOKENS:
                _append(txn, cursor, shard, box + OVERFLOW.encode() + b"\0", uid, None)
                return
            word = token[:MAX_TOKEN_CHARS].encode()
            _append(txn, cursor, shard, box + field.encode() + word + b"\0", uid, box + field.encode() + word)


def _append(txn: lmdb.Transaction, cursor: lmdb.Cursor, shard: Shard, prefix: bytes, uid: int,
            vocab_key: bytes | None) -> None:
    uid_bytes = uid.to_bytes(4, "big")
    # The last chunk of this posting list is the greatest key below prefix + uid.
    if cursor.set_range(prefix + uid_bytes):
        found = cursor.prev()
    else:
        found = cursor.last()
    if found and cursor.key().startswith(prefix) and len(cursor.key()) == len(prefix) + 4:
        value = cursor.value()
        if len(value) < CHUNK * 4:
            cursor.put(cursor.key(), bytes(value) + uid.to_bytes(4, "little"))
            return
    elif vocab_key is not None:
        txn.put(vocab_key, b"", db=shard.db["vocab"])
    txn.put(prefix + uid_bytes, uid.to_bytes(4, "little"), db=shard.db["terms"])


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
    for name in ("terms", "vocab", "texts"):
        cursor = txn.cursor(db=shard.db[name])
        if cursor.set_range(box):
            while cursor.key()[:4] == box:
                if not cursor.delete():
                    break
