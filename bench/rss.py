"""Peak memory of the daemons while big messages arrive all at once, over SMTP, submission
and IMAP APPEND.

    .venv/bin/python bench/rss.py [-c 20] [-s 25000000] [--postroom PATH]
        [--only smtp|submission|submission-remote|imap]

Sets up a throwaway data dir (one domain, one user), starts `mtad` and `imapd` (the
systemd entry points: a process each, no supervisor), and then, for each protocol in turn:
C clients at once each send one message of S bytes (a base64 attachment of random bytes,
a Message-ID of its own), over SMTP DATA to the user, then over IMAP APPEND into the user's
INBOX (one user: the issue's case of many connections of one account). Submission sends
over implicit TLS (465) with AUTH PLAIN, From: the user, to the user itself (the local
path) or, as submission-remote, to an address of a .invalid domain (queued and DKIM-signed:
the bench makes a key for example.test); these two run only when asked by --only. Every client first
connects (and logs in: an argon2id check takes 64 MiB while it runs, which is not what is
measured here); then the daemon's peak is reset (/proc/PID/clear_refs, so run as root or as
the daemon's user) and all send at once. Prints, per daemon, its RSS when the messages start,
its peak RSS while they arrive and are stored (the kernel's VmHWM), and the peaks of its
anonymous and file-backed resident memory sampled every 20 ms (RssAnon: the heap, what the
daemon holds; RssFile: pages of files it maps, which the kernel may drop at will).

--postroom names the `postroom` to run (default: the one beside this Python), and with it
the `mtad` and `imapd` beside it: run the same script with another checkout's venv to
compare two versions on the same load.
"""

from __future__ import annotations

import argparse
import base64
import imaplib
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ports import free_port, wait_for_port

USER, PASSWORD = "bench@example.test", "bench password 1"



def write_config(directory: Path, smtp_port: int, imap_port: int, size: int, submission_port: int) -> Path:
    limit = size + (1 << 20)
    path = directory / "postroom.toml"
    path.write_text(f"""
[server]
hostname = "mail.example.test"
data_dir = "{directory / 'var'}"
log_level = "warning"

[tls]
cert = "{directory / 'var/tls/cert.pem'}"
key = "{directory / 'var/tls/key.pem'}"
self_signed = true

[smtp]
listen = ["127.0.0.1:{smtp_port}"]
max_message_size = {limit}
max_connections_per_ip = 200
timeout = "10m"

[submission]
listen = ["127.0.0.1:{free_port()}"]
listen_tls = ["127.0.0.1:{submission_port}"]

[imap]
listen = ["127.0.0.1:{imap_port}"]
listen_tls = ["127.0.0.1:{free_port()}"]
plaintext_auth = true
max_connections_per_ip = 200

[pop3]
listen = ["127.0.0.1:{free_port()}"]
listen_tls = ["127.0.0.1:{free_port()}"]

[storage]
shards = 4
""")
    return path



def status(pid: int, field: str) -> int:
    """A /proc/PID/status field, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field} for {pid}")


class Sampler:
    """The peaks of RssAnon and RssFile of a process, sampled while the load runs."""

    def __init__(self, pid: int):
        self.pid, self.anon, self.file = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.anon = max(self.anon, status(self.pid, "RssAnon"))
                self.file = max(self.file, status(self.pid, "RssFile"))
            except (OSError, SystemExit):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def message(size: int, index: int, attachment: bytes, sender: str = "sender@example.org") -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{USER}>\r\nSubject: big {index}\r\n"
            f"Message-ID: <big-{index}-{os.getpid()}@example.org>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            "See attached.\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    tail = b"--b--\r\n"
    return head + attachment[:size - len(head) - len(tail)] + tail


class SMTPClient:
    """One message over DATA on a plain socket (base64 lines never start with a dot)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.reader = self.sock.makefile("rb")
        self.reply()
        for command in (b"EHLO bench.example.org\r\n", b"MAIL FROM:<sender@example.org>\r\n",
                        f"RCPT TO:<{USER}>\r\n".encode(), b"DATA\r\n"):
            self.sock.sendall(command)
            self.reply()

    def reply(self) -> int:
        line = self.reader.readline()
        while line[3:4] == b"-":
            line = self.reader.readline()
        return int(line[:3])

    def send(self, raw: bytes) -> int:
        self.sock.sendall(raw)
        self.sock.sendall(b".\r\n")
        code = self.reply()
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()
        return code


class SubmissionClient(SMTPClient):
    """One message over DATA on implicit TLS, after AUTH PLAIN as the user."""

    def __init__(self, port: int, recipient: str):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the self-signed certificate
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=600))
        self.reader = self.sock.makefile("rb")
        self.reply()
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        for command in (b"EHLO bench.example.org\r\n", f"AUTH PLAIN {plain}\r\n".encode(),
                        f"MAIL FROM:<{USER}>\r\n".encode(), f"RCPT TO:<{recipient}>\r\n".encode(), b"DATA\r\n"):
            self.sock.sendall(command)
            self.reply()


