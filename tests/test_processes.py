"""`postroom serve` as a supervisor: mtad, imapd and pop3d each in a process of its own.

What the process model must give (each found by attacking the one-process server): a
CPU-heavy IMAP command never stalls SMTP; children never outlive serve, even after SIGKILL;
the current directory never shadows the package in a child; a second instance on the same
data dir refuses to start, with one line that says who holds it.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, CHEAP_HASHER, POSTROOM, add_accounts, start_daemon
from procs import processes
from storage import Accounts, open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery"


def add_alice(config: Path) -> None:
    add_accounts(config, PASSWORD, ["alice@example.test"])


def child_of(daemon, name: str) -> int:
    """The pid of serve's child process that runs `name` (each names itself: ps, pgrep)."""
    (pid,) = [pid for pid, p in processes().items() if p.parent == daemon.process.pid and p.name == name]
    return pid


def descendants(pid: int) -> set[int]:
    table = processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, p in table.items() if p.parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def send(daemon, subject: str) -> None:
    address = daemon.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("s@example.org", ["alice@example.test"], f"Subject: {subject}\r\n\r\nx\r\n".encode())


def subjects(data_dir: Path) -> list[bytes]:
    with Store(open_data_dir(data_dir, 4)) as store:
        messages = [store.read_message(m) for m in store.fetch("alice@example.test", "INBOX", [(1, 2**32 - 1)])]
    return [line for m in messages for line in m.split(b"\r\n") if line.startswith(b"Subject: ")]


def test_serve_runs_each_daemon_in_a_process_of_its_own(daemon):
    children = sorted(p.name for p in processes().values() if p.parent == daemon.process.pid)
    assert children == ["imapd", "mtad", "pop3d"]


@pytest.mark.serial  # SMTP answers within 100 ms: not a figure to take beside other tests
def test_a_cpu_heavy_imap_command_does_not_stall_smtp(write_config, tmp_path, data_dir):
    """An IMAP client keeps imapd busy with FETCHes of a maximal command line (every item
    rendered for every message, on imapd's event loop): SMTP answers as fast as ever."""
    daemon = start_daemon(write_config(imap={"plaintext_auth": True}), tmp_path)
    try:
        with Accounts(data_dir / "accounts.lmdb", hasher=CHEAP_HASHER) as accounts:
            accounts.add_domain("example.test")
            accounts.add_user("alice@example.test", PASSWORD)
        with Store(open_data_dir(data_dir, 4)) as store:
            for i in range(250):
                store.deliver(["alice@example.test"], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())
        imap_address, smtp_address = daemon.listen("imap.listen"), daemon.listen("smtp.listen")
        imap = socket.create_connection((imap_address.host, imap_address.port), timeout=30)
        smtp = socket.create_connection((smtp_address.host, smtp_address.port), timeout=30)
        with imap, smtp:
            def command(line: bytes, tag: bytes) -> None:
                imap.sendall(tag + b" " + line + b"\r\n")
                tail = b"\r\n"  # the end of what came so far: the reply is megabytes long
                while not (tail.endswith(b"\r\n") and tail[:-2].rsplit(b"\r\n", 1)[-1].startswith(tag + b" ")):
                    chunk = imap.recv(1 << 20)
                    assert chunk, tail
                    tail = (tail + chunk)[-1000:]
                assert tail[:-2].rsplit(b"\r\n", 1)[-1].startswith(tag + b" OK"), tail

            imap.recv(1000)
            command(b'LOGIN alice@example.test "' + PASSWORD.encode() + b'"', b"l")
            command(b"SELECT INBOX", b"s")
            fetch = b"FETCH 1:* (" + b" ".join([b"FLAGS"] * 10_900) + b")"
            assert len(fetch) < 64 * 1024  # within imapd's line limit
            smtp.recv(1000)
            smtp.sendall(b"EHLO client.example.org\r\n")
            said = b""
            while b"\r\n250 " not in said:
                said += smtp.recv(1000)

            imap_times: list[float] = []
            stop = threading.Event()

            def keep_imapd_busy() -> None:
                n = 0
                while not stop.is_set():
                    started = time.monotonic()
                    n += 1
                    command(fetch, f"f{n}".encode())
                    imap_times.append(time.monotonic() - started)

            busy = threading.Thread(target=keep_imapd_busy)
            busy.start()
            try:
                time.sleep(0.2)
                noops = []
                for _ in range(10):
                    started = time.monotonic()
                    smtp.sendall(b"NOOP\r\n")
                    assert smtp.recv(100) == b"250 2.0.0 OK\r\n"
                    noops.append(time.monotonic() - started)
                    time.sleep(0.1)
            finally:
                stop.set()
                busy.join(60)
        assert imap_times and min(imap_times) > 0.3, f"imapd was not kept busy: {imap_times}"
        # One sample may meet a busy machine; a stalled loop would delay most of them.
        assert sorted(noops)[-2] < 0.1, f"SMTP NOOP took {[round(t, 3) for t in noops]} s"
    finally:
        assert daemon.stop() == 0


