"""`postroom queue ...` as a sysadmin runs it: the installed command against a data dir whose
queue this test fills through the storage API, on a live server too. Exit 0 on success,
1 with one line for an unknown id, 2 on a usage error; `--json` output parses."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import refusing_port, start_daemon
from storage import DEFERRED, DELIVERED, Queue, QueuedRecipient, QueueEnvelope, Result, open_data_dir

SHARDS = 4  # as conftest's write_config


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def unknown(result, qid: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [f"postroom: no such message in the queue: {qid}"]
    assert result.stdout == ""


@pytest.fixture
def queued(data_dir: Path):
    """Two messages: one plain and due, one with DSN parameters, deferred, with a recipient
    already delivered. The Queue stays open (another process, as mtad would be)."""
    queue = Queue(open_data_dir(data_dir, SHARDS))
    with queue.begin(QueueEnvelope("alice@example.test", (QueuedRecipient("bob@remote.test"),),
                                   user="alice@example.test")) as entry:
        entry.write(b"Subject: one\r\n\r\nbody\r\n")
        first = entry.commit()
    env = QueueEnvelope("", (QueuedRecipient("carol@remote.test", orcpt="rfc822;carol@alias.test",
                                             notify=("SUCCESS", "FAILURE")),
                             QueuedRecipient("dave@remote.test")),
                        envid="ENV-2", ret="HDRS", origin="dsn")
    with queue.begin(env) as entry:
        entry.write(b"Subject: two\r\n\r\n" + b"x" * 100_000 + b"\r\n")
        second = entry.commit(b"X-Prepended: yes\r\n")
    queue.record(second, [Result("carol@remote.test", DEFERRED, "451 4.7.1 greylisted", "mx.remote.test",
                                 time.time() + 3600),
                          Result("dave@remote.test", DELIVERED, "250 2.0.0 ok", "mx.remote.test")])
    yield queue, first, second
    queue.close()


def test_list_of_an_empty_queue(cli):
    assert ok(cli("queue", "list")) == ""
    assert json.loads(ok(cli("queue", "list", "--json"))) == {"runner_pid": None, "messages": []}


def test_list_one_line_per_message_oldest_first(cli, queued):
    _, first, second = queued
    lines = [line.split("\t") for line in ok(cli("queue", "list")).splitlines()]
    assert [fields[0] for fields in lines] == [first, second]
    assert lines[0][2:] == [str(len(b"Subject: one\r\n\r\nbody\r\n")), "alice@example.test", "queued",
                            "to=bob@remote.test"]
    assert lines[1][3:] == ["<>", "deferred", "to=carol@remote.test"]
    assert lines[1][1].endswith("Z")


def test_list_json_parses_and_says_everything(cli, queued):
    queue, first, second = queued
    listed = json.loads(ok(cli("queue", "list", "--json")))
    assert listed["runner_pid"] is None
    assert [m["id"] for m in listed["messages"]] == [first, second]
    two = listed["messages"][1]
    assert (two["sender"], two["envid"], two["ret"], two["origin"], two["held"]) == ("", "ENV-2", "HDRS", "dsn", False)
    assert two["size"] == queue.get(second).size == len(queue.read(second))
    carol, dave = two["recipients"]
    assert (carol["state"], carol["attempts"], carol["last_reply"], carol["remote_mta"]) == \
        ("deferred", 1, "451 4.7.1 greylisted", "mx.remote.test")
    assert (carol["notify"], carol["orcpt"]) == (["SUCCESS", "FAILURE"], "rfc822;carol@alias.test")
    assert carol["next_attempt"].endswith("Z")
    assert (dave["state"], dave["next_attempt"]) == ("delivered", None)
    # Who runs deliveries: the pid of the runner lock's holder.
    with queue.runner_lock() as lock:
        assert lock.acquire()
        assert json.loads(ok(cli("queue", "list", "--json")))["runner_pid"] == os.getpid()


def test_show_prints_envelope_and_recipients(cli, queued):
    _, first, second = queued
    text = ok(cli("queue", "show", second.lower()))  # ids are matched in any case
    assert f"id: {second}\n" in text and "sender: <>\n" in text and "envid: ENV-2\n" in text
    assert "recipient: carol@remote.test\n  state: deferred, 1 attempt(s)\n" in text
    assert "  last reply: 451 4.7.1 greylisted (from mx.remote.test)\n" in text
    assert "  notify: SUCCESS,FAILURE\n  orcpt: rfc822;carol@alias.test\n" in text
    assert "recipient: dave@remote.test\n  state: delivered, 1 attempt(s)\n" in text
    shown = json.loads(ok(cli("queue", "show", first, "--json")))
    assert (shown["id"], shown["user"], shown["recipients"][0]["address"]) == (first, "alice@example.test",
                                                                               "bob@remote.test")


def test_hold_release_flush_remove(cli, queued, data_dir):
    queue, first, second = queued
    assert ok(cli("queue", "hold", second)) == f"held {second}\n"
    assert queue.get(second).held
    assert ok(cli("queue", "list")).splitlines()[1].split("\t")[4] == "held"
    assert [m.id for m in queue.due(time.time() + 7200, 10)] == [first]
    assert ok(cli("queue", "flush", second)) == f"flushed {second}: it is on hold, and goes once released\n"
    assert ok(cli("queue", "release", second)) == f"released {second}\n"
    message = queue.get(second)
    assert not message.held and message.pending[0].next_attempt <= time.time()
    assert ok(cli("queue", "flush")) == "flushed 2 message(s)\n"
    assert ok(cli("queue", "remove", first)) == f"removed {first}\n"
    assert queue.get(first) is None and not (data_dir / "queue" / "msg" / first).exists()
    assert [line.split("\t")[0] for line in ok(cli("queue", "list")).splitlines()] == [second]
    audit = (data_dir / "audit.log").read_text()
    for event in ("queue.held", "queue.released", "queue.flushed", "queue.removed"):
        assert f"event={event}" in audit


def test_unknown_ids_are_one_line_and_exit_1(cli, queued):
    _, first, _ = queued
    for action in ("show", "flush", "remove", "hold", "release"):
        unknown(cli("queue", action, "0123456789ABCDEF"), "0123456789ABCDEF")
        unknown(cli("queue", action, "no/such id"), "no/such id")
    assert ok(cli("queue", "remove", first)) == f"removed {first}\n"
    unknown(cli("queue", "remove", first), first)  # twice: gone the second time
    for args in (("queue",), ("queue", "show"), ("queue", "hold"), ("queue", "purge")):
        result = cli(*args)
        assert result.returncode == 2 and "usage:" in result.stderr


def test_the_commands_work_beside_a_running_server(write_config, tmp_path, cli, data_dir):
    # The server's delivery runner takes the message at once: remote.test is routed to a
    # port nobody listens on, so it stays in the queue, deferred, for the commands to find.
    path = write_config(**{"outbound.routes": {'"remote.test"': f"127.0.0.1:{refusing_port()}"}})
    daemon = start_daemon(path, tmp_path)
    queue = Queue(open_data_dir(data_dir, SHARDS))
    try:
        with queue.begin(QueueEnvelope("alice@example.test", (QueuedRecipient("bob@remote.test"),))) as entry:
            entry.write(b"Subject: live\r\n\r\nbody\r\n")
            qid = entry.commit()
        assert ok(cli("queue", "list", config=path)).split("\t")[0] == qid
        assert ok(cli("queue", "hold", qid, config=path)) == f"held {qid}\n"
        assert queue.get(qid).held
        assert ok(cli("queue", "remove", qid, config=path)) == f"removed {qid}\n"
        assert queue.list() == []
    finally:
        queue.close()
        assert daemon.stop() == 0, daemon.stderr()
