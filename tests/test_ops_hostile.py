"""Issue 16's operations commands on a bad day (session 9's attack): a backup killed on the
way, `postroom status` against a DNS server that hangs or lies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from conftest import POSTROOM, add_accounts, write_config_file
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery staple"


def test_a_backup_killed_on_the_way_leaves_no_data_dir_to_restore(tmp_path):
    """Before: DIR/data was the copy from the start. Killed after its first shard, it held
    the accounts and one shard, and `store check` on it said "0 problem(s)" (it makes the
    missing shards again, empty): restored by docs/backups.md, every other shard's mail was
    gone without a word."""
    shards = 8
    config = write_config_file(tmp_path / "postroom.toml", tmp_path / "var", storage={"shards": shards})
    users = [f"user{i}@example.test" for i in range(shards)]
    add_accounts(config, PASSWORD, users=users)
    with Store(open_data_dir(tmp_path / "var", shards)) as store:
        for user in users:
            for i in range(5):
                store.append(user, "INBOX", f"Subject: {i}\r\n\r\nmail {i} of {user}\r\n".encode())
    # What [metrics] writes while the daemons run: files named by their pids.
    (tmp_path / "var" / "metrics").mkdir()
    (tmp_path / "var" / "metrics" / f"counter_{os.getpid()}.db").write_bytes(b"\0" * 4096)
    target = tmp_path / "backup"
    backup = subprocess.Popen([POSTROOM, "--config", str(config), "backup", str(target)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = backup.stderr.readline()
        assert first.startswith("postroom backup: shard 0:"), first
        backup.send_signal(signal.SIGKILL)
        backup.wait(30)
    finally:
        backup.kill()
        backup.communicate()
    assert backup.returncode == -signal.SIGKILL  # killed, not finished
    assert not (target / "data").exists() and not (target / "backup.json").exists()
    assert (target / "data.unfinished").is_dir()  # what there is, clearly named

    finished = tmp_path / "finished"
    done = subprocess.run([POSTROOM, "--config", str(config), "backup", str(finished)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in finished.iterdir()) == ["backup.json", "data", "postroom.toml", "tls"]
    assert not (finished / "data" / "metrics").exists()  # the live processes' metric files, by pid
    assert json.loads((finished / "backup.json").read_text())["messages"] == 5 * shards
    assert len(list((finished / "data" / "shards").rglob("cur/*"))) == 5 * shards


def test_a_manager_that_does_not_read_never_blocks_the_daemon_s_loop(tmp_path):
    """The watchdog's WATCHDOG=1 is sent from the event loop. Before: a blocking send, and
    a manager that did not read its socket (serve stalled or stopped) froze the daemon's
    loop, every session with it, once 10 pings (net.unix.max_dgram_qlen) were queued."""
    import socket
    import threading

    from postroom.notify import notify

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)  # and never read
        sent = []

        def ping() -> None:
            for _ in range(100):
                notify("WATCHDOG=1", path, drop_when_full=True)
                sent.append(1)

        thread = threading.Thread(target=ping, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive() and len(sent) == 100
        assert manager.recv(100) == b"WATCHDOG=1"  # what fitted in the queue was sent

        # A state change waits for room instead: READY=1 behind a queue full of pings is
        # delivered once the manager reads again, not dropped.
        notify("WATCHDOG=1", path, drop_when_full=True)  # the queue is full again
        ready = threading.Thread(target=notify, args=("READY=1", path), daemon=True)
        ready.start()
        time.sleep(0.2)
        assert ready.is_alive()  # waiting for room
        manager.settimeout(5)
        got = []
        while b"READY=1" not in got and len(got) < 1000:
            got.append(manager.recv(100))
        ready.join(5)
        assert not ready.is_alive() and got[-1] == b"READY=1", got


# -- the metrics endpoint ---------------------------------------------------------------------------------


def test_idle_and_flooding_clients_of_the_metrics_endpoint_hold_no_thread_for_long(monkeypatch, capsys):
    """The endpoint answers in serve's process. Before: each connection had a thread with
    no timeout, so idle connections (300 in the attack) were as many threads in serve for
    as long as the client liked, and nothing bounded their number; a client that timed out
    or reset was a traceback on serve's stderr (the journal), one per connection."""
    import socket
    import threading
    import time
    import urllib.request

    from prometheus_client import CollectorRegistry

    from conftest import free_port
    from postroom import metrics

    monkeypatch.setattr(metrics, "CLIENT_TIMEOUT", 0.5, raising=False)
    port = free_port()
    before = threading.active_count()
    listener = metrics.MetricsListener([("127.0.0.1", port)], CollectorRegistry())
    listener.start()
    idle = []
    try:
        for _ in range(40):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            idle[-1].sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        time.sleep(0.2)
        assert threading.active_count() - before <= 1 + getattr(metrics, "CLIENTS", 40) < 40, \
            threading.active_count() - before
        for sock in idle:  # closed unanswered, or by the timeout (after a 408, or not)
            sock.settimeout(3)
            while sock.recv(4096):
                pass
        deadline = time.monotonic() + 5
        while threading.active_count() > before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before + 1  # the listener's own thread
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
        assert "Traceback" not in capsys.readouterr().err
    finally:
        for sock in idle:
            sock.close()
        listener.close()
