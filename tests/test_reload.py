"""Reload (postroom/reload.py): SIGHUP and `postroom reload` on a running `postroom serve`,
and on a daemon running alone. A renewed certificate is what each new TLS session sees, on
every way in (STARTTLS on the MX, submission 465 and STARTTLS on 587, IMAPS and IMAP STARTTLS, POP3S and STLS);
a session opened before goes on with its own; a changed limit applies to new sessions; a
broken config or certificate is refused, logged, and the running one kept; a key that
needs a restart is logged and keeps its running value. The sysadmin's commands are
docs/tls.md's blocks `renew-hook` and `reload`."""

from __future__ import annotations

import datetime
import imaplib
import ipaddress
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import conf
from conftest import POSTROOM, READY_TIMEOUT, add_accounts, free_port, start_module_daemon, write_config_file
from docs_blocks import commands
from postroom.reload import RESTART_NEEDED, merge

TIMEOUT = 10
RELOAD_TIMEOUT = 10.0
USER, PASSWORD = "ann@example.test", "reload-secret"
DAEMONS = ("mtad", "imapd", "pop3d")
RELOADS = 4  # reload.done lines of one reload: mtad, its MX worker, imapd, pop3d
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    # Two SMTP workers: mtad passes the signal on to its worker.
    daemon = start_module_daemon(root, smtp={"workers": 2, "max_connections_per_ip": 200})
    add_accounts(daemon.config_path, PASSWORD, users=[USER])
    daemon.original = daemon.config_path.read_text()
    yield daemon
    code = daemon.stop()
    assert code == 0, f"postroom serve exited {code} on SIGTERM:\n{daemon.stderr()}"


@pytest.fixture
def restore(server):
    """The test may edit the config: its original comes back (and is reloaded) after it."""
    yield
    if server.config_path.read_text() != server.original:
        server.config_path.write_text(server.original)
        seen = _count(server, "reload.done")
        os.kill(server.process.pid, signal.SIGHUP)
        _wait_for(server, "reload.done", seen + RELOADS)


# -- helpers ----------------------------------------------------------------------------------

def _count(server, event: str, **fields: str) -> int:
    wanted = [f"event={event}"] + [f"{k}={v}" for k, v in fields.items()]
    return sum(all(w in line.split() for w in wanted) for line in server.stderr().splitlines())


