"""The store's public API on a real data dir: layout, mailboxes, delivery, flags, expunge,
copy and move, changes since a MODSEQ, quota, check and rebuild."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from storage import (
    DeliveryError,
    EnvelopeAddress,
    FlagError,
    MailboxError,
    MailboxExistsError,
    MailboxNameError,
    MailboxNotFoundError,
    Quota,
    SEEN,
    QuotaExceededError,
    Store,
    StoreError,
    open_data_dir,
)
from storage.check import check, rebuild
from storage.listing import read_whole

ALICE = "alice@example.test"
BOB = "bob@example.test"
ALL = [(1, 2**32 - 1)]
EXPECTED_SHARDS = [0, 2, 2, 0, 1, 1, 1, 3]  # blake2b-64 of the name, modulo 4


def message(subject: str = "hello", body: str = "body text") -> bytes:
    return (f"From: Bob <bob@example.org>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.org>\r\n\r\n{body}\r\n").encode()


@pytest.fixture
def store(data_dir):
    with Store(open_data_dir(data_dir, 4)) as s:
        yield s


def test_layout_shard_per_account_and_default_mailboxes(store, data_dir):
    boxes = {m.name: m for m in store.mailboxes(ALICE)}
    assert sorted(boxes) == ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
    assert {n: m.special_use for n, m in boxes.items() if m.special_use} == {
        "Archive": "\\Archive", "Drafts": "\\Drafts", "Junk": "\\Junk", "Sent": "\\Sent", "Trash": "\\Trash"}
    assert all(m.subscribed for m in boxes.values())
    shard = f"{store.shard_number(ALICE):02d}"
    inbox_dir = data_dir / "shards" / shard / ALICE / str(boxes["INBOX"].uidvalidity)
    assert all((inbox_dir / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert (data_dir / "shards" / shard / "index.lmdb" / "data.mdb").is_file()
    # The shard of an account is a fixed function of its name (blake2b, modulo the count):
    # a change here would move every account of an existing data dir.
    assert [store.shard_number(f"user{i}@example.test") for i in range(8)] == EXPECTED_SHARDS
    assert len({store.shard_number(f"user{i}@example.test") for i in range(100)}) == 4


def test_deliver_stores_exact_bytes_with_cached_envelope_and_structure(store):
    raw = message("Grüße", "héllo") + b"\r\n8bit \xff bytes kept as they are\r\n"
    delivered = store.deliver([ALICE], raw, internal_date=1_700_000_000.0)
    assert [(d.account, d.mailbox, d.uid) for d in delivered] == [(ALICE, "INBOX", 1)]
    (info,) = store.fetch(ALICE, "INBOX", ALL)
    assert store.read_message(info) == raw and info.size == len(raw)
    assert info.internal_date == 1_700_000_000.0
    assert info.envelope.subject == "Grüße"
    assert info.envelope.from_ == (EnvelopeAddress("Bob", None, "bob", "example.org"),)
    assert info.structure.type == "text" and info.structure.body[1] == len(raw)
    assert info.sent == 1795428000.0
    assert os.stat(_file_of(store, "INBOX", info.uid)).st_mtime == 1_700_000_000.0  # for rebuild


def test_one_copy_per_distinct_target(store):
    delivered = store.deliver([ALICE, (ALICE, "INBOX"), (ALICE, "inbox"), BOB, (ALICE, "Archive")], message())
    assert sorted((d.account, d.mailbox) for d in delivered) == [(ALICE, "Archive"), (ALICE, "INBOX"), (BOB, "INBOX")]
    assert store.mailbox(ALICE, "INBOX").exists == 1


def test_deliver_to_a_missing_mailbox_fails_for_that_target_only(store):
    with pytest.raises(DeliveryError) as failure:
        store.deliver([ALICE, (BOB, "Nope")], message())
    assert [(d.account, d.mailbox) for d in failure.value.delivered] == [(ALICE, "INBOX")]
    assert isinstance(failure.value.errors[0][1], MailboxNotFoundError)
    with pytest.raises(MailboxNotFoundError):
        store.append(ALICE, "Nope", message())


def test_uids_ascend_and_uidvalidity_is_never_reused(store, data_dir):
    store.create_mailbox(ALICE, "Lists")
    first = store.mailbox(ALICE, "Lists").uidvalidity
    uids = [store.append(ALICE, "Lists", message(str(i))).uid for i in range(3)]
    assert uids == [1, 2, 3]
    store.delete_mailbox(ALICE, "Lists")
    store.create_mailbox(ALICE, "Lists")
    assert store.mailbox(ALICE, "Lists").uidvalidity > first
    assert store.append(ALICE, "Lists", message()).uid == 1
    store.close()
    with Store(open_data_dir(data_dir, 4)) as again:  # persistent across a restart
        box = again.mailbox(ALICE, "Lists")
        assert box.uidnext == 2 and box.uidvalidity > first


def test_mailbox_names(store):
    for good in ("Reports/2026", "Ünïcødé", "with space", "INBOX/child", "日本語"):
        store.create_mailbox(ALICE, good)
    names = {m.name for m in store.mailboxes(ALICE)}
    assert {"Reports", "Reports/2026", "Ünïcødé", "with space", "INBOX/child", "日本語"} <= names
    assert store.mailbox(ALICE, "inbox").name == "INBOX"
    for bad in ("", "a//b", "/abs", "trail/", "..", "a/../b", ".", "x\x00y", "tab\there", "a*", "%", "x" * 600,
                " lead"):
        with pytest.raises(MailboxNameError):
            store.create_mailbox(ALICE, bad)
    with pytest.raises(MailboxExistsError):
        store.create_mailbox(ALICE, "Sent")


def test_rename_with_children_and_delete_rules(store):
    store.create_mailbox(ALICE, "Projects/A/Deep")
    store.append(ALICE, "Projects/A", message())
    store.subscribe(ALICE, "Projects/A")
    validity = store.mailbox(ALICE, "Projects/A").uidvalidity
    store.rename_mailbox(ALICE, "Projects", "Work/Old")
    names = {m.name for m in store.mailboxes(ALICE)}
    assert {"Work", "Work/Old", "Work/Old/A", "Work/Old/A/Deep"} <= names and "Projects" not in names
    moved = store.mailbox(ALICE, "Work/Old/A")
    assert moved.uidvalidity == validity and moved.exists == 1  # a rename keeps UIDs valid
    assert "Work/Old/A" in store.subscriptions(ALICE)
    assert store.read_message(store.fetch(ALICE, "Work/Old/A", ALL)[0]) == message()
    with pytest.raises(MailboxError, match="has children"):
        store.delete_mailbox(ALICE, "Work/Old")
    with pytest.raises(MailboxError, match="INBOX cannot be deleted"):
        store.delete_mailbox(ALICE, "INBOX")
    with pytest.raises(MailboxExistsError):
        store.rename_mailbox(ALICE, "Work/Old/A/Deep", "Sent")
    with pytest.raises(MailboxError, match="into itself"):
        store.rename_mailbox(ALICE, "Work", "Work/Inside")
    with pytest.raises(MailboxError, match="into itself"):
        store.rename_mailbox(ALICE, "INBOX", "INBOX/Sub")


def test_flags_modes_modseq_and_maildir_names(store):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    start = store.mailbox(ALICE, "INBOX").highestmodseq
    changed, modified = store.store_flags(ALICE, "INBOX", [(1, 2)], "add", ["\\Seen", "\\Flagged", "$Important"])
    assert [c.uid for c in changed] == [1, 2] and modified == []
    assert all(c.modseq == start + 1 for c in changed)
    assert store.flags(ALICE, "INBOX", [(1, 1)])[0].flags == ("\\Seen", "\\Flagged", "$Important")
    store.store_flags(ALICE, "INBOX", [(1, 1)], "remove", ["\\Flagged", "$Important"])
    store.store_flags(ALICE, "INBOX", [(3, 3)], "set", ["\\Answered", "\\Draft"])
    states = {s.uid: s.flags for s in store.flags(ALICE, "INBOX")}
    assert states == {1: ("\\Seen",), 2: ("\\Seen", "\\Flagged", "$Important"), 3: ("\\Answered", "\\Draft")}
    mailbox = store.mailbox(ALICE, "INBOX")
    assert mailbox.unseen == 1 and "$Important" in mailbox.keywords
    suffixes = sorted(p.name.rsplit(":2,", 1)[1] for p in (_mailbox_dir(store, "INBOX") / "cur").iterdir())
    assert suffixes == ["DR", "FS", "S"]
    # Nothing changes: no new MODSEQ.
    before = store.mailbox(ALICE, "INBOX").highestmodseq
    assert store.store_flags(ALICE, "INBOX", [(1, 1)], "add", ["\\Seen"]) == ([], [])
    assert store.mailbox(ALICE, "INBOX").highestmodseq == before


def test_unchanged_since_refuses_what_changed_after(store):
    store.deliver([ALICE], message("a"))
    store.deliver([ALICE], message("b"))
    seen_at = store.mailbox(ALICE, "INBOX").highestmodseq
    store.store_flags(ALICE, "INBOX", [(2, 2)], "add", ["\\Flagged"])
    changed, modified = store.store_flags(ALICE, "INBOX", ALL, "add", ["\\Seen"], unchanged_since=seen_at)
    assert [c.uid for c in changed] == [1] and modified == [2]


def test_bad_flags_and_keyword_limits(store):
    store.deliver([ALICE], message())
    for bad in (["\\Recent"], ["\\Bogus"], ["sp ace"], ["br(ace"], ["ünï"], ["x" * 65]):
        with pytest.raises(FlagError):
            store.store_flags(ALICE, "INBOX", ALL, "add", bad)
    with pytest.raises(FlagError, match="too many distinct keywords"):
        for i in range(300):
            store.store_flags(ALICE, "INBOX", ALL, "add", [f"k{i}"])
    assert len(store.mailbox(ALICE, "INBOX").keywords) == 256


def test_expunge_removes_deleted_messages_and_their_files(store):
    for i in range(4):
        store.deliver([ALICE], message(str(i)))
    store.store_flags(ALICE, "INBOX", [(2, 3)], "add", ["\\Deleted"])
    assert store.expunge(ALICE, "INBOX", [(3, 3)]) == [3]  # UID EXPUNGE limits it
    assert store.expunge(ALICE, "INBOX") == [2]
    _, uids, _ = store.uids(ALICE, "INBOX")
    assert uids == [1, 4]
    assert len(list((_mailbox_dir(store, "INBOX") / "cur").iterdir())) == 2
    assert store.usage(ALICE).messages == 2


def test_uids_follow_every_change_from_the_kept_listing(store):
    # Store.uids keeps each mailbox's listing and brings it up to date from the changes
    # since (storage/listing.py): after each kind of change it must answer what a second
    # Store, reading the index afresh, answers.
    shard = store.shard(ALICE)

    def same() -> tuple[list[int], list[int]]:
        mailbox, uids, bits = store.uids(ALICE, "INBOX")
        kept = store.flag_listing(ALICE, "INBOX")
        with shard.read() as txn:
            fresh = read_whole(txn, shard, mailbox.id, 0)
        assert (uids, bits) == (fresh.uids.tolist(), list(fresh.bits))
        assert (kept.uids, kept.bits, kept.modseqs, kept.keywords) == fresh[1:]
        flags = store.flags(ALICE, "INBOX")
        assert [(s.uid, s.modseq, s.flags) for s in flags] == [
            (uid, kept.modseqs[i], kept.flags_at(i)) for i, uid in enumerate(kept.uids)]
        return uids, bits

    for i in range(6):
        store.deliver([ALICE], message(str(i)))
    assert same()[0] == [1, 2, 3, 4, 5, 6]
    store.store_flags(ALICE, "INBOX", [(2, 3)], "add", ["\\Seen", "\\Deleted"])
    uids, bits = same()
    assert bits[1] & SEEN and bits[2] & SEEN and not bits[0] & SEEN
    store.store_flags(ALICE, "INBOX", [(4, 5)], "add", ["$Label1", "$Label2"])
    same()
    store.store_flags(ALICE, "INBOX", [(5, 5)], "remove", ["$Label1", "$Label2"])
    assert store.flag_listing(ALICE, "INBOX").keywords == {4: b"$Label1 $Label2"}
    same()
    store.expunge(ALICE, "INBOX", [(3, 3)])
    store.deliver([ALICE], message("7"))
    assert same()[0] == [1, 2, 4, 5, 6, 7]
    store.store_flags(ALICE, "INBOX", [(1, 7)], "add", ["\\Deleted"])
    store.expunge(ALICE, "INBOX")
    assert same() == ([], [])
    store.deliver([ALICE], message("8"), flags=["\\Seen"])
    assert same()[0] == [8]
    # An expunge the history no longer tells of (history pruned): the count does not add
    # up, and the listing is read again whole.
    store.deliver([ALICE], message("9"))
    same()
    store.store_flags(ALICE, "INBOX", [(8, 8)], "add", ["\\Deleted"])
    store.expunge(ALICE, "INBOX")
    shard.write(lambda txn, batch: txn.drop(shard.db["expunged"], delete=False))
    assert same()[0] == [9]


def test_copy_and_move(store):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    store.store_flags(ALICE, "INBOX", [(1, 1)], "add", ["\\Flagged", "$Work"])
    validity, pairs = store.copy(ALICE, "INBOX", [(1, 2)], "Archive")
    assert validity == store.mailbox(ALICE, "Archive").uidvalidity and pairs == [(1, 1), (2, 2)]
    assert store.flags(ALICE, "Archive", [(1, 1)])[0].flags == ("\\Flagged", "$Work")
    assert store.mailbox(ALICE, "INBOX").exists == 3 and store.usage(ALICE).messages == 5
    inbox_file = _file_of(store, "INBOX", 3)
    _, pairs = store.move(ALICE, "INBOX", [(3, 3)], "Trash")
    assert pairs == [(3, 1)]
    moved = store.fetch(ALICE, "Trash", [(1, 1)])[0]
    assert not inbox_file.exists() and os.stat(_file_of(store, "Trash", 1)).st_nlink == 1  # one file, moved
    assert store.read_message(moved) == message("2")
    assert store.usage(ALICE).messages == 5


def test_changes_since_a_modseq(store):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    since = store.mailbox(ALICE, "INBOX").highestmodseq
    store.store_flags(ALICE, "INBOX", [(2, 2)], "add", ["\\Seen", "\\Deleted"])
    store.expunge(ALICE, "INBOX")
    store.deliver([ALICE], message("new"))
    mailbox, changed, expunged = store.changes_since(ALICE, "INBOX", since)
    assert [c.uid for c in changed] == [4] and expunged == [2]
    assert mailbox.highestmodseq > since


def test_quota_is_enforced_per_account(data_dir):
    raw = message(body="x" * 1000)
    with Store(open_data_dir(data_dir, 4), quota_of=lambda account: 3 * len(raw) if account == ALICE else 0) as store:
        for _ in range(3):
            store.deliver([ALICE], raw)
        with pytest.raises(DeliveryError) as failure:
            store.deliver([ALICE, BOB], raw)
        assert isinstance(failure.value.errors[0][1], QuotaExceededError)
        assert [d.account for d in failure.value.delivered] == [BOB]
        with pytest.raises(QuotaExceededError):
            store.copy(ALICE, "INBOX", [(1, 1)], "Archive")
        store.move(ALICE, "INBOX", [(1, 1)], "Archive")  # a move does not grow usage
        assert store.usage(ALICE).used == 3 * len(raw)
        assert not list((_mailbox_dir(store, "INBOX") / "tmp").iterdir())  # refused files cleaned


def test_message_quota_counts_messages(data_dir):
    raw = message()
    with Store(open_data_dir(data_dir, 4), quota_of=lambda account: Quota(0, 2)) as store:
        store.deliver([ALICE], raw)
        assert not store.is_full(ALICE)
        store.deliver([ALICE], raw)
        assert store.is_full(ALICE)
        with pytest.raises(DeliveryError) as failure:
            store.deliver([ALICE], raw)
        assert "2 messages" in str(failure.value.errors[0][1])
        store.expunge(ALICE, "INBOX", [(1, 1)])  # not \Deleted: nothing removed
        store.store_flags(ALICE, "INBOX", [(1, 1)], "add", ["\\Deleted"])
        store.expunge(ALICE, "INBOX")
        assert not store.is_full(ALICE)
        store.deliver([ALICE], raw)


def test_concurrent_deliveries_share_commits(store):
    """Group commit: 32 threads delivering at once need far fewer LMDB commits than messages."""
    store.ensure_account(ALICE)
    shard = store.shard(ALICE)
    before = shard.last_commit()
    barrier = threading.Barrier(32)

    def deliver(i: int) -> None:
        barrier.wait()
        for j in range(10):
            store.deliver([ALICE], message(f"{i}-{j}"))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    commits = shard.last_commit() - before
    assert store.mailbox(ALICE, "INBOX").exists == 320
    assert commits < 320 / 2, f"{commits} commits for 320 deliveries: no batching"


def test_a_request_failing_in_a_shared_batch_spoils_none_of_the_others(data_dir):
    """Requests that wait together share one commit; one refused (over quota) fails alone,
    and the others are stored exactly once."""
    full, other = "user0@example.test", "user3@example.test"  # both in shard 0 (EXPECTED_SHARDS)
    limits = {full: Quota(0, 1)}
    with Store(open_data_dir(data_dir, 4), quota_of=lambda a: limits.get(a, Quota(0))) as store:
        store.deliver([full], message("fills the quota"))
        store.ensure_account(other)
        shard = store.shard(full)
        assert shard is store.shard(other)
        entered, gate = threading.Event(), threading.Event()

        def hold(txn, batch):  # keeps the committer busy while the three queue up
            entered.set()
            gate.wait(10)

        shard.write(lambda txn, batch: None)  # deletes the records of file work settled so far
        holding = shard.submit(hold)
        assert entered.wait(10)
        outcomes: dict[str, tuple] = {}
        settled = threading.Semaphore(0)

        def start(name: str, account: str) -> None:
            def done(delivered, errors):
                outcomes[name] = (delivered, errors)
                settled.release()

            store.start_delivery([account], message(name), on_done=done)

        start("first", other)
        start("refused", full)
        start("second", other)
        commits = shard.last_commit()
        gate.set()
        shard.wait(holding)
        for _ in range(3):
            assert settled.acquire(timeout=10)
        assert [d.uid for d in outcomes["first"][0]] == [1] and outcomes["first"][1] == []
        assert [d.uid for d in outcomes["second"][0]] == [2] and outcomes["second"][1] == []
        assert outcomes["refused"][0] == []
        assert [type(e) for _, e in outcomes["refused"][1]] == [QuotaExceededError]
        assert shard.last_commit() - commits == 1  # one for all three (the holder wrote nothing)
        subjects = [m.envelope.subject for m in store.fetch(other, "INBOX", ALL)]
        assert subjects == ["first", "second"]
        assert [m.envelope.subject for m in store.fetch(full, "INBOX", ALL)] == ["fills the quota"]
        assert check(store) == []  # no file left behind in tmp/ or cur/


def test_a_failing_after_commit_action_costs_a_log_line_not_the_committer(store):
    """Work after a commit that raises (not just OSError) must neither lose the commit's
    answer nor stop the shard's committer: every later write would wait for ever."""
    store.ensure_account(ALICE)
    shard = store.shard(ALICE)

    def fn(txn, batch):
        batch.after_commit.append(lambda: b"x".decode("no-such-codec"))  # LookupError
        return "committed"

    assert shard.write(fn) == "committed"
    done = threading.Event()
    threading.Thread(target=lambda: (store.deliver([ALICE], message("after")), done.set()), daemon=True).start()
    assert done.wait(10), "the committer is gone"
    assert store.mailbox(ALICE, "INBOX").exists == 1


