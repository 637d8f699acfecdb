"""METADATA (RFC 5464), in process (tests/imap_script.py): GETMETADATA with MAXSIZE and
DEPTH, SETMETADATA all or nothing, server and mailbox entries, /private and /shared, the
limits and their response codes, and annotations that follow a rename, go with a delete
and are copied by RENAME INBOX. The store's side is checked through IMAP only."""

from __future__ import annotations

import pytest

from imap_script import ScriptServer
from storage import METADATA_MAX_VALUE


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-metadata"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


def test_metadata_is_advertised_after_login(server, user):
    imap = server.connect()
    assert "METADATA" not in imap.transact("ok", "CAPABILITY").untagged[0].split()
    imap = server.login(user)
    assert "METADATA" in imap.transact("ok", "CAPABILITY").untagged[0].split()


def test_server_and_mailbox_entries_private_and_shared(server, user):
    imap = server.login(user)
    imap.transact("ok", 'SETMETADATA "" (/shared/comment "server note" /private/vendor/vendor.x/a "p")')
    imap.transact("ok", 'SETMETADATA INBOX (/private/comment "mine" /shared/comment "ours")')
    assert imap.transact("ok", 'GETMETADATA "" /shared/comment').untagged == [
        'METADATA "" (/shared/comment "server note")']
    reply = imap.transact("ok", "GETMETADATA INBOX (/shared/comment /private/comment)")
    assert reply.untagged == ['METADATA INBOX (/shared/comment "ours" /private/comment "mine")']
    # Entry names are case-insensitive (RFC 5464 §3.2); an entry without a value is left out.
    assert imap.transact("ok", "GETMETADATA INBOX /PRIVATE/Comment").untagged == [
        'METADATA INBOX (/private/comment "mine")']
    assert imap.transact("ok", "GETMETADATA Sent /private/comment").untagged == []
    # NIL removes.
    imap.transact("ok", "SETMETADATA INBOX (/private/comment NIL)")
    assert imap.transact("ok", "GETMETADATA INBOX /private/comment").untagged == []


def test_a_value_with_line_breaks_comes_back_as_a_literal(server, user):
    imap = server.login(user)
    value = b"two\r\nlines"
    imap.transact("ok", b"SETMETADATA INBOX (/private/comment " + literal(value) + b")")
    reply = imap.transact("ok", "GETMETADATA INBOX /private/comment")
    assert reply.raw.startswith(b"* METADATA INBOX (/private/comment {10}\r\ntwo\r\nlines)\r\n")


def test_depth_and_maxsize(server, user):
    imap = server.login(user)
    imap.transact("ok", 'SETMETADATA INBOX (/private/f "top" /private/f/a "1" /private/f/b "22" '
                        '/private/f/a/deep "333" /private/fx "not below")')
    assert imap.transact("ok", "GETMETADATA INBOX /private/f").untagged == ['METADATA INBOX (/private/f "top")']
    depth1 = imap.transact("ok", "GETMETADATA (DEPTH 1) INBOX /private/f").untagged
    assert depth1 == ['METADATA INBOX (/private/f "top" /private/f/a "1" /private/f/b "22")']
    deep = imap.transact("ok", "GETMETADATA (DEPTH infinity) INBOX (/private/f)").untagged
    assert deep == ['METADATA INBOX (/private/f "top" /private/f/a "1" /private/f/a/deep "333" /private/f/b "22")']
    # MAXSIZE leaves out the longer values and names the longest (RFC 5464 §4.2.1); the
    # options are taken after the mailbox too, as the RFC's examples write them.
    reply = imap.transact("ok", "GETMETADATA INBOX (MAXSIZE 2 DEPTH infinity) /private/f")
    assert reply.untagged == ['METADATA INBOX (/private/f/a "1" /private/f/b "22")']
    assert reply.code == "METADATA LONGENTRIES 3"


def test_invalid_entry_names_and_options_are_bad(server, user):
    imap = server.login(user)
    for command in ('SETMETADATA INBOX (/other/x "v")', 'SETMETADATA INBOX (/private/a* "v")',
                    'SETMETADATA INBOX (/private/ "v")', 'SETMETADATA INBOX (/private//a "v")',
                    "GETMETADATA INBOX /private", "GETMETADATA (DEPTH 2) INBOX /private/a",
                    "GETMETADATA (COLOR red) INBOX /private/a"):
        imap.transact("bad", command)
    # Bounded: no more names in one command than an account may hold.
    many = " ".join(f"/private/x{i}" for i in range(1001))
    assert imap.transact("bad", f"GETMETADATA INBOX ({many})").code == "LIMIT"
    pairs = " ".join(f'/private/x{i} "v"' for i in range(1001))
    assert imap.transact("bad", f"SETMETADATA INBOX ({pairs})").code == "LIMIT"


def test_limits_answer_maxsize_and_toomany_and_change_nothing(server, user):
    imap = server.login(user)
    big = b"x" * (METADATA_MAX_VALUE + 1)
    reply = imap.transact("no", b"SETMETADATA INBOX (/private/a \"small\" /private/b " + literal(big) + b")")
    assert reply.code == f"METADATA MAXSIZE {METADATA_MAX_VALUE}"
    assert imap.transact("ok", "GETMETADATA INBOX /private/a").untagged == []  # all or nothing
    # The account's count of entries: 1000 (storage/metadata.py MAX_ENTRIES).
    for start in range(0, 1000, 250):
        pairs = " ".join(f'/private/n/{i} "v"' for i in range(start, start + 250))
        imap.transact("ok", f"SETMETADATA INBOX ({pairs})")
    reply = imap.transact("no", 'SETMETADATA Sent (/shared/comment "one too many")')
    assert reply.code == "METADATA TOOMANY"
    imap.transact("ok", 'SETMETADATA INBOX (/private/n/1 "replacing is fine")')
    imap.transact("ok", "SETMETADATA INBOX (/private/n/2 NIL)")
    imap.transact("ok", 'SETMETADATA Sent (/shared/comment "room again")')


def test_shared_admin_is_read_only_and_a_missing_mailbox_is_no(server, user):
    imap = server.login(user)
    imap.transact("no", 'SETMETADATA "" (/shared/admin "mailto:x@example.org")')
    assert imap.transact("no", "GETMETADATA Nowhere /private/comment").code == "NONEXISTENT"
    assert imap.transact("no", 'SETMETADATA Nowhere (/private/comment "x")').code == "NONEXISTENT"


def test_annotations_follow_a_rename_and_go_with_a_delete(server, user):
    imap = server.login(user)
    imap.transact("ok", "CREATE Box/Child")
    imap.transact("ok", 'SETMETADATA Box/Child (/private/comment "child")')
    imap.transact("ok", "RENAME Box Moved")
    assert imap.transact("ok", "GETMETADATA Moved/Child /private/comment").untagged == [
        'METADATA Moved/Child (/private/comment "child")']
    imap.transact("ok", "DELETE Moved/Child")
    imap.transact("ok", "CREATE Moved/Child")
    assert imap.transact("ok", "GETMETADATA Moved/Child /private/comment").untagged == []


def test_rename_inbox_copies_its_annotations(server, user):
    imap = server.login(user)
    imap.transact("ok", 'SETMETADATA INBOX (/private/comment "inbox note")')
    imap.transact("ok", "RENAME INBOX Old")
    for name in ("INBOX", "Old"):
        assert imap.transact("ok", f"GETMETADATA {name} /private/comment").untagged == [
            f'METADATA {name} (/private/comment "inbox note")']
