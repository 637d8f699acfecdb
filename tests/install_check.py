"""The install check (`make install-check`, as root): docs/ followed as a newcomer would, on
this machine, from a machine with no Postroom on it to a restored backup.

Each step runs the named shell blocks of a page as written (tests/docs_blocks.py), each block
as one `bash -e` script in the checkout, then checks what the page promised with real
clients, over the production ports on loopback:

 1. install.md `install-system`, then its step 2 as tls.md says: a first certificate where
    certbot puts one, the `renew-hook` saved as certbot's deploy hook and run once; then
    `configure`, `start`, `verify`: Postroom running under its unit, answering.
 2. tls.md: a renewal (a new certificate, the hook run as certbot runs it) and `reload`:
    every TLS listener shows the new certificate to a new session, and an IMAP session
    opened before goes on.
 3. migration.md `import-maildir`: a Maildir with an INBOX and a Sent folder and Dovecot's
    dovecot-uidlist imported, seen over IMAP with their UIDVALIDITY and UIDs; a second run
    imports nothing.
 4. metrics.md: `[metrics] listen` set as the page shows, a restart, `scrape`.
 5. backups.md `backup`, then a message delivered after it, `restore`, `check-restored`: the
    imported mail is back over IMAP and the later message is not.

Where systemd is not PID 1 (this test machine), `systemctl` and `journalctl` in a block are
tests/unit_runner.py, which runs the installed units the way systemd would (User=,
ExecStartPre=, Type=notify, WatchdogSec=, ExecReload=); nothing else of a block is changed
but the few replacements each step names.

Before step 1 it removes what an earlier run installed (--no-reset keeps it): /opt/postroom,
the /usr/local/bin links, /etc/postroom, /var/lib/postroom and its .before-restore, the units,
/var/backups/postroom, the test Maildir and certificates. At the end it stops Postroom.
It prints one line per step, PASS or FAIL with what failed, and exits 1 on the first failure
(the steps after it are "not run").
"""

from __future__ import annotations

import argparse
import imaplib
import mailbox
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import typing
from email.message import EmailMessage
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

from docs_blocks import block  # noqa: E402

HOST = "mail.example.org"  # the docs' host name, domain and user
DOMAIN = "example.org"
USER = "alice@example.org"
PASSWORD = "install-check-Pa55word"
CONFIG = Path("/etc/postroom/postroom.toml")
DATA_DIR = Path("/var/lib/postroom")
LINEAGE = Path("/etc/letsencrypt/live") / HOST
ARCHIVE = Path("/etc/letsencrypt/archive") / HOST
HOOK = Path("/etc/letsencrypt/renewal-hooks/deploy/postroom")
MAILDIR = Path("/var/vmail/example.org/alice/Maildir")  # migration.md's example source
SYSTEMD = Path("/run/systemd/system").is_dir()
UNIT_RUNNER = TESTS / "unit_runner.py"
# The ports of the production config (conf/postroom.toml), on loopback.
PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993, "pop3": 110, "pop3s": 995}
TIMEOUT = 900  # seconds for one block: `make install-system` builds a venv and installs into it


class StepFailed(Exception):
    pass


class Folder(typing.NamedTuple):
    uidvalidity: int
    messages: dict[int, str]  # UID -> Subject


# -- running the docs ----------------------------------------------------------------------------

def prelude() -> str:
    """What the shell of a newcomer on this machine has: /usr/local/bin on PATH; and without
    systemd, systemctl and journalctl that act on the installed units."""
    lines = ["export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    if not SYSTEMD:
        runner = f"{sys.executable} {UNIT_RUNNER}"
        lines += [f'systemctl() {{ {runner} "$@"; }}', f'journalctl() {{ {runner} journalctl "$@"; }}']
    return "\n".join(lines) + "\n"


def sh(script: str, *, what: str, input: str | None = None, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    """`script` in bash -e, in the checkout, its transcript printed."""
    print(f"\n$ # {what}\n" + "\n".join(f"$ {line}" for line in script.strip().splitlines()), flush=True)
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", prelude() + script], cwd=REPO, input=input,
                            capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})
    out = (result.stdout + result.stderr).rstrip()
    if out:
        print(_tail(out, 60), flush=True)
    if check and result.returncode != 0:
        raise StepFailed(f"{what}: exit status {result.returncode}: {_tail(result.stderr or result.stdout, 3)}")
    return result


