"""Streamed, two-phase delivery (storage/delivery.py) on a real data dir: a message written
a chunk at a time is stored byte for byte and parsed from its file, its targets share one
file, an abort (or a failure) leaves nothing anywhere, and a retry reaches what failed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from storage import Delivery, DeliveryError, MailboxNotFoundError, StoreError, open_data_dir
from storage.check import check
from storage.store import Store

ALICE = "alice@example.test"
BOB = "bob@example.test"
ALL = [(1, 2**32 - 1)]


@pytest.fixture
def store(data_dir):
    with Store(open_data_dir(data_dir, 4)) as s:
        s.ensure_account(ALICE)
        s.ensure_account(BOB)
        yield s


def big_message(size: int, message_id: str = "<big@example.org>") -> bytes:
    """A multipart message of about `size` bytes: a text part and a base64 attachment."""
    head = (f"From: Bob <bob@example.org>\r\nTo: {ALICE}\r\nSubject: big one\r\nMessage-ID: {message_id}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            "--b\r\nContent-Type: text/plain\r\n\r\nthe searchable words\r\n"
            "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n").encode()
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3\r\n"
    return head + line * (size // len(line)) + b"--b--\r\n"


def write_in_pieces(delivery: Delivery, raw: bytes, sizes=(1, 7, 100, 4096, 65536)) -> None:
    at, i = 0, 0
    while at < len(raw):
        step = sizes[i % len(sizes)]
        delivery.write(raw[at:at + step])
        at, i = at + step, i + 1


def stat(store, info) -> os.stat_result:
    """The stored file's status, reached through the store (MessageInfo has no path)."""
    with store.open_message(info) as f:
        return os.fstat(f.fileno())


def writer_files(store: Store, *accounts: str) -> list[str]:
    return sorted(p.name for a in accounts for p in store.shard(a).writer.path.iterdir())


def test_a_message_written_in_many_chunks_is_stored_as_one_file_for_every_target(store):
    raw = big_message(1 << 20)
    with store.begin_delivery([ALICE, (ALICE, "Archive"), BOB], internal_date=1_700_000_000.0) as delivery:
        write_in_pieces(delivery, raw)
        assert len(writer_files(store, ALICE, BOB)) == 1  # the source, being written
        delivered = delivery.commit()
    assert sorted((d.account, d.mailbox, d.uid) for d in delivered) == [
        (ALICE, "Archive", 1), (ALICE, "INBOX", 1), (BOB, "INBOX", 1)]
    whole = store.deliver([ALICE], raw)  # the same bytes at once, for comparison
    infos = [store.fetch(d.account, d.mailbox, ALL)[0] for d in delivered]
    (reference,) = store.fetch(ALICE, "INBOX", [(whole[0].uid, whole[0].uid)])
    for info in infos:
        assert store.read_message(info) == raw and info.size == len(raw)
        assert (info.envelope, info.structure) == (reference.envelope, reference.structure)
        assert info.internal_date == 1_700_000_000.0
    # One file, linked into each mailbox (the shards share a file system here).
    assert len({stat(store, info).st_ino for info in infos}) == 1
    assert stat(store, infos[0]).st_mtime == 1_700_000_000.0  # for rebuild
    assert store.search(ALICE, "Archive", ("text", "searchable")) == [1]
    assert writer_files(store, ALICE, BOB) == [], "the source or a target's name was left behind"
    assert check(store, ALICE) == [] and check(store, BOB) == []


def test_an_aborted_delivery_leaves_nothing(store):
    before = store.mailbox(ALICE, "INBOX")
    delivery = store.begin_delivery([ALICE, BOB], dedupe_from=0)
    write_in_pieces(delivery, big_message(3 << 20))
    assert writer_files(store, ALICE, BOB) != []
    delivery.abort()
    assert writer_files(store, ALICE, BOB) == []
    with pytest.raises(StoreError):
        delivery.write(b"more")
    with pytest.raises(StoreError):
        delivery.commit()
    after = store.mailbox(ALICE, "INBOX")
    assert (after.exists, after.uidnext) == (before.exists, before.uidnext)
    assert (store.usage(ALICE).used, store.usage(ALICE).messages) == (0, 0)
    assert check(store, ALICE) == [] and check(store, BOB) == []


def test_a_delivery_closed_without_commit_is_aborted(store):
    with store.begin_delivery([ALICE]) as delivery:
        delivery.write(b"Subject: never\r\n\r\nsent\r\n")
    assert writer_files(store, ALICE) == []
    assert store.mailbox(ALICE, "INBOX").exists == 0


def test_a_crash_before_commit_leaves_only_what_recovery_discards(data_dir):
    """The source is in the writer directory under a name the index does not know: the next
    process to open the shard (after this one died: its lock released) discards it."""
    store = Store(open_data_dir(data_dir, 4))
    store.ensure_account(ALICE)
    delivery = store.begin_delivery([ALICE])
    write_in_pieces(delivery, big_message(300_000))
    writer = store.shard(ALICE).writer.path
    assert len(list(writer.iterdir())) == 1
    # Dying here: the file stays open, the writer's lock is released (store.close does).
    store.close()
    with Store(open_data_dir(data_dir, 4)) as again:
        again.recover()
        assert not writer.exists()
        assert again.mailbox(ALICE, "INBOX").exists == 0
        assert check(again, ALICE) == []


