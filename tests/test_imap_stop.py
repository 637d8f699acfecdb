"""How imapd and pop3d stop (SIGTERM to `postroom serve`) while commands are running: each
client is told (IMAP BYE, POP3 -ERR) and the stop is clean, a command cut off by it being
a lost connection (RFC 3501 §7.1.5), not a bug: never a traceback, never an error line."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

from conftest import add_accounts, start_daemon
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery"
USER = "alice@example.test"
CLIENTS = 6


def _busy_client(address, stop: threading.Event, counts: list[int]) -> None:
    """Logs in, selects, then pipelines searches and fetches until the server goes."""
    try:
        with socket.create_connection((address.host, address.port), timeout=20) as sock:
            sock.sendall(f'l LOGIN "{USER}" "{PASSWORD}"\r\ns SELECT INBOX\r\n'.encode())
            while not stop.is_set():
                sock.sendall(b"a SEARCH TEXT needle\r\nb FETCH 1:* (FLAGS ENVELOPE BODY.PEEK[TEXT])\r\n"
                             b"c STATUS INBOX (MESSAGES UNSEEN)\r\n")
                data = sock.recv(1 << 20)
                if not data:
                    return
                counts[0] += data.count(b" OK ")
    except OSError:
        return  # reset by the stop: what we test is the server's side


def _busy_pop3_client(address, stop: threading.Event, counts: list[int]) -> None:
    """One maildrop, one POP3 session (RFC 1939 locks it): pipelined listings and RETRs."""
    try:
        with socket.create_connection((address.host, address.port), timeout=20) as sock:
            sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
            while not stop.is_set():
                sock.sendall(b"STAT\r\nUIDL\r\nRETR 1\r\nRETR 2\r\n")
                data = sock.recv(1 << 20)
                if not data:
                    return
                counts[0] += data.count(b"+OK")
    except OSError:
        return


def test_a_stop_under_running_commands_is_clean(write_config, tmp_path):
    path = write_config(imap={"plaintext_auth": True}, pop3={"plaintext_auth": True})
    add_accounts(path, PASSWORD, [USER])
    daemon = start_daemon(path, tmp_path)
    stopped = False
    try:
        with Store(open_data_dir(daemon.config.server.data_dir, 4)) as store:
            for n in range(300):
                store.append(USER, "INBOX", f"Subject: m{n}\r\n\r\nhay {'needle' if n % 7 == 0 else ''} {n}\r\n"
                             .encode() + b"x" * 2000 + b"\r\n")
        address = daemon.listen("imap.listen")
        stop, counts = threading.Event(), [0]
        clients = [threading.Thread(target=_busy_client, args=(address, stop, counts)) for _ in range(CLIENTS)]
        pop3_counts = [0]
        clients.append(threading.Thread(target=_busy_pop3_client,
                                        args=(daemon.listen("pop3.listen"), stop, pop3_counts)))
        for client in clients:
            client.start()
        deadline = time.monotonic() + 20
        while counts[0] < 30 or pop3_counts[0] < 10:  # every client busy, commands in the store's threads
            assert time.monotonic() < deadline, daemon.stderr()
            time.sleep(0.05)
        code = daemon.stop(signal.SIGTERM)
        stopped = True
        stop.set()
        for client in clients:
            client.join(30)
        log = daemon.stderr()
        assert code == 0, log
        assert "Traceback" not in log and "level=error" not in log, log
        # POP3's RETRs marked their messages \Seen before the store closed.
        with Store(open_data_dir(daemon.config.server.data_dir, 4)) as store:
            assert all("\\Seen" in m.flags for m in store.fetch(USER, "INBOX", [(1, 2)])), log
    finally:
        if not stopped:
            daemon.stop()


def test_clients_in_idle_that_never_answer_do_not_hold_the_stop(write_config, tmp_path):
    """A laptop asleep in IDLE over TLS answers neither BYE nor the TLS close. Both listeners
    (993, and 143) tell their clients at once, and the stop waits GOODBYE_WAIT for them, not
    the grace: before, the IDLE counted as a command under way (held to the close's abort,
    10 s), and 143's client was told only once 993's stop had ended."""
    from conftest import client_tls_context

    path = write_config(server={"stop_grace": "20s"})
    add_accounts(path, PASSWORD, [USER])
    daemon = start_daemon(path, tmp_path)
    sockets = []
    try:
        implicit = daemon.listen("imap.listen_tls")
        raw = socket.create_connection((implicit.host, implicit.port), timeout=10)
        asleep = client_tls_context(daemon.config).wrap_socket(raw, server_hostname="mail.example.test")
        sockets.append(asleep)
        plain = socket.create_connection((daemon.listen("imap.listen").host, daemon.listen("imap.listen").port),
                                         timeout=10)
        sockets.append(plain)
        for sock in (asleep, plain):
            sock.recv(1000)  # the greeting
            sock.sendall(f'a LOGIN "{USER}" "{PASSWORD}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        answers = b""
        while b"\r\n+ " not in answers:  # IDLE's continuation: it idles
            answers += asleep.recv(4096)
        time.sleep(0.3)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(40)
        took = time.monotonic() - started
        heard = b""
        plain.settimeout(5)
        while b"BYE" not in heard:
            chunk = plain.recv(4096)
            if not chunk:
                break
            heard += chunk
        assert code == 0, daemon.stderr()
        assert took < 6, f"the stop took {took:.1f} s"
        assert b"* BYE" in heard, heard
        assert "worker_killed" not in daemon.stderr()
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop(signal.SIGKILL)


def test_a_retr_to_a_client_still_reading_is_finished_at_a_stop(write_config, tmp_path):
    """A POP3 RETR of a big message over a slow link when the daemon stops: the client gets
    the whole message, then the goodbye (-ERR), while a client that reads nothing of its
    RETR (over TLS here) is cut off once it has taken nothing for STALL_WAIT and does not
    hold the stop. Before, the reading client was cut off too: its transport's buffer was
    full at the moment of the stop."""
    from conftest import client_tls_context

    path = write_config(pop3={"plaintext_auth": True}, server={"stop_grace": "20s"})
    users = [USER, "bob@example.test"]
    add_accounts(path, PASSWORD, users)
    daemon = start_daemon(path, tmp_path)
    body = b"".join(b"line %07d of a big message, read over a slow link\r\n" % n for n in range(480_000))
    sockets = []
    try:
        with Store(open_data_dir(daemon.config.server.data_dir, 4)) as store:
            for user in users:
                store.append(user, "INBOX", b"Subject: big\r\n\r\n" + body)
        for user, listener in zip(users, ("pop3.listen", "pop3.listen_tls")):
            address = daemon.listen(listener)
            sock = socket.create_connection((address.host, address.port), timeout=10)
            if listener == "pop3.listen_tls":
                sock = client_tls_context(daemon.config).wrap_socket(sock, server_hostname="mail.example.test")
            sockets.append(sock)
            sock.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nRETR 1\r\n".encode())
        reader, idle = sockets
        deadline = time.monotonic() + 10
        while daemon.stderr().count("event=login ") < 2:  # both sessions past PASS: RETRs under way
            assert time.monotonic() < deadline, daemon.stderr()
            time.sleep(0.02)
        taken = bytearray()
        while len(taken) < 1 << 20:  # its RETR under way, the server waiting on our reads
            taken += reader.recv(65536)
            time.sleep(0.005)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        while chunk := reader.recv(65536):
            taken += chunk
            time.sleep(0.005)
        code = daemon.process.wait(40)
        took = time.monotonic() - started
        log = daemon.stderr()
        assert code == 0, log
        lines = bytes(taken).split(b"\r\n", 4)  # the greeting, USER's, PASS's and RETR's +OK
        assert all(line.startswith(b"+OK") for line in lines[:4]), lines[:4]
        message = lines[4]
        assert message.startswith(b"Subject: big\r\n\r\nline 0000000"), message[:100]
        assert message.endswith(body[-200:] + b".\r\n-ERR [SYS/TEMP] server shutting down, reconnect later\r\n"), \
            message[-300:]
        assert message.count(b"\r\n.\r\n") == 1, message[-300:]
        assert took < 15, f"the stop took {took:.1f} s"
        cut_off = [line for line in log.splitlines() if "event=shutdown " in line and "cut_off=true" in line]
        assert len(cut_off) == 1, log  # the client reading nothing
        assert re.search(r" acked=\d+", cut_off[0]), cut_off  # read off its socket, under TLS
        assert "Traceback" not in log and "level=error" not in log, log
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop(signal.SIGKILL)