def test_check_is_clean_then_rebuild_recovers_from_files_alone(store, data_dir):
    for i in range(5):
        store.deliver([ALICE], message(str(i)), internal_date=1_700_000_000.0 + i)
    store.store_flags(ALICE, "INBOX", [(2, 2)], "add", ["\\Seen", "\\Answered"])
    store.create_mailbox(ALICE, "Lists/Python")
    store.append(ALICE, "Lists/Python", message("list"))
    assert check(store) == []
    validity = store.mailbox(ALICE, "INBOX").uidvalidity
    store.close()
    for shard_dir in (data_dir / "shards").iterdir():  # lose every index
        for f in (shard_dir / "index.lmdb").iterdir():
            f.unlink()
    with Store(open_data_dir(data_dir, 4)) as fresh:
        summary = rebuild(fresh, ALICE)
        assert summary["messages"] == 6 and summary["renumbered"] == 0
        inbox = fresh.mailbox(ALICE, "INBOX")
        assert inbox.uidvalidity == validity and inbox.uidnext == 6 and inbox.exists == 5
        flags = {s.uid: s.flags for s in fresh.flags(ALICE, "INBOX")}
        assert flags[2] == ("\\Seen", "\\Answered") and flags[1] == ()
        infos = fresh.fetch(ALICE, "INBOX", ALL)
        assert [i.internal_date for i in infos] == [1_700_000_000.0 + i for i in range(5)]
        assert fresh.read_message(infos[3]) == message("3")
        assert fresh.mailbox(ALICE, "Lists/Python").exists == 1
        assert check(fresh) == []
        # A new delivery continues the UIDs: none is handed out twice.
        assert fresh.deliver([ALICE], message("after"))[0].uid == 6