def test_a_message_streamed_twice_is_stored_once(store):
    """The dedupe key is computed from the chunks as they pass: the same bytes from the
    sender under other trace headers are a duplicate, however they were cut."""
    sent = big_message(400_000, "<twice@example.org>")
    for trace, sizes in ((b"Received: by mx id 1\r\n", (3, 50_000)), (b"Received: by mx id 22\r\n", (65536,))):
        with store.begin_delivery([ALICE], dedupe_from=len(trace)) as delivery:
            delivery.write(trace)
            write_in_pieces(delivery, sent, sizes)
            (delivered,) = delivery.commit()
    assert (delivered.uid, delivered.duplicate) == (1, True)
    assert store.mailbox(ALICE, "INBOX").exists == 1
    assert store.deliver([ALICE], b"Received: x\r\n" + sent, dedupe_from=13)[0].duplicate  # and whole


def test_a_delivery_begun_again_from_its_bytes_and_terms_keeps_its_dedupe_key(store):
    """mtad's writer process (mtad/writer.py) begins the delivery again from in_memory() and
    terms(): the policy's verdict, prepended after the key's bytes went by, differs at each
    try (a DNS answer that timed out once), and must not count in the key. Once it did: the
    crash test stored 419 of 10,000 messages twice."""
    sent = b"Message-ID: <again@example.org>\r\nSubject: again\r\n\r\nbody\r\n"
    for trace, verdict in ((b"Received: by mx id 1\r\n", b"X-Verdict: dmarc=temperror\r\n"),
                           (b"Received: by mx id 22\r\n", b"X-Verdict: dmarc=none\r\n")):
        with store.begin_delivery([ALICE], dedupe_from=len(trace)) as taken:
            taken.write(trace + sent)
            taken.prepend(verdict)
            raw, terms = taken.in_memory(), taken.terms()
        assert raw == verdict + trace + sent
        with store.begin_delivery([ALICE], dedupe_from=terms["dedupe_from"],
                                  internal_date=terms["internal_date"]) as again:
            again.write(raw)
            (delivered,) = again.commit()
    assert (delivered.uid, delivered.duplicate) == (1, True)
    assert store.mailbox(ALICE, "INBOX").exists == 1


def test_a_small_message_is_written_for_each_target_from_memory(store):
    """Up to IN_MEMORY bytes, each target's file is written from the bytes held: no target's
    committer waits for another shard's to make the source."""
    raw = big_message(4096)
    with store.begin_delivery([ALICE, (ALICE, "Archive"), BOB], internal_date=1_700_000_000.0) as delivery:
        write_in_pieces(delivery, raw)
        assert writer_files(store, ALICE, BOB) == []  # nothing on disk before the commit
        delivered = delivery.commit()
    infos = [store.fetch(d.account, d.mailbox, ALL)[0] for d in delivered]
    assert len({stat(store, info).st_ino for info in infos}) == 3
    for info in infos:
        assert store.read_message(info) == raw
        assert stat(store, info).st_mtime == 1_700_000_000.0
    assert writer_files(store, ALICE, BOB) == []
    assert check(store, ALICE) == [] and check(store, BOB) == []


def test_failed_targets_do_not_hold_the_shards_readers(store):
    """A failed target's error is kept for the reply; its traceback once kept the failed
    lookup's read transaction, and with it an LMDB reader slot, until the garbage collector
    came by: a delivery to 600 missing mailboxes held all 1,024 of the shard's slots, and
    every account of it got ReadersFullError (found by an attack on the writer's socket)."""
    for round in range(2):
        with store.begin_delivery([(ALICE, f"Missing{n}") for n in range(600)]) as delivery:
            delivery.write(f"Subject: round {round}\r\n\r\nx\r\n".encode())
            with pytest.raises(DeliveryError) as failure:
                delivery.commit()
        assert {type(error) for _, error in failure.value.errors} == {MailboxNotFoundError}
    (copy,) = store.deliver([ALICE], b"Subject: after\r\n\r\nx\r\n")
    assert copy.uid == 1


def test_a_failed_target_can_be_retried_with_the_same_bytes(store):
    raw = big_message(100_000)  # over IN_MEMORY: its targets are links to one file
    with store.begin_delivery([ALICE, (BOB, "Later")]) as delivery:
        write_in_pieces(delivery, raw)
        with pytest.raises(DeliveryError) as failure:
            delivery.commit()
        assert [(d.account, d.mailbox) for d in failure.value.delivered] == [(ALICE, "INBOX")]
        assert isinstance(failure.value.errors[0][1], MailboxNotFoundError)
        store.create_mailbox(BOB, "Later")
        (again,) = delivery.retry([(BOB, "Later")])
    assert (again.account, again.mailbox, again.uid) == (BOB, "Later", 1)
    (info,) = store.fetch(BOB, "Later", ALL)
    assert store.read_message(info) == raw
    # The source had become alice's copy (in her cur/): the retry linked the open file.
    (first,) = store.fetch(ALICE, "INBOX", ALL)
    assert stat(store, info).st_ino == stat(store, first).st_ino
    assert writer_files(store, ALICE, BOB) == []