def run_block(doc: str, name: str, body: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(body, what=f"docs/{doc} block {name}", **kwargs)


def _tail(text: str, lines: int) -> str:
    shown = text.strip().splitlines()
    return "\n".join((["..."] if len(shown) > lines else []) + shown[-lines:])


# -- clients -------------------------------------------------------------------------------------

def client_context(cafile: Path | None = None) -> ssl.SSLContext:
    """Trusting the certificate the docs installed (self-signed here: it is its own CA), or,
    without `cafile`, anything (to look at which certificate a server shows)."""
    if cafile is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # we connect to 127.0.0.1; the chain is what is checked
    return context


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise StepFailed(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s") from None
            time.sleep(0.2)


def presented_certificates() -> dict[str, bytes]:
    """The certificate (DER) each TLS listener shows to a new session."""
    context = client_context()
    seen = {}
    for service in ("submissions", "imaps", "pop3s"):
        with socket.create_connection(("127.0.0.1", PORTS[service]), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=HOST) as tls:
            seen[service] = tls.getpeercert(binary_form=True)
    with smtplib.SMTP("127.0.0.1", PORTS["submission"], timeout=10) as smtp:
        smtp.starttls(context=context)
        seen["submission"] = smtp.sock.getpeercert(binary_form=True)
    with smtplib.SMTP("127.0.0.1", PORTS["smtp"], timeout=10) as smtp:
        smtp.starttls(context=context)
        seen["smtp"] = smtp.sock.getpeercert(binary_form=True)
    imap = imaplib.IMAP4("127.0.0.1", PORTS["imap"], timeout=10)
    imap.starttls(ssl_context=context)
    seen["imap"] = imap.sock.getpeercert(binary_form=True)
    imap.logout()
    pop = poplib.POP3("127.0.0.1", PORTS["pop3"], timeout=10)
    pop.stls(context=context)
    seen["pop3"] = pop.sock.getpeercert(binary_form=True)
    pop.quit()
    return seen


def imap_login(cafile: Path) -> imaplib.IMAP4_SSL:
    imap = imaplib.IMAP4_SSL("127.0.0.1", PORTS["imaps"], ssl_context=client_context(cafile), timeout=30)
    imap.login(USER, PASSWORD)
    return imap


def mailbox_state(cafile: Path, name: str) -> Folder:
    """A mailbox as a client sees it: its UIDVALIDITY, and each message's UID and Subject."""
    imap = imap_login(cafile)
    try:
        typ, _ = imap.select(f'"{name}"', readonly=True)
        if typ != "OK":
            raise StepFailed(f"IMAP SELECT {name} as {USER}: {typ}")
        uidvalidity = int(imap.untagged_responses["UIDVALIDITY"][-1])
        messages = {}
        if int(imap.untagged_responses.get("EXISTS", [b"0"])[-1]):
            typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            for part in data:
                if isinstance(part, tuple):
                    uid = int(re.search(rb"UID (\d+)", part[0]).group(1))
                    messages[uid] = part[1].decode().split(":", 1)[1].strip()
        return Folder(uidvalidity, messages)
    finally:
        imap.logout()


# -- the machine ---------------------------------------------------------------------------------

def der(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")


def certbot_issue(number: int) -> None:
    """What `certbot certonly` (number 1) or a renewal (2, 3...) leaves: a new key and
    certificate for HOST in archive/, linked from live/. Self-signed here: no CA can reach
    this machine."""
    ARCHIVE.mkdir(parents=True, exist_ok=True)
    LINEAGE.mkdir(parents=True, exist_ok=True)
    key, cert = ARCHIVE / f"privkey{number}.pem", ARCHIVE / f"cert{number}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "90", "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=DNS:{HOST}"], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    (ARCHIVE / f"chain{number}.pem").write_text("")
    (ARCHIVE / f"fullchain{number}.pem").write_text(cert.read_text())
    for name in ("cert", "chain", "fullchain", "privkey"):
        link = LINEAGE / f"{name}.pem"
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(ARCHIVE / f"{name}{number}.pem", LINEAGE))


def reset() -> None:
    """No Postroom on this machine: what a previous run (or `make install-system`) left goes."""
    for unit in ("postroom.service", "postroom-mtad.service", "postroom-imapd.service", "postroom-pop3d.service"):
        if (Path("/etc/systemd/system") / unit).exists():
            command = ["systemctl", "stop", unit] if SYSTEMD else [sys.executable, str(UNIT_RUNNER), "stop", unit]
            subprocess.run(command, capture_output=True, timeout=120)
            if SYSTEMD:
                subprocess.run(["systemctl", "disable", unit], capture_output=True, timeout=60)
    for link in ("postroom", "mtad", "imapd", "pop3d"):
        path = Path("/usr/local/bin") / link
        if path.is_symlink():
            path.unlink()
    for path in [Path("/opt/postroom"), Path("/etc/postroom"), DATA_DIR, Path(f"{DATA_DIR}.before-restore"),
                 Path("/var/backups/postroom"), MAILDIR.parent, LINEAGE, ARCHIVE, HOOK,
                 *Path("/etc/systemd/system").glob("postroom*"), *Path("/run/unit_runner").glob("postroom*")]:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    if SYSTEMD:
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=60)


def make_maildir() -> dict[str, Folder]:
    """The Maildir a Dovecot user brings: INBOX (one message read, one flagged; UIDs with a
    gap, as after deletions) and Sent, with Dovecot's dovecot-uidlist in each, so that the
    import must keep UIDVALIDITY and the UIDs. Readable by others, as a copy made for the
    move would be (migration.md says how to let the postroom user read one that is not)."""
    MAILDIR.parent.mkdir(parents=True, exist_ok=True)
    box = mailbox.Maildir(str(MAILDIR), create=True)
    wanted = {"INBOX": (1612345678, [(10, "S"), (11, "F"), (13, "")]), "Sent": (1612345679, [(1, "S"), (2, "S")])}
    folders: dict[str, Folder] = {}
    for name, (uidvalidity, messages) in wanted.items():
        folder = box if name == "INBOX" else box.add_folder(name)
        lines, uids = [], {}
        for uid, flags in messages:
            subject = f"install check {name} {uid}"
            sender, to = ("bob@example.net", USER) if name == "INBOX" else (USER, "bob@example.net")
            message = mailbox.MaildirMessage(_message(subject, sender, to))
            message.set_subdir("cur")
            message.set_flags(flags)
            lines.append(f"{uid} :{folder.add(message)}\n")  # the key is Dovecot's base name
            uids[uid] = subject
        next_uid = max(uids) + 1
        (Path(folder._path) / "dovecot-uidlist").write_text(f"3 V{uidvalidity} N{next_uid} G{uidvalidity:x}\n"
                                                            + "".join(lines))
        folders[name] = Folder(uidvalidity, uids)
    for root, _dirs, files in os.walk(MAILDIR.parent.parent):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return folders


def _message(subject: str, sender: str, to: str) -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    message["Message-ID"] = f"<{subject.replace(' ', '.')}@install-check>"
    message.set_content(f"{subject}\n")
    return bytes(message)


def set_config_key(section: str, key: str, value: str) -> None:
    """An edit of /etc/postroom/postroom.toml as a sysadmin makes one: the key's line in its
    section replaced, or added under the section (made at the end when missing)."""
    lines = CONFIG.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"[{section}]"), None)
    if start is None:
        lines += ["", f"[{section}]", f"{key} = {value}"]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        at = next((i for i in range(start + 1, end) if re.match(rf"\s*{re.escape(key)}\s*=", lines[i])), None)
        if at is None:
            lines.insert(start + 1, f"{key} = {value}")
        else:
            lines[at] = f"{key} = {value}"
    CONFIG.write_text("\n".join(lines) + "\n")
    tomllib.loads(CONFIG.read_text())