def test_rebuild_keeps_the_special_use_of_a_mailbox_with_messages(store):
    """The mailbox's postroom.json is rewritten by rebuild: with its special-use, so that a
    second rebuild still knows Sent for Sent."""
    store.append(ALICE, "Sent", message("sent"))
    for _ in range(2):
        rebuild(store, ALICE)
        assert store.mailbox(ALICE, "Sent").special_use == "\\Sent"
    assert store.mailbox(ALICE, "Sent").exists == 1


def test_rebuild_renumbers_when_file_uids_collide(store, data_dir):
    store.deliver([ALICE], message("a"))
    store.deliver([ALICE], message("b"))
    validity = store.mailbox(ALICE, "INBOX").uidvalidity
    cur = _mailbox_dir(store, "INBOX") / "cur"
    second = next(path for path in cur.iterdir() if ",U=2," in path.name)
    second.rename(cur / second.name.replace(",U=2,", ",U=1,"))
    summary = rebuild(store, ALICE)
    assert summary["renumbered"] == 1
    inbox = store.mailbox(ALICE, "INBOX")
    assert inbox.uidvalidity > validity and inbox.exists == 2
    assert sorted(store.read_message(i) for i in store.fetch(ALICE, "INBOX", ALL)) == [message("a"), message("b")]


