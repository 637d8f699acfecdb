"""[smtp] writer (mtad/writer.py): the MX workers hand their small deliveries to one writer
process, which commits them; a 250 still means durable, a writer gone means 451 4.3.0 until
its restart, and a stop finishes what is under way."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
from conftest import add_accounts, start_daemon
from procs import processes
from storage import open_data_dir
from storage.store import Store

PASSWORD = "writer test password"


def _writers(daemon) -> list[int]:
    """The writer: a child of serve's mtad process, which starts it."""
    table = processes()
    return [pid for pid, p in table.items() if b"--smtp-writer" in p.cmdline
            and p.parent in table and table[p.parent].parent == daemon.process.pid]


def _send(daemon, recipients: list[str], body: bytes) -> None:
    address = daemon.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("s@example.org", recipients, body)


def test_the_writer_commits_for_every_worker_and_comes_back(write_config, tmp_path, data_dir):
    path = write_config("writer.toml", smtp={"workers": 2, "writer": True, "max_connections_per_ip": 200})
    add_accounts(path, PASSWORD, ["alice@example.test", "bob@example.test"])
    daemon = start_daemon(path, tmp_path)
    try:
        (writer,) = _writers(daemon)
        socket_path = data_dir / "writer.sock"
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) & 0o077 == 0, "the data dir's owner only"

        def send(i: int) -> None:
            recipients = ["alice@example.test", "bob@example.test"] if i % 5 == 0 else ["alice@example.test"]
            _send(daemon, recipients, f"Subject: w{i}\r\nMessage-ID: <w{i}@example.org>\r\n\r\n{i}\r\n".encode())

        with ThreadPoolExecutor(10) as pool:  # both workers, sessions overlapping
            list(pool.map(send, range(30)))  # the first failure, if any, raised here
        with Store(open_data_dir(data_dir, 4)) as store:
            assert store.mailbox("alice@example.test", "INBOX").exists == 30
            assert store.mailbox("bob@example.test", "INBOX").exists == 6
        log = daemon.stderr()
        assert "daemon=mtad-writer" in log and "event=ready" in log
        accepted = [line for line in log.splitlines() if "event=message_accepted" in line]
        assert len(accepted) == 30 and len({line.split(" pid=")[1].split()[0] for line in accepted}) == 2

        # Killed, the writer is started again; meanwhile a message is told 451 4.3.0, never lost.
        os.kill(writer, signal.SIGKILL)
        refused, stored, deadline = [], 0, time.monotonic() + 20
        while stored == 0 and time.monotonic() < deadline:
            try:
                _send(daemon, ["alice@example.test"], f"Subject: after\r\nMessage-ID: <a{len(refused)}@x>\r\n\r\nx\r\n"
                      .encode())
                stored = 1
            except smtplib.SMTPDataError as e:
                refused.append((e.smtp_code, e.smtp_error))
                time.sleep(0.2)
        assert stored == 1, f"no 250 within 20 s of the writer's death: {refused[-1:]}"
        assert refused, "the writer restarts a second after its death: the first message is refused"
        assert all(code == 451 and error.startswith(b"4.3.0") for code, error in refused), refused
        (again,) = _writers(daemon)
        assert again != writer
        assert "event=worker_restarted worker=mtad-writer" in daemon.stderr()
        with Store(open_data_dir(data_dir, 4)) as store:
            assert store.mailbox("alice@example.test", "INBOX").exists == 31
    finally:
        assert daemon.stop() == 0
    assert not _writers(daemon)
    assert "event=stopped daemon=mtad-writer" in daemon.stderr()


def test_without_the_writer_nothing_is_started(write_config, tmp_path, data_dir):
    path = write_config("plain.toml", smtp={"workers": 2})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    try:
        assert _writers(daemon) == []
        _send(daemon, ["alice@example.test"], b"Subject: plain\r\n\r\nx\r\n")
        assert not (data_dir / "writer.sock").exists()
    finally:
        assert daemon.stop() == 0


def _frame(message) -> bytes:
    data = msgspec.msgpack.encode(message)
    return struct.pack(">I", len(data)) + data


def _replies(sock: socket.socket, count: int, deadline: float) -> list:
    """`count` frames read from the writer, or what came before EOF or the deadline."""
    buffer, replies = b"", []
    while len(replies) < count and time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not data:
            replies.append("EOF")
            break
        buffer += data
        while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack_from(">I", buffer)[0]:
            size = struct.unpack_from(">I", buffer)[0]
            replies.append(msgspec.msgpack.decode(buffer[4:4 + size]))
            buffer = buffer[4 + size:]
    return replies


