"""QRESYNC (RFC 7162 §3.2), in process: ENABLE, SELECT/EXAMINE (QRESYNC ...) with known UIDs
and sequence match data, UID FETCH ... (CHANGEDSINCE m VANISHED), VANISHED instead of
EXPUNGE, and the bounded expunge history (storage/vanished.py) with what is answered once
it forgot how far back a client asks.
"""

from __future__ import annotations

import re
import time

import pytest

from imap_script import ScriptServer
from imapd import qresync
from imapd.syntax import SequenceSet
from storage import vanished
from storage.check import rebuild
from storage.records import MailboxRecord, decode, encode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ScriptServer(tmp_path_factory.mktemp("imap-qresync"))
    yield running
    running.close()


@pytest.fixture
def user(server) -> str:
    return server.user()


def qresync_session(server, user):
    imap = server.login(user)
    assert imap.transact("ok", "ENABLE QRESYNC").untagged == ["ENABLED QRESYNC"]
    return imap


def state(server, user, name="INBOX"):
    mailbox = server.store.mailbox(user, name)
    return mailbox.uidvalidity, mailbox.highestmodseq


def expunge_uids(server, user, *uids):
    server.store.store_flags(user, "INBOX", [(u, u) for u in uids], "add", ["\\Deleted"])
    server.store.expunge(user, "INBOX")


def test_qresync_is_offered_and_select_parameters_need_enable(server, user):
    imap = server.login(user)
    assert "QRESYNC" in imap.transact("ok", "CAPABILITY").untagged[0].split()
    uidvalidity, modseq = state(server, user)
    assert imap.transact("bad", f"SELECT INBOX (QRESYNC ({uidvalidity} {modseq}))")
    assert imap.session.view is None  # a BAD SELECT closes nothing and opens nothing
    imap.transact("ok", "SELECT INBOX")
    imap.transact("bad", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    assert imap.transact("ok", "ENABLE QRESYNC CONDSTORE").untagged == ["ENABLED QRESYNC CONDSTORE"]


def test_select_qresync_reports_what_vanished_and_changed_since(server, user):
    for i in range(6):
        server.deliver(user, subject=f"m{i}")
    uidvalidity, modseq = state(server, user)
    server.store.store_flags(user, "INBOX", [(2, 2)], "add", ["\\Flagged"])
    expunge_uids(server, user, 3, 4)
    server.store.store_flags(user, "INBOX", [(6, 6)], "add", ["\\Answered"])

    imap = qresync_session(server, user)
    reply = imap.transact("ok", f"SELECT INBOX (QRESYNC ({uidvalidity} {modseq}))")
    assert "4 EXISTS" in reply.untagged
    assert f"OK [HIGHESTMODSEQ {state(server, user)[1]}] modseq" in reply.untagged
    vanished_at = reply.untagged.index("VANISHED (EARLIER) 3:4")
    fetches = [line for line in reply.untagged if " FETCH " in line]
    assert len(fetches) == 2 and all(reply.untagged.index(f) > vanished_at for f in fetches)
    # (\Recent too: this is the first SELECT since the mail came, storage/recent.py)
    assert re.fullmatch(r"2 FETCH \(UID 2 FLAGS \(\\Flagged( \\Recent)?\) MODSEQ \(\d+\)\)", fetches[0])
    assert re.fullmatch(r"4 FETCH \(UID 6 FLAGS \(\\Answered( \\Recent)?\) MODSEQ \(\d+\)\)", fetches[1])

    # Known UIDs narrow both: only 4 of the vanished, only UID 6 of the changed.
    again = qresync_session(server, user)
    reply = again.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {modseq} 1,4:6))")
    assert [line for line in reply.untagged if "VANISHED" in line or "FETCH" in line] == [
        line for line in reply.untagged if line == "VANISHED (EARLIER) 4" or line.startswith("4 FETCH (UID 6 ")]
    assert len([line for line in reply.untagged if "VANISHED" in line or "FETCH" in line]) == 2

    # Another UIDVALIDITY: a plain SELECT, nothing to resync.
    reply = again.transact("ok", f"SELECT INBOX (QRESYNC ({uidvalidity + 1} {modseq}))")
    assert reply.untagged[0] == "OK [CLOSED] previous mailbox closed"
    assert not [line for line in reply.untagged if "VANISHED" in line or "FETCH" in line]


