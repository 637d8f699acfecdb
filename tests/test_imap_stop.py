"""How imapd and pop3d stop (SIGTERM to `postroom serve`) while commands are running: each
client is told (IMAP BYE, POP3 -ERR) and the stop is clean, a command cut off by it being
a lost connection (RFC 3501 §7.1.5), not a bug: never a traceback, never an error line."""

from __future__ import annotations

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
