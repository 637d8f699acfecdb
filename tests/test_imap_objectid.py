"""OBJECTID (RFC 8474), in process: MAILBOXID in CREATE, SELECT and STATUS, kept by a rename
and new for a mailbox made again; EMAILID in FETCH, the same after COPY and MOVE, found by
SEARCH EMAILID; THREADID NIL (threads are not kept, §5.2).
"""

from __future__ import annotations

import re

import pytest

from imap_script import ScriptServer

OBJECTID = re.compile(r"[A-Za-z0-9_-]{1,255}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-objectid"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def status_id(imap, name: str) -> str:
    line = imap.transact("ok", f"STATUS {name} (MAILBOXID MESSAGES)").untagged[0]
    found = re.fullmatch(rf'STATUS "?{name}"? \(MAILBOXID \(([^)]*)\) MESSAGES \d+\)', line)
    assert found, line
    return found.group(1)


def email_ids(imap, command: str) -> dict[int, str]:
    out = {}
    for line in imap.transact("ok", command).untagged:
        found = re.search(r"UID (\d+) .*EMAILID \(([^)]*)\)", line)
        if found:
            out[int(found.group(1))] = found.group(2)
    return out


def test_mailboxid_in_create_select_status_and_across_rename(server, user):
    imap = server.login(user)
    assert "OBJECTID" in imap.transact("ok", "CAPABILITY").untagged[0].split()
    created = imap.transact("ok", "CREATE Projects")
    assert created.code and created.code.startswith("MAILBOXID (")
    mailbox_id = created.code[len("MAILBOXID ("):-1]
    assert OBJECTID.fullmatch(mailbox_id)
    assert status_id(imap, "Projects") == mailbox_id
    assert f"OK [MAILBOXID ({mailbox_id})] mailbox id" in imap.transact("ok", "EXAMINE Projects").untagged
    imap.transact("ok", "UNSELECT")

    imap.transact("ok", "RENAME Projects Work")
    assert status_id(imap, "Work") == mailbox_id  # §4.1: a rename keeps it
    imap.transact("ok", "DELETE Work")
    again = imap.transact("ok", "CREATE Work").code
    assert again != f"MAILBOXID ({mailbox_id})"  # a new mailbox, a new id
    assert status_id(imap, "INBOX") not in (mailbox_id, again)
    # LIST-STATUS carries it too
    listed = imap.transact("ok", 'LIST "" INBOX RETURN (STATUS (MAILBOXID))').untagged
    assert f"STATUS INBOX (MAILBOXID ({status_id(imap, 'INBOX')}))" in listed


def test_emailid_survives_copy_and_move_and_threadid_is_nil(server, user):
    for i in range(3):
        server.deliver(user, subject=f"m{i}")
    imap = server.login(user)
    imap.transact("ok", "SELECT INBOX")
    ids = email_ids(imap, "UID FETCH 1:* (EMAILID)")
    assert len(set(ids.values())) == 3 and all(OBJECTID.fullmatch(v) for v in ids.values())
    assert imap.transact("ok", "FETCH 1 (THREADID EMAILID)").untagged == [f"1 FETCH (THREADID NIL EMAILID ({ids[1]}))"]

    imap.transact("ok", "UID COPY 1 Archive")
    imap.transact("ok", "UID MOVE 2 Archive")
    imap.transact("ok", "SELECT Archive")
    copied = email_ids(imap, "UID FETCH 1:* (EMAILID)")
    assert sorted(copied.values()) == sorted([ids[1], ids[2]])
    # SEARCH EMAILID finds the copy; THREADID finds nothing, as no thread is kept.
    assert imap.transact("ok", f"UID SEARCH EMAILID {ids[2]}").untagged == ["SEARCH 2"]
    assert imap.transact("ok", "SEARCH THREADID T123").untagged == ["SEARCH"]
    # A message appended again is another message: another EMAILID (§5.1).
    imap.transact("ok", "SELECT INBOX")
    fetched = imap.transact("ok", "UID FETCH 3 (BODY.PEEK[])").raw
    body = fetched[fetched.index(b"}\r\n") + 3:fetched.rindex(b")\r\n")]
    appended = imap.transact("ok", b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    uid = int(appended.code.split()[-1])
    assert email_ids(imap, f"UID FETCH {uid} (EMAILID)")[uid] != ids[3]