def _wait_for(server, event: str, count: int, **fields: str) -> None:
    """Until `count` lines of `event` (with `fields`) are in the log."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while _count(server, event, **fields) < count:
        assert time.monotonic() < deadline, f"no {count} x {event} {fields} in the log:\n{server.stderr()[-3000:]}"
        time.sleep(0.02)


def _replace(config_path: Path, cert: Path, key: Path) -> dict[str, str]:
    """docs/tls.md's production paths -> this test's."""
    return {
        "postroom --config /etc/postroom/postroom.toml": f"{POSTROOM} --config {config_path}",
        "/etc/postroom/tls/fullchain.pem": str(cert),
        "/etc/postroom/tls/privkey.pem": str(key),
        "/etc/postroom/tls": str(cert.parent),
        "-g postroom": f"-g {os.getgid()}",
    }


def _run(lines: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    done = []
    for line in lines:
        result = subprocess.run(["sh", "-ec", line], capture_output=True, text=True, timeout=60,
                                env={**os.environ, **(env or {})})
        assert result.returncode == 0, f"{line}: exit {result.returncode}\n{result.stderr}"
        done.append(result)
    return done


def make_certificate(directory: Path, name: str) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for 127.0.0.1 with `name` as its CN, as certbot lays one out
    (fullchain.pem, privkey.pem); returns the paths and the certificate's DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "privkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory / "fullchain.pem", directory / "privkey.pem", cert.public_bytes(serialization.Encoding.DER)


def _any_certificate() -> ssl.SSLContext:
    # What the server shows is the subject here, not whether we trust it.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _peer(sock) -> bytes:
    return sock.getpeercert(binary_form=True)


# Each returns the DER certificate a new session on that way in is shown.

def _mx_starttls(server) -> bytes:
    a = server.listen("smtp.listen")
    with smtplib.SMTP(a.host, a.port, timeout=TIMEOUT) as client:
        client.starttls(context=_any_certificate())
        client.ehlo()
        return _peer(client.sock)


def _submissions(server) -> bytes:
    a = server.listen("submission.listen_tls")
    with smtplib.SMTP_SSL(a.host, a.port, context=_any_certificate(), timeout=TIMEOUT) as client:
        client.ehlo()
        return _peer(client.sock)


def _submission_starttls(server) -> bytes:
    a = server.listen("submission.listen")
    with smtplib.SMTP(a.host, a.port, timeout=TIMEOUT) as client:
        client.starttls(context=_any_certificate())
        client.ehlo()
        return _peer(client.sock)


def _imaps(server) -> bytes:
    a = server.listen("imap.listen_tls")
    client = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=_any_certificate(), timeout=TIMEOUT)
    der = _peer(client.sock)
    client.logout()
    return der


def _imap_starttls(server) -> bytes:
    a = server.listen("imap.listen")
    client = imaplib.IMAP4(a.host, a.port, timeout=TIMEOUT)
    client.starttls(ssl_context=_any_certificate())
    der = _peer(client.sock)
    client.logout()
    return der


def _pop3s(server) -> bytes:
    a = server.listen("pop3.listen_tls")
    client = poplib.POP3_SSL(a.host, a.port, context=_any_certificate(), timeout=TIMEOUT)
    der = _peer(client.sock)
    client.quit()
    return der


def _pop3_stls(server) -> bytes:
    a = server.listen("pop3.listen")
    client = poplib.POP3(a.host, a.port, timeout=TIMEOUT)
    client.stls(context=_any_certificate())
    der = _peer(client.sock)
    client.quit()
    return der


WAYS_IN = {"mx-starttls": _mx_starttls, "submissions": _submissions, "submission-starttls": _submission_starttls,
           "imaps": _imaps, "imap-starttls": _imap_starttls, "pop3s": _pop3s, "pop3-stls": _pop3_stls}


def _size(client: smtplib.SMTP) -> int:
    client.ehlo("client.example.test")
    return int(client.esmtp_features["size"])


def _edit(config_path: Path, section: str, key: str, value: str) -> None:
    """Set `key` of `[section]` in the config file to the TOML `value`."""
    text = config_path.read_text()
    head, _, tail = text.partition(f"[{section}]\n")
    assert _, f"no [{section}] in {config_path}"
    body, rest = (tail.split("\n[", 1) + [""])[:2]
    lines = [line for line in body.splitlines() if not line.startswith(f"{key} =")]
    lines.insert(0, f"{key} = {value}")
    config_path.write_text(head + f"[{section}]\n" + "\n".join(lines) + ("\n[" + rest if rest else "\n"))


# -- the tests --------------------------------------------------------------------------------

def test_renewed_certificate_seen_by_new_sessions_on_every_tls_listener(server, tmp_path):
    config = conf.load(server.config_path)
    before = {name: way(server) for name, way in WAYS_IN.items()}
    old = before["imaps"]
    assert set(before.values()) == {old}
    # Sessions open across the reload: IMAPS logged in, submission on 465 mid-session.
    a = server.listen("imap.listen_tls")
    imap = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=_any_certificate(), timeout=TIMEOUT)
    imap.login(USER, PASSWORD)
    a = server.listen("submission.listen_tls")
    smtp = smtplib.SMTP_SSL(a.host, a.port, context=_any_certificate(), timeout=TIMEOUT)
    smtp.login(USER, PASSWORD)

    try:
        # certbot renews into its live/ directory and runs the deploy hook with RENEWED_LINEAGE.
        lineage = tmp_path / "letsencrypt/live/mail.example.test"
        _, _, new = make_certificate(lineage, "renewed.example.test")
        seen = _count(server, "reload.done")
        hook = commands("tls.md", "renew-hook", replace=_replace(server.config_path, config.tls.cert, config.tls.key))
        results = _run(hook, env={"RENEWED_LINEAGE": str(lineage)})
        assert "reload sent to serve" in results[-1].stdout
        _wait_for(server, "reload.done", seen + RELOADS)

        after = {name: way(server) for name, way in WAYS_IN.items()}
        assert after == {name: new for name in WAYS_IN}, "a new TLS session still sees the old certificate"
        assert {_submissions(server) for _ in range(4)} == {new}  # whichever SMTP process accepts it
        # The open sessions go on, on the handshake they made.
        assert _peer(imap.sock) == old
        assert imap.select("INBOX")[0] == "OK"
        imap.logout()
        assert _peer(smtp.sock) == old
        smtp.sendmail(USER, [USER], f"From: {USER}\r\nTo: {USER}\r\nSubject: across a reload\r\n\r\nhi\r\n")
        smtp.quit()
    finally:  # a failure above must not leave sessions that hold up the daemon's stop
        if imap.state != "LOGOUT":
            imap.shutdown()
        smtp.close()


def test_changed_limit_applies_to_new_sessions_only(server, restore):
    a = server.listen("smtp.listen")
    old_session = smtplib.SMTP(a.host, a.port, timeout=TIMEOUT)
    size = _size(old_session)
    imap_address = server.listen("imap.listen")
    first_imap = imaplib.IMAP4(imap_address.host, imap_address.port, timeout=TIMEOUT)

    _edit(server.config_path, "smtp", "max_message_size", '"1M"')
    _edit(server.config_path, "imap", "max_connections_per_ip", "1")
    moved = free_port()
    _edit(server.config_path, "smtp", "listen", f'["127.0.0.1:{moved}"]')  # needs a restart
    seen = _count(server, "reload.done")
    _run(commands("tls.md", "reload", replace=_replace(server.config_path, Path("-/-"), Path("-/-"))))
    _wait_for(server, "reload.done", seen + RELOADS)

    with smtplib.SMTP(a.host, a.port, timeout=TIMEOUT) as new_session:  # the running address
        assert _size(new_session) == 1024 * 1024
    assert _size(old_session) == size, "a session in flight had its limit changed under it"
    old_session.sendmail(USER, [USER], f"From: {USER}\r\nSubject: big enough\r\n\r\n{'x' * 2_000_000}\r\n")
    old_session.quit()
    assert _count(server, "reload.restart_needed", daemon="mtad", key="smtp.listen") >= 1
    assert _count(server, "reload.done", daemon="imapd", changed="smtp.max_message_size,imap.max_connections_per_ip")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", moved), timeout=TIMEOUT)
    # imapd's connection limit: the second connection from this address is turned away.
    second = socket.create_connection((imap_address.host, imap_address.port), timeout=TIMEOUT)
    assert second.recv(200).startswith(b"* BYE [UNAVAILABLE]")
    second.close()
    first_imap.logout()


def test_broken_config_is_refused_logged_and_the_running_one_kept(server, restore):
    a = server.listen("smtp.listen")
    with smtplib.SMTP(a.host, a.port, timeout=TIMEOUT) as client:
        size = _size(client)
    _edit(server.config_path, "smtp", "max_message_size", '"lots"')

    # `postroom reload` checks first: one line, exit 1, nothing sent.
    result = subprocess.run([POSTROOM, "--config", str(server.config_path), "reload"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "smtp.max_message_size" in result.stderr
    # SIGHUP to serve (systemd's ExecReload): refused there, the children keep theirs.
    refused = _count(server, "reload.refused", daemon="serve")
    server.process.send_signal(signal.SIGHUP)
    _wait_for(server, "reload.refused", refused + 1, daemon="serve")
    # SIGHUP to one daemon alone.
    refused = _count(server, "reload.refused", daemon="imapd")
    os.kill(server.child_pid("imapd"), signal.SIGHUP)
    _wait_for(server, "reload.refused", refused + 1, daemon="imapd")
    line = [x for x in server.stderr().splitlines() if "reload.refused" in x][-1]
    assert "smtp.max_message_size" in line

    assert server.process.poll() is None
    with smtplib.SMTP(a.host, a.port, timeout=TIMEOUT) as client:
        assert _size(client) == size
    assert _imaps(server)  # imapd serves on


def test_broken_certificate_is_refused_and_the_running_one_kept(server, tmp_path):
    config = conf.load(server.config_path)
    shown = _imaps(server)
    key = config.tls.key.read_bytes()
    try:
        _, other_key, _ = make_certificate(tmp_path, "other.example.test")
        config.tls.key.write_bytes(other_key.read_bytes())  # a key that is not the certificate's
        refused = _count(server, "reload.refused", daemon="mtad")
        for daemon in DAEMONS:  # each alone: serve would refuse it before them
            os.kill(server.child_pid(daemon), signal.SIGHUP)
        _wait_for(server, "reload.refused", refused + 1, daemon="mtad")
        _wait_for(server, "reload.refused", 1, daemon="pop3d")
        assert _submissions(server) == shown and _pop3s(server) == shown
    finally:
        config.tls.key.write_bytes(key)


def test_reload_of_a_daemon_running_alone(tmp_path):
    """imapd under its own systemd unit: `postroom reload` finds it by its lock and signals it."""
    config_path = write_config_file(tmp_path / "postroom.toml", tmp_path / "var")
    config = conf.load(config_path)
    log = tmp_path / "imapd.err"
    with tempfile.TemporaryDirectory(prefix="notify-") as sock_dir, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(log, "wb") as err:
        notify.bind(os.path.join(sock_dir, "notify.sock"))
        notify.settimeout(READY_TIMEOUT)
        imapd = subprocess.Popen([str(Path(POSTROOM).with_name("imapd")), "--config", str(config_path)],
                                 stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                 env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})
        try:
            while "READY=1" not in notify.recv(4096).decode().splitlines():
                pass
            make_certificate(tmp_path / "new", "alone.example.test")
            _, _, new = make_certificate(tmp_path / "new", "alone.example.test")
            os.replace(tmp_path / "new/fullchain.pem", config.tls.cert)
            os.replace(tmp_path / "new/privkey.pem", config.tls.key)
            result = subprocess.run([POSTROOM, "--config", str(config_path), "reload"], capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"reload sent to imapd (pid {imapd.pid})\n"
            deadline = time.monotonic() + RELOAD_TIMEOUT
            while "reload.done" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            a = config.imap.listen_tls[0]
            client = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=_any_certificate(), timeout=TIMEOUT)
            assert _peer(client.sock) == new
            client.logout()
        finally:
            imapd.send_signal(signal.SIGTERM)
            assert imapd.wait(READY_TIMEOUT) == 0
    result = subprocess.run([POSTROOM, "--config", str(config_path), "reload"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("postroom: nothing runs on data dir") and result.stderr.count("\n") == 1
    # A certificate hook run before the first start says so and succeeds (docs/tls.md).
    result = subprocess.run([POSTROOM, "--config", str(config_path), "reload", "--if-running"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith("nothing runs on data dir")


def test_restart_needed_keys_are_the_ones_the_example_config_names():
    text = (ROOT / "conf/postroom.toml").read_text()
    keys = text[text.index("#   keys:"):text.index("#   sections:")]
    sections = text[text.index("#   sections:"):].split("\n", 1)[0]
    named = re.findall(r"[a-z0-9_]+\.[a-z0-9_]+", keys) + re.findall(r"\[([a-z_]+)\]", sections)
    assert sorted(named) == sorted(RESTART_NEEDED)


def test_merge_keeps_the_running_value_of_keys_that_need_a_restart():
    server = '[server]\nhostname = "mail.example.test"\n'
    running = conf.loads(server + '[smtp]\nlisten = ["127.0.0.1:2525"]\nmax_message_size = "25M"\n'
                         '[tls]\ncert = "/a/cert.pem"\n[dkim]\nsign = true\n')
    new = conf.loads(server + '[smtp]\nlisten = ["127.0.0.1:2526"]\nmax_message_size = "1M"\n'
                     '[tls]\ncert = "/b/cert.pem"\n[dkim]\nsign = false\n')
    merged, kept = merge(running, new)
    assert kept == ["smtp.listen", "dkim.sign"]
    assert merged.smtp.listen == running.smtp.listen and merged.dkim == running.dkim
    assert merged.smtp.max_message_size == 1024 * 1024 and merged.tls.cert == Path("/b/cert.pem")
    # Turning TLS off (or on) is a start's business: the running [tls] stays.
    merged, kept = merge(running, conf.loads(server))
    assert "tls.cert" in kept and merged.tls == running.tls