def test_rebuild_keeps_annotations_moves_them_with_a_renumbered_mailbox_and_drops_orphans(store):
    store.deliver([ALICE], message("a"))
    store.deliver([ALICE], message("b"))
    store.create_mailbox(ALICE, "Gone")
    store.set_metadata(ALICE, "", [("/shared/comment", b"server")])
    store.set_metadata(ALICE, "INBOX", [("/private/comment", b"inbox")])
    store.set_metadata(ALICE, "Sent", [("/private/comment", b"sent")])
    store.set_metadata(ALICE, "Gone", [("/private/comment", b"gone")])
    gone_id = store.mailbox(ALICE, "Gone").id
    _mailbox_dir(store, "Gone").rename(_mailbox_dir(store, "Gone").with_name("elsewhere"))  # its files are lost
    cur = _mailbox_dir(store, "INBOX") / "cur"  # INBOX's UIDs collide: a new id
    second = next(path for path in cur.iterdir() if ",U=2," in path.name)
    second.rename(cur / second.name.replace(",U=2,", ",U=1,"))
    assert rebuild(store, ALICE)["renumbered"] == 1
    assert store.get_metadata(ALICE, "", ["/shared/comment"]) == [("/shared/comment", b"server")]
    assert store.get_metadata(ALICE, "INBOX", ["/private/comment"]) == [("/private/comment", b"inbox")]
    assert store.get_metadata(ALICE, "Sent", ["/private/comment"]) == [("/private/comment", b"sent")]
    assert not any(mailbox_id == gone_id for mailbox_id, _ in store.metadata_digests(ALICE))
    assert len(store.metadata_digests(ALICE)) == 3


def _mailbox_dir(store: Store, name: str) -> Path:
    shard = store.shard(ALICE)
    return shard.mailbox_dir(ALICE, store.mailbox(ALICE, name).uidvalidity)


