"""Shared by bench/imap.py and bench/pop3.py: a throwaway Postroom and a throwaway Dovecot
side by side on loopback, the same messages delivered to each one's INBOX.

Postroom: `postroom serve` on a new data dir, its mail delivered through the store before it
starts (as mtad would, without SMTP in the way). Dovecot (Debian's dovecot-imapd and
dovecot-pop3d, when installed): a config of its own in the same temporary directory
(nothing of /etc/dovecot is read), a passwd-file for passdb and userdb, and the messages
written into a Maildir as its LDA writes them (LF line ends, `,S=` file size and `,W=` the
CRLF size in the name, so that it needs neither a stat nor a read to know them). Both speak
plaintext on loopback: the figures are the servers', not TLS's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store import Corpus  # noqa: E402 - the same corpus as the store benchmark
from ports import free_port, wait_for_port  # noqa: E402
from workers import spread  # noqa: E402

USER, PASSWORD = "bench@example.test", "bench password 1"
DOVECOT = Path("/usr/sbin/dovecot")




def corpus(count: int) -> list[tuple[bytes, bool]]:
    """(message, seen) for `count` messages: the corpus of bench/store.py, one in ten unseen,
    the rare word in count / 300 of them."""
    messages, source = [], Corpus()
    for i in range(count):
        messages.append((source.message(i, i % 300 == 7), bool(i % 10)))
    return messages


def dovecot_available() -> bool:
    return DOVECOT.exists() and Path("/usr/lib/dovecot/imap").exists() and Path("/usr/lib/dovecot/pop3").exists()


class Postroom:
    name = "postroom"

    def __init__(self, messages: list[tuple[bytes, bool]], postroom: str | None = None, metrics: bool = False):
        self.work = Path(tempfile.mkdtemp(prefix="bench-postroom-"))
        self.imap_port, self.pop3_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        postroom = postroom or str(Path(sys.executable).with_name("postroom"))
        var = self.work / "var"
        config = self.work / "postroom.toml"
        config.write_text(f"""
[server]
hostname = "mail.example.test"
data_dir = "{var}"
log_level = "warning"

[tls]
cert = "{var / 'tls/cert.pem'}"
key = "{var / 'tls/key.pem'}"
self_signed = true

[smtp]
listen = ["127.0.0.1:{free_port()}"]

[submission]
listen = ["127.0.0.1:{free_port()}"]
listen_tls = ["127.0.0.1:{free_port()}"]

[imap]
listen = ["127.0.0.1:{self.imap_port}"]
listen_tls = ["127.0.0.1:{free_port()}"]
plaintext_auth = true
max_connections_per_ip = 200

[pop3]
listen = ["127.0.0.1:{self.pop3_port}"]
listen_tls = ["127.0.0.1:{free_port()}"]
plaintext_auth = true

[policy]
enabled = false

[storage]
shards = 4
""" + (f'\n[metrics]\nlisten = ["127.0.0.1:{free_port()}"]\n' if metrics else ""))
        cli = [postroom, "--config", str(config)]
        subprocess.run([*cli, "domain", "add", "example.test"], check=True, capture_output=True)
        subprocess.run([*cli, "user", "add", USER, "--password-stdin"], input=PASSWORD.encode(), check=True,
                       capture_output=True)
        self._deliver(config, messages)
        self.log = open(self.work / "serve.log", "wb")
        self.process = subprocess.Popen([*cli, "serve"], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        for port in (self.imap_port, self.pop3_port):
            wait_for_port(port, self.process)

    def _deliver(self, config_path: Path, messages: list[tuple[bytes, bool]]) -> None:
        import conf
        from storage import open_data_dir
        from storage.store import Store

        config = conf.load(config_path)
        with Store(open_data_dir(config.server.data_dir, config.storage.shards)) as store:
            store.ensure_account(USER)

            def deliver(i: int) -> None:
                raw, seen = messages[i]
                store.deliver([USER], raw, flags=["\\Seen"] if seen else [])

            # Sixteen at once, as a busy MX delivers; the UIDs follow the order of commits.
            spread(deliver, len(messages), 16)
            store.build_index(USER)

    def pids(self) -> list[int]:
        """serve and its children: the processes whose CPU the server's figures cost."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return [self.process.pid, *map(int, children)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


class Dovecot:
    name = "dovecot"

    def __init__(self, messages: list[tuple[bytes, bool]]):
        self.work = Path(tempfile.mkdtemp(prefix="bench-dovecot-"))
        self.imap_port, self.pop3_port = free_port(), free_port()
        self.started = False
        # Dovecot drops privileges to the mail user and will not take root for it; as root
        # the mail belongs to `nobody` and its internal processes run as Debian's users.
        if os.geteuid() == 0:
            mail_user, login_user, internal_user = "nobody", "dovenull", "dovecot"
        else:
            mail_user = login_user = internal_user = pwd.getpwuid(os.geteuid()).pw_name
        mail = pwd.getpwnam(mail_user)
        os.chmod(self.work, 0o755)
        home = self.work / "home"
        maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        now = int(time.time())
        for i, (raw, seen) in enumerate(messages):
            lf = raw.replace(b"\r\n", b"\n")
            name = f"{now}.M{i}P{os.getpid()}.bench,S={len(lf)},W={len(raw)}:2,{'S' if seen else ''}"
            (maildir / "cur" / name).write_bytes(lf)
        (self.work / "passwd").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{mail.pw_uid}:{mail.pw_gid}::{home}::\n")
        for path in [home, *home.rglob("*")]:
            os.chown(path, mail.pw_uid, mail.pw_gid)
        run = self.work / "run"
        self.config = self.work / "dovecot.conf"
        self.config.write_text(f"""
base_dir = {run}
state_dir = {self.work / 'state'}
log_path = {self.work / 'dovecot.log'}
protocols = imap pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {min(mail.pw_uid, 500)}
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.work / 'passwd'}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.work / 'passwd'}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
""")
        # It forks into the background: its output goes to a file, or a pipe would never end.
        with open(self.work / "start.log", "wb") as log:
            subprocess.run([str(DOVECOT), "-c", str(self.config)], check=True, stdout=log, stderr=log,
                           stdin=subprocess.DEVNULL, timeout=60)
        self.started = True
        for port in (self.imap_port, self.pop3_port):
            wait_for_port(port)

    def master_pid(self) -> int:
        return int((self.work / "run" / "master.pid").read_text())

    def stop(self) -> None:
        if self.started:
            subprocess.run([str(DOVECOT), "-c", str(self.config), "stop"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            deadline = time.monotonic() + 30
            while (self.work / "run" / "master.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.work, ignore_errors=True)


def start_both(count: int, with_dovecot: bool = True, metrics: bool = False) -> list:
    """Postroom and, when installed and wanted, Dovecot, each holding the same `count`
    messages in the INBOX of USER; `metrics`: Postroom with [metrics] listen on (what it
    costs)."""
    # `timeout` and Ctrl-C must not leave a server behind: SIGTERM unwinds as an exit does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    messages = corpus(count)
    servers: list = []
    try:
        started = time.perf_counter()
        servers.append(Postroom(messages, metrics=metrics))
        print(f"postroom: {count} messages delivered through the store, serving "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        if with_dovecot:
            if dovecot_available():
                servers.append(Dovecot(messages))
                print(f"dovecot: {count} messages written to its Maildir, serving", flush=True)
            else:
                print("dovecot: not installed (dovecot-imapd, dovecot-pop3d): Postroom alone", flush=True)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