def test_uid_fetch_vanished_and_vanished_instead_of_expunge(server, user):
    for i in range(5):
        server.deliver(user, subject=f"m{i}")
    uidvalidity, modseq = state(server, user)
    first, second = qresync_session(server, user), qresync_session(server, user)
    first.transact("ok", "SELECT INBOX")
    second.transact("ok", "SELECT INBOX")
    first.transact("ok", "STORE 1,2 +FLAGS.SILENT (\\Deleted)")
    reply = first.transact("ok", "EXPUNGE")
    assert reply.untagged == ["VANISHED 1:2"]
    assert reply.code == f"HIGHESTMODSEQ {state(server, user)[1]}"

    # The other session hears VANISHED after its next command, never EXPUNGE.
    reply = second.transact("ok", "NOOP")
    assert reply.untagged == ["VANISHED 1:2"]
    assert second.session.view.exists == 3

    reply = second.transact("ok", f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)")
    assert reply.untagged[0] == "VANISHED (EARLIER) 1:2"
    assert not [line for line in reply.untagged if " FETCH " in line]  # no flags changed since
    # RFC 7162 §3.2.6: only UIDs of the set asked for.
    assert second.transact("ok", f"UID FETCH 2:4 (FLAGS) (CHANGEDSINCE {modseq} VANISHED)").untagged[0] == \
        "VANISHED (EARLIER) 2"
    # MOVE (RFC 6851 §4.2) announces what left with VANISHED too
    reply = second.transact("ok", "UID MOVE 3 Archive")
    assert reply.untagged[-1] == "VANISHED 3" and not reply.named("EXPUNGE")
    assert first.transact("ok", "NOOP").untagged == ["VANISHED 3"]


def test_withheld_expunges_lower_the_highestmodseq_a_client_keeps(server, user):
    for i in range(3):
        server.deliver(user, subject=f"m{i}")
    imap = qresync_session(server, user)
    imap.transact("ok", "SELECT INBOX")
    told = imap.session.view.modseq
    expunge_uids(server, user, 1)
    server.store.store_flags(user, "INBOX", [(2, 2)], "add", ["\\Flagged"])
    # FETCH may not announce the expunge (RFC 3501 §7.4.1), but shows a MODSEQ above it: the
    # HIGHESTMODSEQ the client is left with must be below the expunge's (RFC 7162 §3.2).
    reply = imap.transact("ok", "FETCH 2 (MODSEQ)")
    assert not [line for line in reply.untagged if "VANISHED" in line]
    assert reply.untagged[-1] == f"OK [HIGHESTMODSEQ {told}] expunges are still to be told"
    modseqs = [int(m) for m in re.findall(r"MODSEQ \((\d+)\)", " ".join(reply.untagged))]
    assert modseqs and min(modseqs) > told
    reply = imap.transact("ok", "NOOP")
    assert reply.untagged == ["VANISHED 1"]


def test_the_expunge_history_is_bounded_and_answers_beyond_it(server, user, monkeypatch):
    monkeypatch.setattr(vanished, "MAX_HISTORY", 3)
    for i in range(10):
        server.deliver(user, subject=f"m{i}")
    uidvalidity, modseq = state(server, user)
    watcher = server.login(user)
    watcher.transact("ok", "SELECT INBOX")  # its view is at `modseq`, about to be forgotten
    for uid in (2, 3, 5, 7, 8):
        expunge_uids(server, user, uid)
    shard = server.store.shard(user)
    with shard.read() as txn:
        keys = [key for key in txn.cursor(db=shard.db["expunged"]).iternext(values=False)
                if int.from_bytes(key[:4], "big") == uidvalidity]
        record = decode(txn.get(uidvalidity.to_bytes(4, "big"), db=shard.db["mailboxes"]), MailboxRecord)
    assert len(keys) == 3 and record.expunged_count == 3 and record.expunged_floor > modseq

    # A client from before the floor: what it may know and the mailbox lacks.
    imap = qresync_session(server, user)
    reply = imap.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {modseq}))")
    assert "VANISHED (EARLIER) 2:3,5,7:8" in reply.untagged
    # Sequence match data (RFC 7162 §3.2.5.2): number 1 is still UID 1, but 2 is UID 4 now,
    # so only the first pair matches and everything above UID 1 is reported.
    reply = imap.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {modseq} 1:10 (1,2 1,2)))")
    assert "VANISHED (EARLIER) 2:3,5,7:8" in reply.untagged
    # A client that knew 1,4,6 at numbers 1-3 (as now): nothing up to 6 vanished unseen.
    reply = imap.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {modseq} 1:10 (1:3 1,4,6)))")
    assert "VANISHED (EARLIER) 7:8" in reply.untagged
    # Within the history, exact as ever.
    _, recent = state(server, user)
    imap.transact("ok", "UNSELECT")
    assert not [line for line in imap.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {recent}))").untagged
                if "VANISHED" in line]
    # UID FETCH ... VANISHED from before the floor.
    assert imap.transact("ok", f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {modseq} VANISHED)").untagged[0] == \
        "VANISHED (EARLIER) 2:3,5,7:8"

    # The session whose view predates the floor still hears every expunge.
    reply = watcher.transact("ok", "NOOP")
    assert sorted(int(n) for n in reply.named("EXPUNGE")) == [2, 3, 5, 7, 8]  # sent highest first
    assert watcher.session.view.exists == 5


