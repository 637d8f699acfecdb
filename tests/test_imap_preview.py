"""PREVIEW (RFC 8970), in process: FETCH PREVIEW is at most 256 characters of the first text
part, white space run together, HTML as a reader sees it, made at delivery; a record from
before previews were kept gets one made on the first FETCH PREVIEW and kept, or NIL for
PREVIEW (LAZY), which has it made in the background for the next FETCH.
"""

from __future__ import annotations

import time

import msgspec
import pytest

from imap_script import ScriptServer
from storage.mime import PREVIEW_CHARS, make_preview, parse_message
from storage.records import MessageRecord, decode, encode
from storage.shard import uid_key

ALTERNATIVE = (
    b"From: a@example.test\r\nSubject: alt\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n"
    b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Gr=C3=BC=C3=9Fe   aus\r\n\r\nK=C3=B6ln.\r\n"
    b"--b2\r\nContent-Type: text/html\r\n\r\n<p>Gr&uuml;&szlig;e</p>\r\n--b2--\r\n"
    b"--b1\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nnot this\r\n--b1--\r\n")
HTML_ONLY = (b"From: a@example.test\r\nSubject: html\r\nContent-Type: text/html\r\n\r\n"
             b"<html><head><style>p {color: red}</style></head><body><p>Hello <b>there</b></p><p>friend</p>"
             b"</body></html>\r\n")
ATTACHMENT_ONLY = (b"From: a@example.test\r\nSubject: pdf\r\nContent-Type: application/pdf\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-preview"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def append(imap, raw: bytes) -> None:
    imap.transact("ok", b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)


def forget_preview(server, user, uid: int) -> None:
    """The record as an index written before previews were kept holds it: no "pv"."""
    shard = server.store.shard(user)
    uidvalidity = server.store.mailbox(user, "INBOX").uidvalidity

    def forget(txn, batch):
        record = decode(txn.get(uid_key(uidvalidity, uid), db=shard.db["msgs"]), MessageRecord)
        txn.put(uid_key(uidvalidity, uid), encode(msgspec.structs.replace(record, preview=None)), db=shard.db["msgs"])

    shard.write(forget)


def stored_preview(server, user, uid: int) -> str | None:
    shard = server.store.shard(user)
    uidvalidity = server.store.mailbox(user, "INBOX").uidvalidity
    with shard.read() as txn:
        return decode(txn.get(uid_key(uidvalidity, uid), db=shard.db["msgs"]), MessageRecord).preview


def test_preview_of_the_first_text_part(server, user):
    server.deliver(user, body="Hello there.\n\n  How   are you?")
    imap = server.login(user)
    assert "PREVIEW" in imap.transact("ok", "CAPABILITY").untagged[0].split()
    for raw in (ALTERNATIVE, HTML_ONLY, ATTACHMENT_ONLY):
        append(imap, raw)
    server.deliver(user, body="word " * 200)
    imap.transact("ok", "SELECT INBOX")
    reply = imap.transact("ok", "FETCH 1:5 (PREVIEW)")
    assert reply.untagged[0] == '1 FETCH (PREVIEW "Hello there. How are you?")'
    # Not ASCII: a literal of UTF-8 (RFC 8970 §3: the preview is UTF-8 text)
    expected = "Grüße aus Köln.".encode()
    assert b"* 2 FETCH (PREVIEW {%d}\r\n" % len(expected) + expected + b")\r\n" in reply.raw
    assert reply.untagged[2] == '3 FETCH (PREVIEW "Hello there friend")'
    assert reply.untagged[3] == '4 FETCH (PREVIEW "")'  # no text part: nothing to show
    long = reply.untagged[4][len('5 FETCH (PREVIEW "'):-2]
    assert len(long) == PREVIEW_CHARS and long == ("word " * 200)[:PREVIEW_CHARS]
    # PREVIEW sets no \Seen, and LAZY answers at once what delivery made
    assert imap.transact("ok", "FETCH 1 (PREVIEW (LAZY) FLAGS)").untagged == [
        '1 FETCH (PREVIEW "Hello there. How are you?" FLAGS (\\Recent))']
    imap.transact("bad", "FETCH 1 (PREVIEW (SOON))")
    imap.transact("bad", "FETCH 1 (PREVIEW ())")


def test_a_record_without_a_preview_gets_one_made_and_kept(server, user):
    server.deliver(user, body="First one.")
    server.deliver(user, body="Second one.")
    forget_preview(server, user, 1)
    forget_preview(server, user, 2)
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    assert imap.transact("ok", "FETCH 1 (PREVIEW)").untagged == ['1 FETCH (PREVIEW "First one.")']
    # LAZY does not wait for it: NIL now, made in the background for the next FETCH
    assert imap.transact("ok", "FETCH 2 (PREVIEW (LAZY))").untagged == ["2 FETCH (PREVIEW NIL)"]
    deadline = time.monotonic() + 5
    while (stored_preview(server, user, 1), stored_preview(server, user, 2)) != ("First one.", "Second one."):
        assert time.monotonic() < deadline, "previews were not kept"
        imap.transact("ok", "NOOP")  # runs the loop the background work reports to
        time.sleep(0.02)
    assert imap.transact("ok", "FETCH 2 (PREVIEW (LAZY))").untagged == ['2 FETCH (PREVIEW "Second one.")']


def test_make_preview_is_bounded():
    assert make_preview("  a\r\n\tb  ") == "a b"
    assert make_preview("x" * 10_000_000) == "x" * PREVIEW_CHARS
    assert parse_message(ATTACHMENT_ONLY).preview == ""


def test_make_preview_reads_no_more_than_it_needs_and_says_the_same():
    """make_preview looks at a growing window: the same preview as running together the
    whole PREVIEW_SCAN, wherever the window ends (mid-word, in white space, short texts)."""
    import random

    from storage.mime import PREVIEW_SCAN

    rng = random.Random(17)
    words = ["a", "bb", "word", "x" * 300, "\u00e9t\u00e9", "longer-word"]
    spaces = [" ", "  ", "\r\n", "\t", "\r\n\r\n" * 200, " " * 3000]
    for _ in range(300):
        text = "".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randrange(0, 400)))
        assert make_preview(text) == " ".join(text[:PREVIEW_SCAN].split())[:PREVIEW_CHARS]
