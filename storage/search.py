"""SEARCH over one mailbox, answered from the index (RFC 3501 §6.4.4, RFC 7162 MODSEQ).

A query is a tree of tuples that imapd builds from the IMAP command (sequence numbers
already turned into UIDs; \\Recent, NEW and OLD are the session's and stay in imapd):

    ("all",)                      ("uid", [(low, high), ...])
    ("flag", "\\\\Seen", True)       ("flag", "$Label", False)        keywords too
    ("before"|"on"|"since", date)                      internal date
    ("sentbefore"|"senton"|"sentsince", date)          Date: header
    ("larger", n)  ("smaller", n)  ("modseq", n)
    ("from"|"to"|"cc"|"bcc"|"subject"|"body"|"text", string)
    ("header", field-name, string)
    ("emailid"|"threadid", objectid)                   RFC 8474
    ("savedbefore"|"savedon"|"savedsince", date)  ("savedatesupported",)   RFC 8514
    ("not", q)  ("or", q1, q2)  ("and", [q, ...])

Flags, dates and sizes come from each message's fixed-size record. Strings are IMAP
substrings, compared after NFKC case folding: the token index finds candidates (a word
inside a token for a one-word string, whole, leading or trailing tokens for the words of a
longer one) and the stored normalized text confirms the exact substring wherever tokens
alone cannot prove it, and for the newest messages the background indexer has not reached
yet. Dates compare as UTC calendar days.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

import lmdb

from storage import fts, maildir, objectid
from storage.errors import SearchError
from storage.messages import all_uids, entries, normalize_ranges, unseen_uids
from storage.records import NO_DATE, Entry, ObjectIds, SaveDate, decode, get_mailbox
from storage.shard import Shard, uid_key

TEXT_FIELDS = {"from": ("f",), "to": ("t",), "cc": ("c",), "bcc": ("k",), "subject": ("s",), "body": ("b",),
               "text": ("h", "b")}
SYSTEM = {name.lower(): bit for name, bit in maildir.SYSTEM_FLAGS.items()}


def search(txn: lmdb.Transaction, shard: Shard, mailbox_id: int, query: tuple) -> list[int]:
    evaluation = _Evaluation(txn, shard, mailbox_id)
    return sorted(evaluation.eval(query, None))


class _Evaluation:
    """Evaluates a query; `within` None means every message. What a key needs is read on
    first use: UNSEEN needs only its own index, a text key only the UID list, a date or size
    key the fixed-size records."""

    def __init__(self, txn: lmdb.Transaction, shard: Shard, mailbox_id: int):
        self.txn, self.shard, self.mailbox_id = txn, shard, mailbox_id
        self._universe: set[int] | None = None
        self._entries: dict[int, Entry] | None = None
        self._unindexed: set[int] | None = None

    @property
    def universe(self) -> set[int]:
        if self._universe is None:
            self._universe = set(all_uids(self.txn, self.shard, self.mailbox_id))
        return self._universe

    @property
    def entries(self) -> dict[int, Entry]:
        if self._entries is None:
            self._entries = dict(entries(self.txn, self.shard, self.mailbox_id))
        return self._entries

    @property
    def unindexed(self) -> set[int]:
        """Messages the background indexer has not reached: found by their stored text alone."""
        if self._unindexed is None:
            upto = fts.indexed_upto(get_mailbox(self.txn, self.shard, self.mailbox_id))
            self._unindexed = {uid for uid in self.universe if uid > upto}
        return self._unindexed

    def eval(self, query: tuple, within: set[int] | None) -> set[int]:
        kind = query[0]
        if kind == "all":
            return set(self.universe if within is None else within)
        if kind == "and":
            result = within
            # Cheap keys first, so text keys confirm as few candidates as possible.
            for part in sorted(query[1], key=lambda q: q[0] in TEXT_FIELDS or q[0] == "header"):
                result = self.eval(part, result)
                if not result:
                    return set()
            return set(self.universe if result is None else result)
        if kind == "or":
            return self.eval(query[1], within) | self.eval(query[2], within)
        if kind == "not":
            return (self.universe if within is None else within) - self.eval(query[1], within)
        if kind == "flag" and query[1].lower() == "\\seen" and not query[2]:
            unseen = set(unseen_uids(self.txn, self.shard, self.mailbox_id))
            return unseen if within is None else unseen & within
        domain = self.universe if within is None else within
        if kind == "uid":
            spans = normalize_ranges(query[1])
            return {uid for uid in domain if any(low <= uid <= high for low, high in spans)}
        if kind == "flag":
            return self._flag(query[1], query[2], domain)
        if kind in ("before", "on", "since", "sentbefore", "senton", "sentsince"):
            return self._date(kind, query[1], domain)
        if kind in ("savedbefore", "savedon", "savedsince"):
            return self._saved(kind[5:], query[1], domain)
        if kind == "savedatesupported":
            return set(domain)  # RFC 8514 §4: every mailbox keeps save dates
        if kind == "larger":
            return {uid for uid in domain if self.entries[uid].size > query[1]}
        if kind == "smaller":
            return {uid for uid in domain if self.entries[uid].size < query[1]}
        if kind == "modseq":
            return {uid for uid in domain if self.entries[uid].modseq >= query[1]}
        if kind in TEXT_FIELDS:
            return self._text(TEXT_FIELDS[kind], query[1], domain)
        if kind == "header":
            return self._header(query[1], query[2], domain)
        if kind == "emailid":
            return {uid for uid in domain if self._email_id(uid) == query[1]}
        if kind == "threadid":
            return set()  # RFC 8474 §5.2: no message has a THREADID here
        raise SearchError(f"unknown search key {kind!r}")

    def _flag(self, name: str, present: bool, within: set[int]) -> set[int]:
        bit = SYSTEM.get(name.lower())
        if bit is not None:
            return {uid for uid in within if bool(self.entries[uid].bits & bit) == present}
        return {uid for uid in within if (name in self.entries[uid].keywords) == present}

    def _date(self, kind: str, date: datetime.date, within: set[int]) -> set[int]:
        day = (date - datetime.date(1970, 1, 1)).days
        sent = kind.startswith("sent")
        op = kind[4:] if sent else kind
        out = set()
        for uid in within:
            entry = self.entries[uid]
            seconds = entry.sent if sent else entry.internal_date
            if seconds == NO_DATE:
                continue  # no Date: header matches no SENT* key
            message_day = seconds // 86400
            if (op == "before" and message_day < day) or (op == "on" and message_day == day) or \
                    (op == "since" and message_day >= day):
                out.add(uid)
        return out

    def _text(self, fields: Iterable[str], needle: str, within: set[int]) -> set[int]:
        wanted = fts.normalize(needle)
        if not wanted:
            return set(within)  # the empty string is a substring of everything
        found: set[int] = set()
        for field in fields:
            candidates, exact = self._candidates(field, wanted)
            candidates &= within
            if exact:
                found |= candidates
                candidates = set()
            candidates |= self.unindexed & within
            candidates -= found
            found |= {uid for uid in candidates if wanted in self._texts(uid).get(field, "")}
        return found

    def _header(self, name: str, needle: str, within: set[int]) -> set[int]:
        field_name = fts.normalize(name).strip()
        wanted = fts.normalize(needle)
        if not field_name:
            raise SearchError("HEADER needs a field name")
        if fts.tokenize(wanted):
            candidates = (self._candidates("h", wanted)[0] | self.unindexed) & within
        else:
            candidates = set(within)
        out = set()
        for uid in candidates:
            for line in self._texts(uid).get("h", "").split("\n"):
                line_name, sep, value = line.partition(":")
                if sep and line_name.strip() == field_name and wanted in value:
                    out.add(uid)
                    break
        return out

    def _candidates(self, field: str, wanted: str) -> tuple[set[int], bool]:
        """(UIDs that may contain `wanted` in `field`, whether they surely all do)."""
        words = fts.tokenize(wanted)
        overflow = fts.overflow(self.txn, self.shard, self.mailbox_id)
        if not words:
            return set(self.universe), False  # only punctuation: every message is a candidate
        if any(len(word) > fts.MAX_TOKEN_CHARS for word in words):
            return set(self.universe), False  # longer than the index keeps a token: confirm all
        if len(words) == 1 and words[0] == wanted:
            # One word: a substring of some token, and then surely of the text.
            uids = set(overflow)
            for token in fts.tokens_containing(self.txn, self.shard, self.mailbox_id, field, wanted, "infix"):
                uids |= fts.postings(self.txn, self.shard, self.mailbox_id, field, token)
            return uids, not overflow
        result: set[int] | None = None
        last = len(words) - 1
        for i, word in enumerate(words):
            starts_whole = i > 0 or not wanted.startswith(word)
            ends_whole = i < last or not wanted.endswith(word)
            if starts_whole and ends_whole:
                uids = fts.postings(self.txn, self.shard, self.mailbox_id, field, word)
            elif starts_whole:
                uids = fts.postings(self.txn, self.shard, self.mailbox_id, field, word, prefix_match=True)
            else:
                mode = "suffix" if ends_whole else "infix"
                uids = set()
                for token in fts.tokens_containing(self.txn, self.shard, self.mailbox_id, field, word, mode):
                    uids |= fts.postings(self.txn, self.shard, self.mailbox_id, field, token)
            result = uids if result is None else result & uids
            if not result:
                break
        return (result or set()) | overflow, False

    def _saved(self, op: str, date: datetime.date, within: set[int]) -> set[int]:
        day = (date - datetime.date(1970, 1, 1)).days
        out = set()
        for uid in within:
            raw = self.txn.get(uid_key(self.mailbox_id, uid), db=self.shard.db["msgs"])
            if raw is None:
                continue
            saved_day = int(decode(raw, SaveDate).seconds // 86400)
            if (op == "before" and saved_day < day) or (op == "on" and saved_day == day) or \
                    (op == "since" and saved_day >= day):
                out.add(uid)
        return out

    def _email_id(self, uid: int) -> str:
        raw = self.txn.get(uid_key(self.mailbox_id, uid), db=self.shard.db["msgs"])
        if raw is None:
            return ""
        ids = decode(raw, ObjectIds)
        return objectid.email_id(ids.email_id, ids.base)

    def _texts(self, uid: int) -> dict[str, str]:
        return fts.texts(self.txn, self.shard, self.mailbox_id, uid) or {}