def test_the_writer_refuses_a_peers_bad_frames_and_bounds_what_it_holds(write_config, tmp_path, data_dir):
    """Found by an attack on the writer's socket: a frame that was not a request left its
    caller waiting for ever, and a peer that sent without reading grew the writer by
    hundreds of MB. The socket is the data dir owner's only; still, no trust in its frames."""
    path = write_config("writer.toml", smtp={"workers": 1, "writer": True})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    socket_path = str(data_dir / "writer.sock")
    good = {"id": 1, "targets": [["alice@example.test", "INBOX"]], "flags": ["\\Flagged"],
            "raw": b"Subject: by hand\r\n\r\nx\r\n", "internal_date": None, "dedupe_from": None}
    try:
        (writer,) = _writers(daemon)
        # Not a request: the writer says so in its log and hangs up, nothing waits.
        for bad in ([1, 2, 3], {**good, "targets": [["alice@example.test"]]}, {**good, "id": "one"},
                    {"id": 2}):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(socket_path)
                sock.sendall(_frame(bad))
                assert _replies(sock, 1, time.monotonic() + 10) == ["EOF"], bad
        assert daemon.stderr().count("event=writer_frame_unreadable") == 4
        # A request the store refuses (a date out of range) is answered with its error.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
            sock.sendall(_frame({**good, "id": 7, "internal_date": 1e300}) + _frame(good))
            refused, stored = sorted(_replies(sock, 2, time.monotonic() + 10), key=lambda r: r["id"], reverse=True)
        assert refused["id"] == 7 and refused["delivered"] == [] and refused["errors"][0][2] == "ValueError"
        assert stored["errors"] == [] and stored["delivered"][0][:2] == ["alice@example.test", "INBOX"]

        # A peer that sends and never reads its replies: once they fill the writer's buffer
        # it reads no more, so the sender is the one that waits. All are answered in the end.
        count, each = 3000, _frame({**good, "targets": [["alice@example.test", "Missing"]],
                                    "raw": b"Subject: flood\r\n\r\n" + b"x" * 60_000})
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(socket_path)
            sock.settimeout(3)
            sent = 0
            try:
                for sent in range(1, count + 1):
                    sock.sendall(each)
            except TimeoutError:
                pass
            assert sent < count, "the writer took every request while nobody read its replies"
            sock.settimeout(None)
            done = _replies(sock, 1, time.monotonic() + 10)  # reading lets it go on
            assert done and done[0]["errors"][0][2] == "MailboxNotFoundError"
        assert _writers(daemon) == [writer], "the writer lived through it all"
        _send(daemon, ["alice@example.test"], b"Subject: after\r\nMessage-ID: <after@x>\r\n\r\nx\r\n")
        with Store(open_data_dir(data_dir, 4)) as store:
            assert store.mailbox("alice@example.test", "INBOX").exists == 2
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.stderr() and "never retrieved" not in daemon.stderr()


def test_a_stuck_writer_is_stopped_within_mtads_own_stop(write_config, tmp_path, data_dir):
    """serve kills a daemon still there stop_grace + 5 s after its SIGTERM: mtad stops its
    writer within what is left of that, so that it is mtad that kills a stuck writer (and
    says so), not serve that kills mtad and leaves the writer behind."""
    path = write_config("stuck.toml", server={"stop_grace": "2s"}, smtp={"writer": True})
    add_accounts(path, PASSWORD, ["alice@example.test"])
    daemon = start_daemon(path, tmp_path)
    (writer,) = _writers(daemon)
    try:
        _send(daemon, ["alice@example.test"], b"Subject: first\r\n\r\nx\r\n")  # the account made here
        os.kill(writer, signal.SIGSTOP)  # a commit that never ends: a stuck disk under the writer
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(_send, daemon, ["alice@example.test"], b"Subject: stuck\r\n\r\nx\r\n")
            time.sleep(1.0)  # its DATA ended: mtad waits for the writer's answer
            assert not sending.done()
            started = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            code = daemon.process.wait(30)
            took = time.monotonic() - started
            try:
                sending.result(30)
                raise AssertionError("a 250 for a message the writer never committed")
            except smtplib.SMTPDataError as e:  # the commit failed when the writer was killed
                refused = e
        log = daemon.stderr()
        assert code == 0, log
        assert took < 2 + 5, f"the stop took {took:.1f} s"
        assert "event=worker_killed worker=mtad-writer" in log, log
        assert not [line for line in log.splitlines() if "event=worker_killed worker=mtad " in line + " "], log
        assert not _writers(daemon) and not os.path.exists(f"/proc/{writer}"), "the writer outlived its mtad"
        assert refused.smtp_code == 451 and refused.smtp_error.startswith(b"4.3.0"), refused
        assert "event=store_failed" in log and "error=WriterGone" in log
        with Store(open_data_dir(data_dir, 4)) as store:
            assert store.mailbox("alice@example.test", "INBOX").exists == 1
    finally:
        if os.path.exists(f"/proc/{writer}"):
            os.kill(writer, signal.SIGKILL)
        daemon.stop(signal.SIGKILL)