class IMAPClient:
    def __init__(self, port: int):
        self.client = imaplib.IMAP4("127.0.0.1", port, timeout=600)
        self.client.login(USER, PASSWORD)

    def send(self, raw: bytes) -> str:
        try:
            typ, _ = self.client.append("INBOX", None, None, raw)
            return typ
        finally:
            try:
                self.client.logout()
            except (OSError, imaplib.IMAP4.error):
                pass


def reset_peak(pid: int) -> int:
    """The peak RSS starts again from the current RSS (returned, in KiB)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return status(pid, "VmRSS")


def load(name: str, pid: int, connect, messages: list[bytes], with_login: bool = False) -> None:
    connect().send(messages[0][:4096] + b"\r\n")  # warm up: what every later one shares is loaded
    count = len(messages)
    ready = threading.Barrier(count + 1, timeout=600)
    results: list = [None] * count

    def run(i: int) -> None:
        try:
            client = connect()
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = repr(e)
            ready.wait()
            return
        ready.wait()
        try:
            results[i] = client.send(messages[i])
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = repr(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    if with_login:
        before = reset_peak(pid)
        sampler = Sampler(pid)
    for thread in threads:
        thread.start()
    ready.wait()  # every client connected (and logged in): the load starts from here
    if not with_login:
        before = reset_peak(pid)
        sampler = Sampler(pid)
    start = time.monotonic()
    for thread in threads:
        thread.join(900)
    elapsed = time.monotonic() - start
    sampler.stop()
    peak, after = status(pid, "VmHWM"), status(pid, "VmRSS")
    ok = sum(1 for r in results if r in (250, "OK"))
    mib = 1024
    print(f"{name}: {count} x {len(messages[0]) / 1e6:.0f} MB at once: {ok} stored in {elapsed:.1f} s; "
          f"RSS at the start {before / mib:.0f} MiB, peak {peak / mib:.0f} MiB (+{(peak - before) / mib:.0f} MiB); "
          f"peak RssAnon {sampler.anon / mib:.0f} MiB, RssFile {sampler.file / mib:.0f} MiB; "
          f"RSS after {after / mib:.0f} MiB", flush=True)
    failures = [r for r in results if r not in (250, "OK")]
    if failures:
        print(f"  failures: {failures[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=20)
    parser.add_argument("-s", "--size", type=int, default=25_000_000, help="message size in bytes")
    parser.add_argument("--postroom", default=str(Path(sys.executable).with_name("postroom")))
    parser.add_argument("--with-login", action="store_true",
                        help="measure from before the clients connect, their logins included")
    parser.add_argument("--only", choices=("smtp", "submission", "submission-remote", "imap"),
                        help="one protocol only")
    args = parser.parse_args()
    bin_dir = Path(args.postroom).parent
    directory = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    processes: list[subprocess.Popen] = []
    try:
        smtp_port, imap_port, submission_port = free_port(), free_port(), free_port()
        config = write_config(directory, smtp_port, imap_port, args.size, submission_port)
        cli = [args.postroom, "--config", str(config)]
        subprocess.run([*cli, "domain", "add", "example.test"], check=True, capture_output=True)
        subprocess.run([*cli, "user", "add", USER, "--password-stdin"], input=PASSWORD.encode(), check=True,
                       capture_output=True)
        subprocess.run([*cli, "dkim", "keygen", "example.test", "--selector", "bench"], check=True,
                       capture_output=True)
        log = open(directory / "daemons.log", "wb")
        for name, port in (("mtad", smtp_port), ("imapd", imap_port)):
            process = subprocess.Popen([str(bin_dir / name), "--config", str(config)], stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL)
            processes.append(process)
            wait_for_port(port, process)
        mtad, imapd = processes
        rng = random.Random(25)
        attachment = base64.encodebytes(rng.randbytes(args.size * 3 // 4 + 64)).replace(b"\n", b"\r\n")
        if args.only in (None, "smtp"):
            load("SMTP", mtad.pid, lambda: SMTPClient(smtp_port),
                 [message(args.size, i + 1, attachment) for i in range(args.concurrency)])
        for only, recipient in (("submission", USER), ("submission-remote", "someone@example.invalid")):
            if args.only == only:
                load(only, mtad.pid, lambda recipient=recipient: SubmissionClient(submission_port, recipient),
                     [message(args.size, 2000 + i, attachment, USER) for i in range(args.concurrency)],
                     args.with_login)
        if args.only in (None, "imap"):
            load("APPEND", imapd.pid, lambda: IMAPClient(imap_port),
                 [message(args.size, 1000 + i, attachment) for i in range(args.concurrency)])
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
