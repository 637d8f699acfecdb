"""`postroom serve` started as a user starts it: prepares the data dir and the dev
certificate, prints what listens where, reports READY=1 to the service manager, and stops
cleanly on SIGTERM and SIGINT."""

from __future__ import annotations

import imaplib
import os
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import add_accounts, client_tls_context, start_daemon


def test_serve_prints_each_listener_and_what_is_not_built(daemon):
    out = daemon.stdout()
    assert out.splitlines()[0].startswith("Postroom ") and "on mail.example.test" in out
    for label, dotted, status in [("SMTP (MX)", "smtp.listen", "listening"),
                                  ("IMAPS", "imap.listen_tls", "listening"),
                                  ("POP3 (STLS)", "pop3.listen", "listening"),
                                  ("submissions (TLS)", "submission.listen_tls", "listening")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(label))
        assert str(daemon.listen(dotted)) in line
        assert status in line
    assert "event=ready" in daemon.stderr()


def test_serve_creates_the_data_dir_and_a_usable_dev_certificate(daemon, data_dir):
    assert (data_dir / "layout.json").is_file()
    assert (data_dir / "accounts.lmdb").is_dir()
    key = data_dir / "tls/key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # A client that trusts the dev certificate completes a handshake with the configured
    # pair, for the host name in [server] hostname.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(daemon.config.tls.cert, daemon.config.tls.key)
    client = client_tls_context(daemon.config)
    left, right = socket.socketpair()
    with left, right:
        server_side = server_context.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        client_side = client.wrap_socket(right, server_hostname="mail.example.test", do_handshake_on_connect=False)
        server_side.setblocking(False)
        client_side.setblocking(False)
        done = set()
        for _ in range(200):
            for name, side in (("server", server_side), ("client", client_side)):
                if name in done:
                    continue
                try:
                    side.do_handshake()
                    done.add(name)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if len(done) == 2:
                break
        assert done == {"server", "client"}
        assert client_side.version() in ("TLSv1.2", "TLSv1.3")


def test_passwords_are_hashed_and_checked_at_the_configured_cost(write_config, tmp_path, data_dir, cli):
    """[accounts] password_* reach what `user add` stores and what the daemons check: the
    production cost (the defaults) here, where every other test config asks for the
    cheapest (conftest.CHEAP_PASSWORDS)."""
    path = write_config("production-cost.toml",
                        accounts={"password_memory": "64M", "password_passes": 3, "password_lanes": 4})
    assert cli("domain", "add", "example.test", config=path).returncode == 0
    added = cli("user", "add", "alice@example.test", "--password-stdin", input="correct horse battery\n", config=path)
    assert added.returncode == 0, added.stderr
    raw = (data_dir / "accounts.lmdb" / "data.mdb").read_bytes
    assert b"$argon2id$v=19$m=65536,t=3,p=4$" in raw()
    daemon = start_daemon(path, tmp_path)
    try:
        address = daemon.listen("imap.listen_tls")
        with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config),
                               timeout=30) as client:
            assert client.login("alice@example.test", "correct horse battery")[0] == "OK"
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert b"$argon2id$v=19$m=65536,t=3,p=4$" in raw()  # at the configured cost: not made again


def test_serve_keeps_an_existing_certificate(config_path, tmp_path, data_dir):
    first = start_daemon(config_path, tmp_path)
    assert first.stop() == 0
    cert = (data_dir / "tls/cert.pem").read_bytes()
    second = start_daemon(config_path, tmp_path)
    assert second.stop(signal.SIGINT) == 0
    assert (data_dir / "tls/cert.pem").read_bytes() == cert
    assert "event=stopped" in second.stderr()


def test_serve_refuses_a_bad_config_in_one_line(tmp_path, cli):
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nlisten = ["127.0.0.1:99999"]\n')
    result = cli("serve", config=bad)
    assert result.returncode == 1
    assert result.stderr == (
        f"postroom: {bad}: smtp.listen: item 1: bad address '127.0.0.1:99999': port 99999 out of range 1-65535\n"
    )


def test_serve_refuses_a_certificate_that_does_not_match_its_key(write_config, tmp_path, data_dir, cli):
    # Two self-signed pairs, then the cert of one with the key of the other.
    for name in ("one", "two"):
        path = write_config(f"{name}.toml", tls={"cert": str(tmp_path / f"{name}.pem"),
                                                 "key": str(tmp_path / f"{name}.key"), "self_signed": True})
        daemon = start_daemon(path, tmp_path)
        assert daemon.stop() == 0
    mixed = write_config("mixed.toml", tls={"cert": str(tmp_path / "one.pem"), "key": str(tmp_path / "two.key"),
                                            "self_signed": False})
    result = cli("serve", config=mixed)
    assert result.returncode == 1
    assert result.stderr.startswith(f"postroom: {tmp_path / 'one.pem'}: cannot load certificate with key")
    assert len(result.stderr.splitlines()) == 1