def test_children_die_with_serve_even_after_sigkill(write_config, tmp_path):
    path = write_config(smtp={"workers": 2, "max_connections_per_ip": 200})
    daemon = start_daemon(path, tmp_path)
    children = descendants(daemon.process.pid)
    try:
        assert children  # here: mtad, its extra worker, imapd and pop3d
        daemon.process.kill()
        daemon.process.wait(10)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if alive(pid)], [processes().get(pid) for pid in children]
    finally:
        daemon.process.kill()
        for pid in children:  # what the test started, if it outlived serve
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    address = daemon.listen("smtp.listen")
    with socket.socket() as sock:  # no SO_REUSEPORT: free only if nobody listens there
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen()


def test_after_a_kill_of_serve_a_new_one_takes_over_once_the_old_daemons_finish(write_config, tmp_path):
    """serve killed with -9 while a client is in the middle of a message: its mtad, told to
    stop, finishes that message (250) within stop_grace; a serve started meanwhile waits for
    it and then serves (found by an attack: it exited 1 naming the old mtad's pid, and
    nothing listened on port 25)."""
    config = write_config("grace.toml", server={"stop_grace": "4s"})
    add_alice(config)
    old = start_daemon(config, tmp_path)
    address = old.listen("smtp.listen")
    client = smtplib.SMTP(address.host, address.port, timeout=30)
    client.ehlo("client.example.org")
    client.mail("s@example.org")
    client.rcpt("alice@example.test")
    client.putcmd("data")
    assert client.getreply()[0] == 354
    client.send(b"Subject: across the takeover\r\n\r\nfirst half\r\n")
    old.process.kill()
    old.process.wait()
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    started: list = []
    starting = threading.Thread(target=lambda: started.append(start_daemon(config, new_dir)))
    starting.start()
    # The new serve waits on the lock the old mtad (still finishing this session) holds.
    log, deadline = new_dir / "serve.err", time.monotonic() + 30
    while time.monotonic() < deadline and not (log.exists() and b"event=lock_wait lock=mtad" in log.read_bytes()):
        time.sleep(0.02)
    client.send(b"second half\r\n.\r\n")
    assert client.getreply()[0] == 250
    client.close()
    starting.join(60)
    assert started, "the new serve did not start"
    new = started[0]
    try:
        assert "event=lock_wait lock=mtad" in new.stderr()
        with smtplib.SMTP(address.host, address.port, timeout=30) as again:
            assert again.sendmail("s@example.org", ["alice@example.test"], b"Subject: after\r\n\r\nx\r\n") == {}
        with Store(open_data_dir(new.config.server.data_dir, 4)) as store:
            subjects = [m.envelope.subject for m in store.fetch("alice@example.test", "INBOX", [(1, 2**32 - 1)])]
        assert subjects == ["across the takeover", "after"]
    finally:
        assert new.stop() == 0