def _file_of(store: Store, name: str, uid: int) -> Path:
    """The file of a settled message, as maildir.file_name names it (`,U=<uid>,`)."""
    (found,) = (_mailbox_dir(store, name) / "cur").glob(f"*,U={uid},*")
    return found


def test_the_background_indexer_catches_up_by_itself(store):
    for i in range(20):
        store.deliver([ALICE], message(f"s{i}", f"needle{i} haystack"))
    deadline = time.monotonic() + 10
    while store.index_backlog(ALICE, "INBOX") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.index_backlog(ALICE, "INBOX") == 0
    assert store.search(ALICE, "INBOX", ("body", "needle7")) == [8]
    assert store.search(ALICE, "INBOX", ("body", "haystack")) == list(range(1, 21))


def test_posting_lists_spill_over_chunks(store):
    from storage import fts

    total = fts.CHUNK + 150
    raws = [message(f"c{i}", f"commonword unique{i}") for i in range(total)]
    chunks = [raws[i::16] for i in range(16)]
    threads = [threading.Thread(target=lambda part: [store.deliver([ALICE], r) for r in part], args=(part,))
               for part in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.build_index(ALICE)
    assert store.search(ALICE, "INBOX", ("body", "commonword")) == list(range(1, total + 1))
    assert store.search(ALICE, "INBOX", ("body", "unique1049")) == [
        i.uid for i in store.fetch(ALICE, "INBOX", ALL) if b"unique1049\r\n" in store.read_message(i)]
    shard = store.shard(ALICE)
    with shard.read() as txn:
        inbox = store.mailbox(ALICE, "INBOX").id
        prefix = inbox.to_bytes(4, "big") + b"bcommonword\0"
        cursor = txn.cursor(db=shard.db["terms"])
        cursor.set_range(prefix)
        keys = [bytes(k) for k in cursor.iternext(values=False) if bytes(k).startswith(prefix)]
    assert len(keys) == 2, "1174 postings should fill one chunk of 1024 and start a second"


def test_hostile_mime_is_bounded(store):
    from storage.mime import MAX_PARTS

    many = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n" for i in range(3000))
    raw = (f"Subject: many\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n{many}--b--\r\n").encode()
    deep = "Subject: deep\r\n" + "".join(f"Content-Type: multipart/mixed; boundary=l{i}\r\n\r\n--l{i}\r\n"
                                          for i in range(200)) + "\r\ninnermost\r\n"
    for hostile in (raw, deep.encode(), b"\x00\xff" * 5000, b"Content-Type: multipart/mixed\r\n\r\n--\r\n"):
        delivered = store.deliver([ALICE], hostile)[0]
        (info,) = store.fetch(ALICE, "INBOX", [(delivered.uid, delivered.uid)])
        assert store.read_message(info) == hostile

    def count(part) -> int:
        return 1 + sum(count(p) for p in part.parts or ())

    assert count(store.fetch(ALICE, "INBOX", [(1, 1)])[0].structure) <= MAX_PARTS + 1


def test_structure_offsets_slice_each_part(store):
    raw = (b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=\"X Y\"\r\n\r\npreamble\r\n"
           b"--X Y\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
           b"--X Y\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n"
           b"--X Y--\r\nepilogue\r\n")
    store.deliver([ALICE], raw)
    structure = store.fetch(ALICE, "INBOX", ALL)[0].structure
    first, inner = structure.parts
    assert raw[slice(*first.body)] == b"first part"
    assert raw[slice(*first.header)] == b"Content-Type: text/plain\r\n"
    assert raw[slice(*inner.body)] == b"Subject: inner\r\n\r\ninner body"
    assert inner.message.envelope.subject == "inner"
    assert raw[slice(*inner.message.structure.body)] == b"inner body"
    assert first.lines == 1 and first.size == len(b"first part")
    assert structure.params == (("boundary", "X Y"),)


def test_renaming_inbox_moves_its_messages(store):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    store.store_flags(ALICE, "INBOX", [(2, 2)], "add", ["\\Seen"])
    store.rename_mailbox(ALICE, "INBOX", "Old Mail")
    assert store.mailbox(ALICE, "INBOX").exists == 0
    old = store.mailbox(ALICE, "Old Mail")
    assert old.exists == 3 and old.unseen == 2
    assert [store.read_message(i) for i in store.fetch(ALICE, "Old Mail", ALL)] == [message(str(i)) for i in range(3)]
    assert store.deliver([ALICE], message("new"))[0].uid == 4  # INBOX's UIDs go on
    with pytest.raises(MailboxExistsError):
        store.rename_mailbox(ALICE, "INBOX", "Old Mail")


def test_overlapping_and_reversed_uid_ranges_count_each_message_once(store):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    overlapping = [(1, 3), (2, 3), (3, 1)]
    assert [s.uid for s in store.flags(ALICE, "INBOX", overlapping)] == [1, 2, 3]
    store.store_flags(ALICE, "INBOX", overlapping, "add", ["\\Seen"])
    assert store.mailbox(ALICE, "INBOX").unseen == 0
    assert len(store.copy(ALICE, "INBOX", overlapping, "Archive")[1]) == 3
    store.store_flags(ALICE, "INBOX", overlapping, "add", ["\\Deleted"])
    assert store.expunge(ALICE, "INBOX", overlapping) == [1, 2, 3]
    assert store.mailbox(ALICE, "Archive").exists == 3 and store.usage(ALICE).messages == 3


def test_names_and_dates_beyond_storage_limits_are_clear_errors(store):
    with pytest.raises(MailboxNameError, match="too long"):
        store.create_mailbox(ALICE, "漢" * 200)  # 200 characters, 600 bytes: over LMDB's key size
    for when in (-86400.0 * 365 * 10, 0.0, 5_000_000_000.0):  # 1960, 1970, 2128
        delivered = store.deliver([ALICE], message(f"d{when}"), internal_date=when)[0]
        info = store.fetch(ALICE, "INBOX", [(delivered.uid, delivered.uid)])[0]
        assert info.internal_date == when
    with pytest.raises(ValueError):
        store.deliver([ALICE], message(), internal_date=1e30)


def test_undecodable_and_hostile_content_is_stored_quickly(store):
    import time as clock

    cases = [
        b"Content-Type: text/plain; charset=idna\r\n\r\nhello idna\r\n",
        b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2D0-lone surrogate\r\n",
        b"Content-Type: application/pdf; name*=idna''x\r\n\r\nbinary\r\n",
        b"Subject: =?utf-7?q?+2D0-?=\r\n\r\nsubject with a lone surrogate\r\n",
        b"Content-Type: text/html\r\n\r\n" + b"<script " * 200_000,
        b"Content-Type: text/html\r\n\r\n" + b"<" * 1_000_000,
    ]
    for raw in cases:
        start = clock.perf_counter()
        delivered = store.deliver([ALICE], raw)[0]
        assert clock.perf_counter() - start < 5, raw[:60]
        info = store.fetch(ALICE, "INBOX", [(delivered.uid, delivered.uid)])[0]
        assert store.read_message(info) == raw
    store.build_index(ALICE)
    assert store.search(ALICE, "INBOX", ("body", "hello idna")) == [1]


def test_repair_never_deletes_a_directory_with_mail(store, data_dir):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    inbox = _mailbox_dir(store, "INBOX")
    stray = inbox.parent / "4000000000"  # a mailbox dir the index does not know, holding mail
    stray.mkdir()
    (stray / "cur").mkdir()
    (stray / "cur" / "1.M1P1Q1R1.host,U=1,S=5:2,").write_bytes(b"mail!")
    problems = check(store, ALICE, repair=True)
    assert [p.kind for p in problems] == ["directory-not-in-index"] and "store rebuild" in problems[0].detail
    assert (stray / "cur" / "1.M1P1Q1R1.host,U=1,S=5:2,").exists()
    rebuild(store, ALICE)
    assert store.mailbox(ALICE, "Recovered").exists == 0
    assert store.mailbox(ALICE, "Recovered/4000000000").exists == 1


def test_a_missing_mailbox_directory_is_reported(store):
    store.deliver([ALICE], message())
    import shutil

    shutil.rmtree(_mailbox_dir(store, "INBOX"))
    assert [p.kind for p in check(store, ALICE)] == ["directory-missing"]
    check(store, ALICE, repair=True)
    assert check(store, ALICE) == [] and store.mailbox(ALICE, "INBOX").exists == 0


def test_rebuild_never_hands_out_a_uid_again(store, data_dir):
    for i in range(3):
        store.deliver([ALICE], message(str(i)))
    store.store_flags(ALICE, "INBOX", [(3, 3)], "add", ["\\Deleted"])
    store.expunge(ALICE, "INBOX")
    before = store.mailbox(ALICE, "INBOX")
    rebuild(store, ALICE)  # with the index still there
    after = store.mailbox(ALICE, "INBOX")
    assert after.uidvalidity == before.uidvalidity and after.uidnext == 4
    assert after.highestmodseq > before.highestmodseq
    store.close()
    for shard_dir in (data_dir / "shards").iterdir():  # and from the files alone
        for f in (shard_dir / "index.lmdb").iterdir():
            f.unlink()
    with Store(open_data_dir(data_dir, 4)) as fresh:
        rebuild(fresh, ALICE)
        assert fresh.mailbox(ALICE, "INBOX").uidnext == 4
        assert fresh.deliver([ALICE], message("new"))[0].uid == 4


def test_repair_beside_live_deliveries_loses_and_duplicates_nothing(store):
    """Cron may run `store check --repair` while mtad delivers."""
    store.ensure_account(ALICE)
    stop = threading.Event()
    sent: list[int] = []

    def deliver() -> None:
        i = 0
        while not stop.is_set():
            store.deliver([ALICE], message(f"live{threading.get_ident()}-{i}"))
            sent.append(i)
            i += 1

    workers = [threading.Thread(target=deliver) for _ in range(4)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 4
    repairs = 0
    while time.monotonic() < deadline:
        check(store, ALICE, repair=True)
        repairs += 1
    stop.set()
    for w in workers:
        w.join()
    assert repairs > 3 and len(sent) > 50
    assert check(store, ALICE) == []
    infos = store.fetch(ALICE, "INBOX", ALL)
    assert len(infos) == len(sent)
    bodies = [store.read_message(i) for i in infos]
    assert len(set(bodies)) == len(bodies)


def test_envelope_keeps_groups_and_mailboxes_without_a_domain(store):
    # RFC 3501 §7.4.2: a group is (NIL NIL name NIL) ... (NIL NIL NIL NIL); host NIL means a group,
    # so a mailbox without a domain has host "".
    raw = (b'From: root\r\nTo: Team: a@example.org, "B, C" <b@example.org>;, d@example.org\r\n'
           b"Cc: undisclosed-recipients:;\r\nBcc: Open: e@example.org\r\nSubject: groups\r\n\r\nbody\r\n")
    store.deliver([ALICE], raw)
    envelope = store.fetch(ALICE, "INBOX", ALL)[0].envelope

    def listed(addresses) -> list[tuple]:
        return [(a.name, a.adl, a.mailbox, a.host) for a in addresses]

    assert listed(envelope.to) == [(None, None, "Team", None), (None, None, "a", "example.org"),
                                   ("B, C", None, "b", "example.org"), (None, None, None, None),
                                   (None, None, "d", "example.org")]
    assert listed(envelope.cc) == [(None, None, "undisclosed-recipients", None), (None, None, None, None)]
    assert listed(envelope.bcc) == [(None, None, "Open", None), (None, None, "e", "example.org"),
                                    (None, None, None, None)]
    assert listed(envelope.from_) == listed(envelope.sender) == [(None, None, "root", "")]


def test_an_account_has_a_bounded_number_of_mailboxes(store, monkeypatch):
    from storage import MailboxLimitError, mailboxes

    monkeypatch.setattr(mailboxes, "MAX_MAILBOXES", 8)  # 6 default mailboxes + 2
    store.create_mailbox(ALICE, "One")
    store.create_mailbox(ALICE, "Two")
    with pytest.raises(MailboxLimitError):
        store.create_mailbox(ALICE, "Three")
    store.delete_mailbox(ALICE, "Two")
    store.create_mailbox(ALICE, "Three")
    assert {m.name for m in store.mailboxes(ALICE)} >= {"One", "Three"}
    assert next(m for m in store.mailboxes(ALICE) if m.name == "One").children is False


def test_repair_indexes_a_file_another_maildir_tool_dropped_in(store):
    store.deliver([ALICE], message("indexed"))
    dropped = _mailbox_dir(store, "INBOX") / "cur" / "1700000000.M1P2.otherhost:2,S"
    dropped.write_bytes(message("dropped in"))
    assert [p.kind for p in check(store)] == ["file-not-in-index"]
    check(store, repair=True)
    assert check(store) == []
    infos = store.fetch(ALICE, "INBOX", ALL)
    assert [store.read_message(i) for i in infos] == [message("indexed"), message("dropped in")]
    assert infos[1].uid == 2 and infos[1].flags == ("\\Seen",)


def test_the_watcher_outlives_a_failing_shard(data_dir, caplog):
    """IDLE depends on the watcher thread: a shard that fails under it (here its LMDB handle
    is closed, as a lost device would leave it) costs that shard its updates, logged once,
    and never the thread that serves every other mailbox."""
    import queue

    from storage.watch import Watcher

    broken, healthy = "user0@example.test", "user4@example.test"  # shards 0 and 1
    with Store(open_data_dir(data_dir, 4)) as store:
        for account in (broken, healthy):
            store.ensure_account(account)
        heard: queue.Queue = queue.Queue()
        watcher = Watcher(store, interval=0.05)
        try:
            for account in (broken, healthy):
                watcher.watch(account, "INBOX", lambda state, a=account: heard.put((a, state.exists)))
            store.shard(broken).env.close()
            time.sleep(0.3)  # several polls fail meanwhile
            store.deliver([healthy], message("still heard"))
            assert heard.get(timeout=5) == (healthy, 1)
        finally:
            watcher.close()
    failures = [r for r in caplog.records if "watch_failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]


def test_a_message_delivered_again_is_stored_once(data_dir):
    """Exactly-once receipt (storage/dedupe.py): the same Message-ID and the same bytes from
    the sender, sent again under other trace headers of ours, are answered as delivered and
    not stored twice; anything else is a new message."""
    def message(message_id: str | None = "<once@example.org>", body: str = "the body",
                subject: str = "s", sender: str = "bob@example.org") -> bytes:
        header = f"Message-ID: {message_id}\r\n" if message_id else ""
        return f"From: {sender}\r\nSubject: {subject}\r\n{header}\r\n{body}\r\n".encode()

    def deliver(targets: list[str], trace: str, sent: bytes, **dedupe) -> list:
        ours = f"Received: by mx id {trace}\r\n".encode()  # what this server adds: new each time
        return store.deliver(targets, ours + sent, **({"dedupe_from": len(ours)} | dedupe))

    with Store(open_data_dir(data_dir, 4)) as store:
        first = deliver([ALICE], "1", message())
        again = deliver([ALICE, "user1@example.test"], "2", message())
        assert [(d.uid, d.duplicate) for d in first] == [(1, False)]
        assert [(d.account, d.uid, d.duplicate) for d in again] == [(ALICE, 1, True), ("user1@example.test", 1, False)]
        assert store.mailbox(ALICE, "INBOX").exists == 1
        assert store.usage(ALICE).messages == 1
        # Another body, another header (a list's copy, a forger's), no Message-ID: new messages.
        assert deliver([ALICE], "3", message(body="another body"))[0].duplicate is False
        assert deliver([ALICE], "4", message(subject="[list] s"))[0].duplicate is False
        assert deliver([ALICE], "5", message(sender="forger@example.net"))[0].duplicate is False
        assert deliver([ALICE], "6", message(message_id=None))[0].duplicate is False
        assert deliver([ALICE], "7", message(message_id=None))[0].duplicate is False
        assert store.deliver([ALICE], message())[0].duplicate is False  # IMAP APPEND and the like: never merged
        assert store.mailbox(ALICE, "INBOX").exists == 7
        # Once the first copy is gone (expunged, or withdrawn after a failed delivery), the
        # message is new again.
        store.remove(ALICE, "INBOX", [1])
        assert deliver([ALICE], "8", message())[0].duplicate is False
        shard = store.shard(ALICE)
        assert not any(shard.writer.path.iterdir()), "a duplicate's file was left behind"
        assert check(store, ALICE) == []


def test_dedupe_keys_expire_after_the_window(data_dir):
    raw = b"Message-ID: <expiring@example.org>\r\nSubject: s\r\n\r\nbody\r\n"
    with Store(open_data_dir(data_dir, 4), dedupe_window=1) as store:
        assert store.deliver([ALICE], raw, dedupe_from=0)[0].duplicate is False
        assert store.deliver([ALICE], raw, dedupe_from=0)[0].duplicate is True
        time.sleep(1.5)
        assert store.deliver([ALICE], raw, dedupe_from=0)[0].duplicate is False
        # The committer forgets expired keys in its idle time after a write.
        other = raw.replace(b"<expiring@", b"<other@")
        store.deliver([ALICE], other, dedupe_from=0)
        shard = store.shard(ALICE)
        with shard.read() as txn:
            assert txn.stat(shard.db["dedupe"])["entries"] == 2
        time.sleep(1.5)
        store.deliver([ALICE], other.replace(b"<other@", b"<third@"), dedupe_from=0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with shard.read() as txn:
                if txn.stat(shard.db["dedupe"])["entries"] <= 1:
                    break
            time.sleep(0.1)
        with shard.read() as txn:  # the two old keys are gone (the third too, if the machine is slow)
            assert txn.stat(shard.db["dedupe"])["entries"] <= 1
            assert txn.stat(shard.db["dedupe_times"])["entries"] == txn.stat(shard.db["dedupe"])["entries"]


# A message as the index of the JSON version (before storage/records.py) stored it: every key,
# nulls included, and the lone surrogate a broken UTF-7 word decodes to, escaped. "BASE" is
# the message's file base, filled in by the test.
OLD_RAW = (b"From: Bob <bob@example.org>\r\nTo: Team: a@example.org;\r\nSubject: =?utf-7?q?+2AA-?= old\r\n"
           b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Language: en\r\n\r\nhi\r\n"
           b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n--b--\r\n")
OLD_MESSAGE_RECORD = (
    '{"d":1700000000.0,"t":1795428000.0,"td":20780,"e":{"date":"Mon, 23 Nov 2026 10:00:00 +0000",'
    '"subject":"=?utf-7?q?+2AA-?= old","from":[["Bob",null,"bob","example.org"]],"sender":[["Bob",null,"bob",'
    '"example.org"]],"reply-to":[["Bob",null,"bob","example.org"]],"to":[[null,null,"Team",null],[null,null,"a",'
    '"example.org"],[null,null,null,null]],"cc":null,"bcc":null,"in-reply-to":null,"message-id":null,'
    '"subject_text":"\\ud800 old"},"x":{"type":"multipart","subtype":"mixed","params":[["boundary","b"]],'
    '"header":[0,169],"body":[171,313],"parts":[{"type":"text","subtype":"plain","params":[["charset","utf-8"]],'
    '"header":[176,239],"body":[241,243],"id":null,"description":null,"encoding":"7BIT","size":2,"lines":1,'
    '"md5":null,"disposition":null,"language":["en"],"location":null},{"type":"message","subtype":"rfc822",'
    '"params":[],"header":[250,280],"body":[282,304],"id":null,"description":null,"encoding":"7BIT","size":22,'
    '"lines":3,"md5":null,"disposition":null,"language":null,"location":null,"message":{"envelope":{"date":null,'
    '"subject":"inner","from":null,"sender":null,"reply-to":null,"to":null,"cc":null,"bcc":null,'
    '"in-reply-to":null,"message-id":null,"subject_text":"inner"},"structure":{"type":"text","subtype":"plain",'
    '"params":[],"header":[282,298],"body":[300,304],"id":null,"description":null,"encoding":"7BIT","size":4,'
    '"lines":1,"md5":null,"disposition":null,"language":null,"location":null}}}],"extension":{"disposition":null,'
    '"language":null,"location":null}},"b":"BASE","s":313}')


def test_an_index_of_the_json_version_opens_as_it_is(store):
    """The record types keep the stored keys: an existing index needs no rebuild."""
    from storage import records
    from storage.shard import pack_u32, uid_key

    store.deliver([ALICE], OLD_RAW, internal_date=1_700_000_000.0)
    (fresh,) = store.fetch(ALICE, "INBOX", ALL)
    assert fresh.envelope.subject_text == "\ud800 old"  # written as JSON escapes, and read back
    inbox = store.mailbox(ALICE, "INBOX")
    shard = store.shard(ALICE)
    with shard.read() as txn:
        base = records.get_message_file(txn, shard, inbox.id, 1).base
    old_mailbox = (f'{{"account":"{ALICE}","name":"INBOX","uidnext":2,"modseq":{inbox.highestmodseq},"exists":1,'
                   '"unseen":1,"size":313,"special_use":null,"keywords":[],"ix":0}')
    shard.write(lambda txn, batch: (
        txn.put(uid_key(inbox.id, 1), OLD_MESSAGE_RECORD.replace("BASE", base).encode(), db=shard.db["msgs"]),
        txn.put(pack_u32(inbox.id), old_mailbox.encode(), db=shard.db["mailboxes"]),
        txn.put(ALICE.encode(), b'{"used":313,"messages":1}', db=shard.db["accounts"])))
    (old,) = store.fetch(ALICE, "INBOX", ALL)
    # RFC 8514: an old record has no save date and answers its internal date instead;
    # RFC 8970: nor a preview, made on the first FETCH PREVIEW (tests/test_imap_preview.py)
    assert old.saved == 1_700_000_000.0 and fresh.saved > old.saved
    assert old.preview is None and fresh.preview == "hi"
    old.saved, old.preview = fresh.saved, "hi"
    assert old == fresh and store.read_message(old) == OLD_RAW
    assert store.mailbox(ALICE, "INBOX") == inbox and store.usage(ALICE).used == 313
    store.store_flags(ALICE, "INBOX", ALL, "add", ["\\Deleted"])
    assert store.expunge(ALICE, "INBOX") == [1] and store.usage(ALICE).messages == 0


def test_a_message_is_read_through_the_store_whatever_its_file_is_called_now(store):
    store.deliver([ALICE], message("one"))
    (info,) = store.fetch(ALICE, "INBOX", ALL)
    assert not hasattr(info, "path")  # the store finds the file; nobody else builds its path
    before = _file_of(store, "INBOX", 1)
    store.store_flags(ALICE, "INBOX", ALL, "add", ["\\Seen", "\\Deleted"])  # renames the file
    assert not before.exists() and store.read_message(info) == message("one")
    store.expunge(ALICE, "INBOX")
    with pytest.raises(StoreError):
        store.open_message(info)


def test_a_folded_boundary_parameter_is_unfolded():
    """RFC 5322 §2.2.3: boundary="foo<CRLF> bar" is "foo bar" (imaptest's fetch-body-mime):
    kept folded, the multipart was never split and became one opaque part."""
    from storage.mime import parse_message

    raw = (b'From: user@domain.org\r\nMime-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="foo\r\n'
           b' bar"\r\n\r\nprologue\r\n\r\n--foo bar\r\nContent-Type: text/x-myown; charset=us-ascii\r\n\r\nhello\r\n'
           b'\r\n--foo bar\r\nContent-Type: text/plain\r\n\r\nworld\r\n--foo bar--\r\n')
    structure = parse_message(raw).structure
    assert (structure.type, structure.subtype) == ("multipart", "mixed")
    assert [(p.type, p.subtype) for p in structure.parts] == [("text", "x-myown"), ("text", "plain")]
    assert ("boundary", "foo bar") in structure.params


def test_an_envelope_keeps_a_source_route_as_the_adl():
    """RFC 3501 §7.4.2: <@route:user@domain> is (NIL "@route" "user" "domain") (imaptest's
    fetch-envelope); the stdlib parser drops the route. One quoted in a display name is text."""
    from storage.mime import EnvelopeAddress, parse_message

    raw = (b'From: <@route:user@domain>\r\nTo: Real <@a.example,@b.example:u@d.example>, "x <@r:y@z>" <v@w>\r\n'
           b"\r\nbody\r\n")
    envelope = parse_message(raw).envelope
    assert envelope.from_ == (EnvelopeAddress(None, "@route", "user", "domain"),)
    assert envelope.to == (EnvelopeAddress("Real", "@a.example,@b.example", "u", "d.example"),
                           EnvelopeAddress("x <@r:y@z>", None, "v", "w"))
