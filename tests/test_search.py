"""SEARCH from the index: every key, IMAP substring semantics, decoded bodies."""

from __future__ import annotations

import base64
import datetime

import pytest

from storage import open_data_dir
from storage.search import SearchError
from storage.store import Store

ALICE = "alice@example.test"
DAY = datetime.date


def mail(subject: str, body: str, *, sender: str = "Bob Builder <bob@example.org>", to: str = ALICE,
         date: str = "Mon, 23 Nov 2026 10:00:00 +0000", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n{extra}"
            f"Message-ID: <{abs(hash(subject))}@example.org>\r\n\r\n{body}\r\n").encode()


QP_HTML = (
    "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    "--B\r\nContent-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    "<p>Caf=E9 <b>cr=E8me</b> br=FBl=E9e</p><script>hiddenscriptword()</script>\r\n"
    "--B\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=x.bin\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"attachmentsecret " * 4).decode() + "\r\n"
    "--B\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.b64encode("Grüße aus Köln, zebra-crossing".encode()).decode() + "\r\n--B--\r\n"
)


@pytest.fixture(params=["unindexed", "indexed"])
def store(data_dir, request):
    """Every test runs twice: before the background indexer has run (answers come from the
    stored text alone) and after it indexed everything (answers come from posting lists)."""
    with Store(open_data_dir(data_dir, 2)) as s:
        shard = s.shard(ALICE)
        indexer = shard.idle_work
        shard.idle_work = None
        deliveries = [
            (mail("Quarterly report", "The numbers look great this quarter."), 1_790_000_000),  # 2026-09-21
            (mail("Lunch?", "Shall we meet at noon", sender="carol@example.net", to="team@example.test"),
             1_795_000_000),
            (mail("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "", extra=QP_HTML.split("\r\n\r\n", 1)[0] + "\r\n")
             .replace(b"\r\n\r\n\r\n", b"\r\n\r\n" + QP_HTML.split("\r\n\r\n", 1)[1].encode()), 1_795_400_000),
            (mail("Re: Quarterly report", "Numbers? hello world, e-mail me", date="Tue, 01 Sep 2026 23:30:00 -0500",
                  extra="X-Priority: 1 (Highest)\r\nCc: dave@example.com\r\n"), 1_795_500_000),
        ]
        for raw, when in deliveries:
            s.deliver([ALICE], raw, internal_date=when)
        if request.param == "indexed":
            shard.idle_work = indexer
            s.build_index(ALICE)
        assert s.index_backlog(ALICE, "INBOX") == (0 if request.param == "indexed" else 4)
        yield s


def find(store: Store, *query) -> list[int]:
    return store.search(ALICE, "INBOX", query if len(query) > 1 or not isinstance(query[0], tuple) else query[0])


def test_text_keys_are_case_insensitive_substrings(store):
    assert find(store, "subject", "quarterly") == [1, 4]
    assert find(store, "subject", "ARTERL") == [1, 4]  # inside a word
    assert find(store, "subject", "re: quart") == [4]  # across words, punctuation included
    assert find(store, "subject", "report re") == []
    assert find(store, "body", "numbers") == [1, 4]
    assert find(store, "body", "look great th") == [1]
    assert find(store, "body", "e-mail") == [4]
    assert find(store, "body", "email") == []
    assert find(store, "from", "builder") == [1, 3, 4]
    assert find(store, "from", "carol@example") == [2]
    assert find(store, "to", "team@") == [2]
    assert find(store, "cc", "dave") == [4]
    assert find(store, "bcc", "anyone") == []
    assert find(store, "text", "noon") == [2]  # body
    assert find(store, "text", "carol") == [2]  # header
    assert find(store, "subject", "") == [1, 2, 3, 4]


def test_bodies_are_decoded_and_attachments_skipped(store):
    assert find(store, "body", "crème brûlée") == [3]  # quoted-printable, latin-1, HTML stripped
    assert find(store, "body", "CAFÉ") == [3]
    assert find(store, "body", "grüße aus köln") == [3]  # base64 UTF-8
    assert find(store, "body", "zebra-cross") == [3]
    assert find(store, "subject", "grüße") == [3]  # RFC 2047 subject
    assert find(store, "body", "attachmentsecret") == []
    assert find(store, "body", "hiddenscriptword") == []
    assert find(store, "body", "<b>") == []


def test_header_key(store):
    assert find(store, "header", "X-Priority", "highest") == [4]
    assert find(store, "header", "x-priority", "") == [4]  # the field exists
    assert find(store, "header", "Message-ID", "@example.org") == [1, 2, 3, 4]
    assert find(store, "header", "Subject", "lunch") == [2]
    with pytest.raises(SearchError):
        find(store, "header", "", "x")


def test_dates_and_sizes(store):
    assert find(store, "before", DAY(2026, 11, 19)) == [1, 2]  # internal dates 2026-09-21, 11-18, 11-23, 11-24
    assert find(store, "on", DAY(2026, 11, 18)) == [2]
    assert find(store, "on", DAY(2026, 11, 17)) == []
    assert find(store, "since", DAY(2026, 11, 22)) == [3, 4]
    # Date: Tue, 01 Sep 2026 23:30 -0500: its own day counts, not the UTC one (RFC 3501 6.4.4).
    assert find(store, "senton", DAY(2026, 9, 1)) == [4]
    assert find(store, "senton", DAY(2026, 9, 2)) == []
    assert find(store, "sentbefore", DAY(2026, 11, 1)) == [4]
    assert find(store, "sentsince", DAY(2026, 11, 23)) == [1, 2, 3]
    sizes = {i.uid: i.size for i in store.fetch(ALICE, "INBOX", [(1, 4)])}
    assert find(store, "larger", sizes[1]) == [uid for uid, size in sizes.items() if size > sizes[1]]
    assert find(store, "smaller", sizes[1]) == [uid for uid, size in sizes.items() if size < sizes[1]]


def test_flags_keywords_and_logic(store):
    store.store_flags(ALICE, "INBOX", [(1, 2)], "add", ["\\Seen"])
    store.store_flags(ALICE, "INBOX", [(2, 2)], "add", ["\\Flagged", "$Work"])
    assert find(store, "flag", "\\Seen", False) == [3, 4]  # UNSEEN
    assert find(store, "flag", "\\seen", True) == [1, 2]
    assert find(store, "flag", "\\Flagged", True) == [2]
    assert find(store, "flag", "$Work", True) == [2]
    assert find(store, "flag", "$Work", False) == [1, 3, 4]
    assert find(store, "and", [("flag", "\\Seen", False), ("subject", "report")]) == [4]
    assert find(store, "or", ("subject", "lunch"), ("cc", "dave")) == [2, 4]
    assert find(store, "not", ("subject", "report")) == [2, 3]
    assert find(store, "uid", [(2, 3)]) == [2, 3]
    assert find(store, "and", [("uid", [(1, 3)]), ("not", ("flag", "\\Seen", True))]) == [3]
    modseq = store.mailbox(ALICE, "INBOX").highestmodseq
    store.store_flags(ALICE, "INBOX", [(4, 4)], "add", ["\\Answered"])
    assert find(store, "modseq", modseq + 1) == [4]
    with pytest.raises(SearchError):
        find(store, "bogus", 1)


def test_expunged_messages_vanish_and_copies_are_searchable(store):
    store.store_flags(ALICE, "INBOX", [(1, 1)], "add", ["\\Deleted"])
    store.expunge(ALICE, "INBOX")
    assert find(store, "body", "numbers") == [4]
    store.copy(ALICE, "INBOX", [(2, 2)], "Archive")
    store.move(ALICE, "INBOX", [(3, 3)], "Archive")
    assert store.search(ALICE, "Archive", ("body", "noon")) == [1]
    assert store.search(ALICE, "Archive", ("body", "köln")) == [2]
    assert find(store, "body", "köln") == []


def test_search_survives_rebuild(store, data_dir):
    from storage.check import rebuild

    rebuild(store, ALICE)
    assert find(store, "body", "crème brûlée") == [3]
    assert find(store, "subject", "quarterly") == [1, 4]


def test_words_inside_very_long_tokens_are_found(data_dir):
    from storage import fts

    with Store(open_data_dir(data_dir, 2)) as s:
        long_token = "a" * (fts.MAX_TOKEN_CHARS + 10) + "needle"
        s.deliver([ALICE], mail("long", f"{long_token} world"))
        s.deliver([ALICE], mail("plain", "needle here"))
        s.deliver([ALICE], mail("none", "nothing"))
        for _ in range(2):  # before the indexer ran, and after
            assert s.search(ALICE, "INBOX", ("body", "needle")) == [1, 2]
            assert s.search(ALICE, "INBOX", ("body", "needle world")) == [1]
            assert s.search(ALICE, "INBOX", ("not", ("body", "needle"))) == [3]
            s.build_index(ALICE)