# -- the steps -----------------------------------------------------------------------------------

class InstallCheck:
    def __init__(self) -> None:
        self.cafile = LINEAGE / "fullchain.pem"
        self.folders: dict[str, Folder] = {}
        self.results: list[tuple[str, str, str]] = []  # (step, PASS/FAIL/not run, detail)

    def install(self) -> str:
        run_block("install.md", "install-system", block("install.md", "install-system").body)
        version = sh("postroom --version", what="the installed command").stdout.strip()
        if not Path("/opt/postroom/bin/postroom").exists():
            raise StepFailed("no /opt/postroom/bin/postroom after install-system")
        return f"{version} in /opt/postroom, linked from /usr/local/bin"

    def first_certificate(self) -> str:
        """install.md's step 2, as tls.md says: certbot's first certificate, the deploy hook
        saved and run once by hand."""
        certbot_issue(1)
        HOOK.parent.mkdir(parents=True, exist_ok=True)
        HOOK.write_text(block("tls.md", "renew-hook").body)
        HOOK.chmod(0o755)
        ran = sh(f"{HOOK}", what="tls.md: the deploy hook, run once by hand", env={"RENEWED_LINEAGE": str(LINEAGE)},
                 check=False)
        if ran.returncode:
            raise StepFailed(f"the deploy hook, run before the first start, exited {ran.returncode}: {ran.stderr}")
        if der(Path("/etc/postroom/tls/fullchain.pem")) != der(self.cafile):
            raise StepFailed("the deploy hook did not copy the certificate to /etc/postroom/tls")
        return f"certificate of {HOST} copied to /etc/postroom/tls by the hook, which exited 0"

    def configure_and_start(self) -> str:
        run_block("install.md", "configure", block("install.md", "configure").body, input=f"{PASSWORD}\n")
        run_block("install.md", "start", block("install.md", "start").body)
        for port in PORTS.values():
            wait_for_port(port)
        verified = run_block("install.md", "verify", block("install.md", "verify").body)
        if "event=ready" not in verified.stdout:
            raise StepFailed("the journal has no event=ready line")
        imap_login(self.cafile).logout()
        return f"active under the unit; every listener up on {sorted(PORTS.values())}; {USER} logs in over IMAPS"

    def tls_renewal(self) -> str:
        before = imap_login(self.cafile)
        before.select("INBOX")
        old = presented_certificates()
        certbot_issue(2)
        new = der(self.cafile)
        if all(cert == new for cert in old.values()):
            raise StepFailed("the renewal made the same certificate")
        sh(f"{HOOK}", what="tls.md: the deploy hook, as certbot runs it after a renewal",
           env={"RENEWED_LINEAGE": str(LINEAGE)})
        seen = presented_certificates()
        stale = sorted(service for service, cert in seen.items() if cert != new)
        if stale:
            raise StepFailed(f"after the hook's reload, new sessions still get the old certificate on {stale}")
        typ, _ = before.noop()
        if typ != "OK":
            raise StepFailed("the IMAP session opened before the reload did not survive it")
        before.logout()
        run_block("tls.md", "reload", block("tls.md", "reload").body)
        if presented_certificates() != seen:
            raise StepFailed("the certificate changed on a reload with no renewal")
        return f"new certificate on new sessions of {sorted(seen)}; a session opened before went on"

    def import_maildir(self) -> str:
        self.folders = make_maildir()
        first = run_block("migration.md", "import-maildir", block("migration.md", "import-maildir").body)
        total = sum(len(f.messages) for f in self.folders.values())
        if f"total: {total} imported" not in first.stdout:
            raise StepFailed(f"the import's summary does not say {total} imported: {_tail(first.stdout, 2)}")
        self.compare_folders("after the import")
        again = run_block("migration.md", "import-maildir (again)", block("migration.md", "import-maildir").body)
        if "total: 0 imported" not in again.stdout:
            raise StepFailed(f"a second import was not empty: {_tail(again.stdout, 1)}")
        return (f"{total} messages in {sorted(self.folders)} seen over IMAP with Dovecot's UIDVALIDITY and UIDs; "
                "the second run imported 0")

    def compare_folders(self, when: str) -> None:
        for name, wanted in self.folders.items():
            got = mailbox_state(self.cafile, name)
            if got != wanted:
                raise StepFailed(f"{when}, IMAP {name} is {got}, expected {wanted}")

    def metrics(self) -> str:
        listen = tomllib.loads(_toml_block("metrics.md", "[metrics]"))["metrics"]["listen"]
        set_config_key("metrics", "listen", "[" + ", ".join(f'"{a}"' for a in listen) + "]")
        sh("postroom --config /etc/postroom/postroom.toml config check >/dev/null && systemctl restart postroom",
           what="metrics.md: listen set in /etc/postroom/postroom.toml, then a restart")
        for port in PORTS.values():
            wait_for_port(port)
        imap_login(self.cafile).logout()  # one login to count
        scraped = run_block("metrics.md", "scrape", block("metrics.md", "scrape").body).stdout
        wanted = ["postroom_connections_total", "postroom_logins_total", "postroom_store_messages"]
        missing = [name for name in wanted if name not in scraped]
        if missing:
            raise StepFailed(f"the scrape has no {missing}")
        logins = re.findall(r'^postroom_logins_total\{[^}]*result="ok"[^}]*\} ([\d.e+]+)', scraped, re.MULTILINE)
        if not logins or sum(float(v) for v in logins) < 1:
            raise StepFailed("the scrape counts no successful login")
        return f"{len(scraped.splitlines())} postroom_ lines, logins counted"

    def backup_restore(self) -> str:
        run_block("backups.md", "backup", block("backups.md", "backup").body)
        # Mail that comes after the backup: the restore must take it away again.
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = USER, USER, "install check after backup"
        message.set_content("after the backup\n")
        with smtplib.SMTP("127.0.0.1", PORTS["submission"], timeout=30) as smtp:
            smtp.starttls(context=client_context(self.cafile))
            smtp.login(USER, PASSWORD)
            smtp.send_message(message)
        if "install check after backup" not in mailbox_state(self.cafile, "INBOX").messages.values():
            raise StepFailed("the message sent after the backup did not arrive")
        run_block("backups.md", "restore", block("backups.md", "restore").body)
        checked = run_block("backups.md", "check-restored", block("backups.md", "check-restored").body)
        for port in PORTS.values():
            wait_for_port(port)
        self.compare_folders("after the restore")
        return f"restored: {_tail(checked.stdout, 1)}; the imported mail is back, the later message gone"

    def run(self) -> int:
        steps = [("install (install.md install-system)", self.install),
                 ("first certificate (tls.md renew-hook, run once)", self.first_certificate),
                 ("configure and start (install.md configure, start, verify)", self.configure_and_start),
                 ("certificate renewal and reload (tls.md)", self.tls_renewal),
                 ("Maildir import (migration.md)", self.import_maildir),
                 ("metrics scrape (metrics.md)", self.metrics),
                 ("backup and restore (backups.md)", self.backup_restore)]
        failed = False
        for name, step in steps:
            if failed:
                self.results.append((name, "not run", ""))
                continue
            print(f"\n=== {name}", flush=True)
            try:
                self.results.append((name, "PASS", step()))
            except (StepFailed, OSError, ssl.SSLError, imaplib.IMAP4.error, smtplib.SMTPException,
                    poplib.error_proto, subprocess.TimeoutExpired, LookupError, KeyError) as e:
                self.results.append((name, "FAIL", f"{type(e).__name__}: {e}"))
                failed = True
        return 1 if failed else 0


def _toml_block(doc: str, starting: str) -> str:
    """The ```toml block of a page that starts with `starting` (what a sysadmin copies)."""
    from docs_blocks import blocks

    found = [b.body for b in blocks(doc) if b.lang == "toml" and b.body.lstrip().startswith(starting)]
    if not found:
        raise StepFailed(f"docs/{doc} has no toml block starting {starting}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-reset", action="store_true", help="keep what an earlier run installed")
    parser.add_argument("--keep-running", action="store_true", help="leave Postroom running at the end")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("install_check: run it as root (it installs Postroom on this machine)", file=sys.stderr)
        return 2
    if not args.no_reset:
        reset()
    check = InstallCheck()
    code = 1
    try:
        code = check.run()
    finally:
        if not args.keep_running:
            stop = ["systemctl", "stop", "postroom"] if SYSTEMD else [sys.executable, str(UNIT_RUNNER), "stop",
                                                                    "postroom"]
            subprocess.run(stop, capture_output=True, timeout=180)
        print("\n=== install check" + ("" if SYSTEMD else " (systemctl: tests/unit_runner.py, systemd is not PID 1)"))
        for name, outcome, detail in check.results:
            print(f"{outcome:8} {name}" + (f": {detail}" if detail else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