def test_listeners_without_tls_are_reported_off(write_config, tmp_path):
    path = write_config(tls={"self_signed": False}, pop3={"listen": []})
    # Without cert/key in [tls], TLS is off: the implicit-TLS ports cannot start.
    path.write_text("\n".join(line for line in path.read_text().splitlines()
                              if not line.startswith(("cert =", "key ="))))
    daemon = start_daemon(path, tmp_path)
    try:
        lines = {line.strip().split("  ")[0]: line for line in daemon.stdout().splitlines()[1:]}
        assert "off (needs [tls] cert and key)" in lines["IMAPS"]
        assert "off (no listen address)" in lines["POP3 (STLS)"]
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("level, shown, hidden", [
    ("warning", [], ["event=ready", "event=service"]),
    ("info", ["event=ready", "event=service service=smtp"], ["no listen address"]),
    ("debug", ["event=ready", "event=service service=smtp", "no listen address"], []),
])
def test_log_level_is_honoured(write_config, tmp_path, level, shown, hidden):
    # A listener that is off is logged at debug only.
    daemon = start_daemon(write_config(server={"log_level": level}, pop3={"listen": []}), tmp_path)
    assert daemon.stop() == 0
    log = daemon.stderr()
    assert all(event in log for event in shown), log
    assert not any(event in log for event in hidden), log


def _listen_backlogs(port: int, sockets: int) -> list[int]:
    """The backlog of each socket listening on `port`, as `ss` shows it (Send-Q), once
    `sockets` of them listen (an MX worker binds after READY) or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(["ss", "-Hlnt", f"( sport = :{port} )"], capture_output=True, text=True,
                             check=True).stdout
        backlogs = [int(line.split()[2]) for line in out.splitlines() if line.startswith("LISTEN")]
        if len(backlogs) >= sockets or time.monotonic() > deadline:
            return backlogs
        time.sleep(0.1)


def test_every_listener_uses_the_configured_backlog(write_config, tmp_path):
    # Two MX workers: the second process's socket on the shared port must use it too.
    daemon = start_daemon(write_config(server={"listen_backlog": 777}, smtp={"workers": 2}), tmp_path)
    try:
        sockets = {"smtp.listen": 2, "imap.listen": 1, "imap.listen_tls": 1, "pop3.listen": 1, "pop3.listen_tls": 1}
        found = {dotted: _listen_backlogs(daemon.listen(dotted).port, n) for dotted, n in sockets.items()}
        assert found == {dotted: [777] * n for dotted, n in sockets.items()}
    finally:
        assert daemon.stop() == 0


def test_mail_and_index_are_private_whatever_the_umask(write_config, tmp_path, data_dir):
    config_path = write_config()
    add_accounts(config_path, "correct horse battery", ["alice@example.test", "bob@example.test"])
    umask = os.umask(0o022)  # the daemon inherits it: the usual one, which lets others read
    try:
        daemon = start_daemon(config_path, tmp_path)
    finally:
        os.umask(umask)
    try:
        address = daemon.listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=30) as client:
            for n in range(3):
                client.sendmail("sender@example.org", ["alice@example.test", "bob@example.test"],
                                f"Subject: {n}\r\n\r\nprivate\r\n")
        address = daemon.listen("imap.listen_tls")
        with imaplib.IMAP4_SSL(address.host, address.port, ssl_context=client_tls_context(daemon.config),
                               timeout=30) as client:
            client.login("alice@example.test", "correct horse battery")
            for name in ("Projects", "Projects/2024/Q1"):  # and the parents CREATE makes on the way
                assert client.create(name)[0] == "OK"
            assert client.append("Projects/2024/Q1", None, None, b"Subject: appended\r\n\r\nprivate\r\n")[0] == "OK"
    finally:
        assert daemon.stop() == 0
    shards = data_dir / "shards"
    loose, exposed = [], []
    for directory, _, files in os.walk(data_dir):
        path = Path(directory)
        if path != data_dir and path != data_dir / "tls" and stat.S_IMODE(path.stat().st_mode) != 0o700:
            loose.append(f"{path.relative_to(data_dir)} {stat.S_IMODE(path.stat().st_mode):o}")
        if path.name in ("tmp", "new", "cur") and path.is_relative_to(shards):
            exposed += [f"{(path / f).relative_to(data_dir)}" for f in files if (path / f).stat().st_mode & 0o077]
    assert not loose, "directories open to others:\n" + "\n".join(loose)
    assert not exposed, "message files open to others:\n" + "\n".join(exposed)
    messages = [f for d, _, fs in os.walk(shards) if Path(d).name == "cur" for f in fs]
    assert len(messages) == 7  # what was delivered and appended is there to be checked
