"""SAVEDATE (RFC 8514), in process: FETCH SAVEDATE is when the message was saved into this
mailbox (APPEND, delivery, COPY, MOVE), not its internal date; SEARCH SAVEDBEFORE, SAVEDON,
SAVEDSINCE compare it by day, SAVEDATESUPPORTED matches every message; a record written
before save dates were kept answers with its internal date.
"""

from __future__ import annotations

import datetime
import re

import msgspec
import pytest

from imap_script import ScriptServer
from storage.records import MessageRecord, decode, encode
from storage.shard import uid_key

MESSAGE = b"From: a@example.test\r\nSubject: old\r\n\r\nAn old letter.\r\n"
OLD = '"01-Jan-2001 10:00:00 +0000"'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-savedate"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def today() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now.day}-{now:%b}-{now.year}"


def saved(imap, uid: int) -> str:
    line = imap.transact("ok", f"UID FETCH {uid} (SAVEDATE INTERNALDATE)").untagged[0]
    found = re.search(r'SAVEDATE "([^"]+)" INTERNALDATE "([^"]+)"', line)
    assert found, line
    return found.group(1)


def test_savedate_is_when_saved_and_searchable(server, user):
    imap = server.login(user)
    assert "SAVEDATE" in imap.transact("ok", "CAPABILITY").untagged[0].split()
    imap.transact("ok", b"APPEND INBOX () " + OLD.encode() + b" {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    server.deliver(user)
    imap.transact("ok", "SELECT INBOX")
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%d-%b-%Y")
    assert saved(imap, 1).startswith(day) and saved(imap, 2).startswith(day)
    assert imap.transact("ok", "FETCH 1 (INTERNALDATE)").untagged == [f"1 FETCH (INTERNALDATE {OLD})"]

    assert imap.transact("ok", f"SEARCH SAVEDON {today()}").untagged == ["SEARCH 1 2"]
    assert imap.transact("ok", f"SEARCH SAVEDSINCE {today()}").untagged == ["SEARCH 1 2"]
    assert imap.transact("ok", f"SEARCH SAVEDBEFORE {today()}").untagged == ["SEARCH"]
    assert imap.transact("ok", "SEARCH BEFORE 1-Feb-2001").untagged == ["SEARCH 1"]  # internal date, still
    assert imap.transact("ok", "SEARCH SAVEDATESUPPORTED").untagged == ["SEARCH 1 2"]
    assert imap.transact("ok", "SEARCH NOT SAVEDATESUPPORTED").untagged == ["SEARCH"]
    imap.transact("bad", "SEARCH SAVEDON yesterday")


def test_an_old_record_answers_its_internal_date_and_a_copy_is_saved_anew(server, user):
    imap = server.login(user)
    imap.transact("ok", b"APPEND INBOX () " + OLD.encode() + b" {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    # The record as an index written before SAVEDATE holds it: no "sv".
    store = server.store
    shard = store.shard(user)
    uidvalidity = store.mailbox(user, "INBOX").uidvalidity

    def forget_save_date(txn, batch):
        record = decode(txn.get(uid_key(uidvalidity, 1), db=shard.db["msgs"]), MessageRecord)
        txn.put(uid_key(uidvalidity, 1), encode(msgspec.structs.replace(record, saved=None)), db=shard.db["msgs"])

    shard.write(forget_save_date)
    imap.transact("ok", "SELECT INBOX")
    assert saved(imap, 1) == OLD.strip('"')
    assert imap.transact("ok", "SEARCH SAVEDBEFORE 2-Jan-2001").untagged == ["SEARCH 1"]

    imap.transact("ok", "COPY 1 Archive")
    imap.transact("ok", "SELECT Archive")
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%d-%b-%Y")
    assert saved(imap, 1).startswith(day)
    assert imap.transact("ok", f"SEARCH SAVEDON {today()}").untagged == ["SEARCH 1"]