def test_ranges_arithmetic():
    assert qresync.normalize_ranges([(9, 7), (1, 3), (2, 5), (6, 6)]) == [(1, 9)]
    assert qresync.without([(1, 10)], [2, 3, 5, 10]) == [(1, 1), (4, 4), (6, 9)]
    assert qresync.without([(1, 4294967295)], [7]) == [(1, 6), (8, 4294967295)]
    assert qresync.uid_ranges(SequenceSet(((5, None), (1, 2))), 7) == [(1, 2), (5, 7)]
    assert qresync.uid_ranges(None, 0) == []
    assert qresync.above([(1, 3), (5, 9)], 6) == [(7, 9)]
    spread = [(i * 3, i * 3 + (i % 2)) for i in range(1, 5000)]
    lines = qresync.vanished_lines(spread, earlier=True)
    assert len(lines) > 1 and all(len(line) <= qresync.MAX_LINE + len("VANISHED (EARLIER) ") for line in lines)
    told = ",".join(line[len("VANISHED (EARLIER) "):] for line in lines)
    assert told == ",".join(f"{a}:{b}" if a != b else str(a) for a, b in spread)
    assert qresync.vanished_lines([], earlier=False) == []


def test_a_mailbox_record_written_before_the_history_bound_opens():
    old = b'{"account":"a@example.test","name":"INBOX","uidnext":5,"modseq":9,"exists":2}'
    record = decode(old, MailboxRecord)
    assert (record.expunged_count, record.expunged_floor) == (0, 0)


def test_after_a_rebuild_a_client_from_before_hears_what_was_lost(server, user):
    """`store rebuild` starts the index again from the files: the expunge history is gone,
    and so is a message whose file was lost. A client that synchronized before must be
    told it vanished, not that nothing did."""
    for i in range(3):
        server.deliver(user, subject=f"m{i}")
    uidvalidity, modseq = state(server, user)
    shard = server.store.shard(user)
    # Lost once the journal no longer has its bytes (the daemon's checkpoint, once a second):
    # before that, a rebuild makes the file again from them.
    deadline = time.monotonic() + 10
    while True:
        with shard.read() as txn:
            if not txn.stat(shard.db["journal"])["entries"]:
                break
        assert time.monotonic() < deadline, "the daemon never checkpointed"
        time.sleep(0.05)
    (lost,) = (shard.mailbox_dir(user, uidvalidity) / "cur").glob("*,U=2,*")
    lost.unlink()
    assert rebuild(server.store, user)["messages"] >= 3 - 1
    assert state(server, user)[0] == uidvalidity
    imap = qresync_session(server, user)
    reply = imap.transact("ok", f"EXAMINE INBOX (QRESYNC ({uidvalidity} {modseq}))")
    assert "VANISHED (EARLIER) 2" in reply.untagged
    assert len([line for line in reply.untagged if " FETCH (" in line]) == 2  # new MODSEQs for the rest


def test_a_count_above_the_keys_left_does_not_empty_the_history_for_good(server, user):
    """A mailbox record counting more history than the index holds (an index from before
    the count, keys dropped by hand) is set right by the first prune, not pruned at every
    expunge from then on."""
    for i in range(4):
        server.deliver(user, subject=f"m{i}")
    uidvalidity, _ = state(server, user)
    shard = server.store.shard(user)

    def inflate(txn, batch):
        record = decode(txn.get(uidvalidity.to_bytes(4, "big"), db=shard.db["mailboxes"]), MailboxRecord)
        record.expunged_count = vanished.MAX_HISTORY + 1000
        txn.put(uidvalidity.to_bytes(4, "big"), encode(record), db=shard.db["mailboxes"])

    shard.write(inflate)
    expunge_uids(server, user, 1)  # prunes what there is, and learns there is nothing left
    expunge_uids(server, user, 2)
    with shard.read() as txn:
        record = decode(txn.get(uidvalidity.to_bytes(4, "big"), db=shard.db["mailboxes"]), MailboxRecord)
        kept = vanished.since(txn, shard, uidvalidity, record, record.expunged_floor)
    assert record.expunged_count == 1 and [uid for _, uid in kept] == [2]