def test_a_child_that_dies_is_started_again(daemon):
    imapd = child_of(daemon, "imapd")
    os.kill(imapd, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while "event=worker_restarted worker=imapd" not in daemon.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"event=worker_restarted worker=imapd old_pid={imapd} code=-9" in daemon.stderr()
    wait_for_greeting(daemon, "imap.listen", b"* OK")
    # Started again as a command: never with the current directory on sys.path.
    assert b"\0-P\0" in processes()[child_of(daemon, "imapd")].cmdline


def test_a_child_in_a_crash_loop_is_never_left_down(daemon):
    """Killed again each time it is back, six times in a minute: it is still started again,
    later each time (found by an attack: it was left down for good while serve looked
    healthy, and port 25 refused every connection)."""
    for kill in range(7):
        mtad = child_of(daemon, "mtad")
        os.kill(mtad, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.1)
            children = [p.name for p in processes().values() if p.parent == daemon.process.pid]
            if "mtad" in children and f"old_pid={mtad} " in daemon.stderr():
                break
        assert f"event=worker_restarted worker=mtad old_pid={mtad} " in daemon.stderr(), f"kill {kill + 1}"
        wait_for_greeting(daemon, "smtp.listen", b"220 ")
    loops = [line for line in daemon.stderr().splitlines() if "event=worker_crash_loop worker=mtad" in line]
    assert [line.split("retry_in=")[1].split()[0] for line in loops] == ["2.0", "4.0"]


def test_a_child_that_cannot_start_again_says_why_and_is_retried(daemon):
    """Its port taken while it was down: the reason is logged (serve's terminal has long
    printed its table), and the next restart, the port free again, works."""
    address = daemon.listen("pop3.listen")
    os.kill(child_of(daemon, "pop3d"), signal.SIGKILL)
    deadline = time.monotonic() + 15
    with socket.socket() as taken:
        while True:  # the port as soon as the killed pop3d has let go of it
            try:
                taken.bind((address.host, address.port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        taken.listen()
        while "event=worker_start_failed" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert ('event=worker_start_failed worker=pop3d' in daemon.stderr() and
            f'reason="POP3 (STLS): cannot listen on {address}: Address already in use"' in daemon.stderr())
    wait_for_greeting(daemon, "pop3.listen", b"+OK")


def wait_for_greeting(daemon, listener: str, greeting: bytes) -> None:
    address = daemon.listen(listener)
    deadline = time.monotonic() + 15
    while True:  # listening again once it has started
        try:
            with socket.create_connection((address.host, address.port), timeout=5) as sock:
                assert sock.recv(100).startswith(greeting)
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_the_current_directory_never_shadows_the_package(write_config, tmp_path, data_dir):
    """Started from a directory that holds a postroom/ package (/etc/postroom is one), every
    process still imports the installed one."""
    workdir = tmp_path / "etc"
    marker = tmp_path / "imported"
    for package in ("postroom", "mtad", "storage", "conf"):
        (workdir / package).mkdir(parents=True)
        (workdir / package / "__init__.py").write_text(
            f"open({str(marker)!r}, 'a').write({package!r} + '\\n')\nraise ImportError('shadowed')\n")
        (workdir / package / "__main__.py").write_text("raise SystemExit('shadowed')\n")
    path = write_config(smtp={"workers": 2, "max_connections_per_ip": 200})
    add_alice(path)
    daemon = start_daemon(path, workdir)
    try:
        # Serve's children are forked from it; a child that dies is started again as a
        # command (like mtad's extra worker): that one too from this directory.
        os.kill(child_of(daemon, "pop3d"), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while "event=worker_restarted worker=pop3d" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_for_greeting(daemon, "pop3.listen", b"+OK")
        for i in range(4):
            send(daemon, f"m{i}")
        assert len(subjects(data_dir)) == 4
    finally:
        assert daemon.stop() == 0
    assert not marker.exists(), marker.read_text()
    log = daemon.stderr()
    assert "Traceback" not in log and log.count("event=worker_restarted") == 1, log


def test_a_second_serve_on_the_same_data_dir_refuses_to_start(write_config, tmp_path, data_dir):
    path = write_config()
    add_alice(path)
    first = start_daemon(path, tmp_path)
    try:
        second = subprocess.run([POSTROOM, "--config", str(path), "serve"], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
        assert second.returncode == 1
        assert second.stderr == (f"postroom: data dir {data_dir} is in use by another postroom serve "
                                 f"(pid {first.process.pid})\n")
        # An mtad of its own beside serve's would share port 25 unnoticed (SO_REUSEPORT).
        mtad = child_of(first, "mtad")
        alone = subprocess.run([str(BIN / "mtad"), "--config", str(path)], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
        assert alone.returncode == 1
        assert alone.stderr == f"mtad: data dir {data_dir} is in use by another mtad (pid {mtad})\n"
        send(first, "still working")
        assert subjects(data_dir) == [b"Subject: still working"]
    finally:
        assert first.stop() == 0


def test_a_daemon_that_cannot_start_stops_serve_with_one_line(write_config, tmp_path):
    path = write_config()
    from conf import load

    address = load(path).pop3.listen[0]
    with socket.socket() as taken:
        taken.bind((address.host, address.port))
        taken.listen()
        result = subprocess.run([POSTROOM, "--config", str(path), "serve"], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (f"postroom: POP3 (STLS): cannot listen on {address}: "
                                              "Address already in use")
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith("ts=")] == \
        [result.stderr.splitlines()[-1]]


@pytest.mark.parametrize("name", ["imapd", "pop3d"])
def test_the_single_daemon_commands_refuse_a_second_instance(write_config, tmp_path, data_dir, name):
    path = write_config()
    first = subprocess.Popen([str(BIN / name), "--config", str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first.stdout.readline()  # the table's first line: listening
        second = subprocess.run([str(BIN / name), "--config", str(path)], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
        assert second.returncode == 1
        assert second.stderr == f"{name}: data dir {data_dir} is in use by another {name} (pid {first.pid})\n"
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0


def test_a_child_whose_supervisor_is_gone_before_it_starts_exits(write_config, tmp_path):
    """The supervisor may die between starting a child and the child's PR_SET_PDEATHSIG:
    the child then finds another parent than the one it was told, and leaves."""
    import sys

    path = write_config()
    started = time.monotonic()
    orphan = subprocess.run([sys.executable, "-P", "-m", "postroom", "--config", str(path), "serve",
                             "--daemon", "imapd"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "POSTROOM_SUPERVISOR": "1"})  # not its parent
    assert orphan.returncode == 1 and orphan.stderr == "", orphan.stderr
    assert time.monotonic() - started < 10