def test_a_message_for_no_target_is_counted_and_stored_nowhere(store, data_dir):
    with store.begin_delivery([]) as delivery:
        delivery.write(b"Subject: x\r\n\r\ny\r\n")
        assert delivery.commit() == []
    assert delivery.size == 17
    shards = Path(data_dir, "shards")
    assert not list(shards.glob("*/tmp/*/*"))


# -- what the policy chain asks of a delivery before its commit (policy/decide.py) ----------

@pytest.mark.parametrize("size", [100, 60_000, 300_000])
def test_prepend_puts_header_fields_before_the_message_in_memory_or_in_its_file(store, size):
    raw = big_message(size)
    head = b"Authentication-Results: mail.example.test; spf=pass\r\n"
    with store.begin_delivery([ALICE]) as delivery:
        for start in range(0, len(raw), 7000):
            delivery.write(raw[start:start + 7000])
        delivery.prepend(head)
        assert delivery.size == len(head) + len(raw)
        assert b"".join(delivery.read(4096)) == head + raw
        (delivered,) = delivery.commit()
    (info,) = store.fetch(ALICE, "INBOX", [(delivered.uid, delivered.uid)])
    assert store.read_message(info) == head + raw
    assert info.size == len(head) + len(raw)
    writer = store.shard(ALICE).writer.path
    assert not [p for p in writer.iterdir() if p.name.endswith(".prepend")]


def test_read_gives_back_what_was_written_before_the_commit(store):
    raw = big_message(200_000)
    with store.begin_delivery([ALICE, BOB]) as delivery:
        delivery.write(raw[:50_000])
        assert b"".join(delivery.read()) == raw[:50_000]  # still in memory
        delivery.write(raw[50_000:])
        pieces = list(delivery.read(10_000))
        assert max(map(len, pieces)) == 10_000 and b"".join(pieces) == raw
        delivery.commit()


def test_send_to_junk_delivers_every_copy_to_each_accounts_junk_mailbox(store):
    store.rename_mailbox(BOB, "Junk", "Spam")  # the \Junk attribute follows the rename
    assert store.junk_mailbox(ALICE) == "Junk"
    assert store.junk_mailbox(BOB) == "Spam"
    raw = big_message(1000)
    with store.begin_delivery([ALICE, (BOB, "INBOX"), (BOB, "Archive")]) as delivery:
        delivery.write(raw)
        delivery.send_to_each({ALICE: store.junk_mailbox(ALICE), BOB: store.junk_mailbox(BOB)})
        delivered = delivery.commit()
    assert sorted((d.account, d.mailbox) for d in delivered) == [(ALICE, "Junk"), (BOB, "Spam")]
    assert store.uids(ALICE, "INBOX")[1] == [] and len(store.uids(ALICE, "Junk")[1]) == 1


def test_junk_mailbox_is_made_when_the_user_deleted_it(store):
    store.delete_mailbox(ALICE, "Junk")
    assert store.junk_mailbox(ALICE, "Spam") == "Spam"
    assert store.mailbox(ALICE, "Spam").special_use == "\\Junk"


def test_messages_to_every_shard_from_many_threads_are_each_stored_once(data_dir):
    """Commits of many shards at once share a process's commit slots (Store.commit_slots):
    eight threads each deliver to sixteen accounts, one in each shard, small messages and big
    ones (whose fsync runs before a slot is taken); every copy is stored once, under UIDs
    1..N with none missing, and nothing waits forever for a slot."""
    store = Store(open_data_dir(data_dir, 16))
    hung = True  # then the store is left open: its close would wait for the stuck committers
    try:
        by_shard: dict[int, str] = {}
        n = 0
        while len(by_shard) < 16:
            by_shard.setdefault(store.shard_number(f"user{n}@example.test"), f"user{n}@example.test")
            n += 1
        accounts = list(by_shard.values())
        for account in accounts:
            store.ensure_account(account)
        errors: list[BaseException] = []

        def send(worker: int) -> None:
            try:
                for i in range(12):
                    raw = big_message(200_000 if i % 4 == 0 else 3000, f"<{worker}.{i}@example.org>")
                    store.deliver(accounts, raw)
            except BaseException as e:  # noqa: BLE001 - reported by the test's thread
                errors.append(e)

        threads = [threading.Thread(target=send, args=(w,), daemon=True) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        hung = any(thread.is_alive() for thread in threads)
        assert not hung
        assert errors == []
        for account in accounts:
            _, uids, _ = store.uids(account, "INBOX")
            assert uids == list(range(1, 8 * 12 + 1))
            assert check(store, account) == []
    finally:
        if not hung:
            store.close()
