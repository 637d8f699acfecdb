"""[metrics] listen (docs/metrics.md): the Prometheus endpoint, scraped after real SMTP,
IMAP and POP3 sessions against a running `postroom serve`, shows every process's counts;
a restarted daemon's counts stay and its open connections stop counting; the mtad, imapd
and pop3d units alone share one endpoint; the Grafana dashboard queries only metrics that
exist; docs/metrics.md's `scrape` block works as written."""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import re
import signal
import smtplib
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

import conf
from conftest import (BIN, POSTROOM, add_accounts, client_tls_context, free_port, refusing_port, start_module_daemon,
                      write_config_file)
from docs_blocks import commands

PASSWORD = "metrics password 1"
USER = "user@example.test"
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-postroom.json"
WAIT = 15.0  # seconds any one condition below may take before the test fails


def scrape(address) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples that have `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def until(condition, what: str):
    deadline = time.monotonic() + WAIT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT}s: {what}")
        time.sleep(0.05)


def write_stale_file(directory: Path, pid: int) -> None:
    """What a process of an earlier run left in the metrics directory: a counter."""
    directory.mkdir(parents=True, exist_ok=True)
    stale = MmapedDict(str(directory / f"counter_{pid}.db"))
    stale.write_value(mmap_key("postroom_stale", "postroom_stale_total", ["x"], ["y"], "left over"), 7.0, 0.0)
    stale.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    # A file of a previous run, of a pid that runs (ours): serve's start must drop it anyway.
    write_stale_file(root / "var" / "metrics", os.getpid())
    remote = refusing_port()  # a delivery to it is deferred at once
    daemon = start_module_daemon(root, metrics={"listen": [f"127.0.0.1:{free_port()}"]},
                                 **{"outbound.routes": {'"remote.example"': f"127.0.0.1:{remote}"}})
    add_accounts(daemon.config_path, PASSWORD, users=[USER], aliases={"fwd@example.test": ["someone@remote.example"]})
    daemon.metrics = daemon.listen("metrics.listen")
    yield daemon
    assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture(scope="module")
def sessions(server):
    """Scrapes before and after one SMTP, one IMAP and one POP3 session, with an IMAP
    connection held open for the `during` scrape."""
    config = server.config
    before = scrape(server.metrics)
    mx = server.listen("smtp.listen")
    with smtplib.SMTP(mx.host, mx.port, timeout=30) as smtp:
        smtp.sendmail("sender@other.test", [USER], b"Subject: counted\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("sender@other.test", ["nobody@example.test"], b"Subject: refused\r\n\r\nno\r\n")
        smtp.sendmail("sender@other.test", ["fwd@example.test"], b"Subject: forwarded\r\n\r\naway\r\n")
    imaps = server.listen("imap.listen_tls")
    imap = imaplib.IMAP4_SSL(imaps.host, imaps.port, ssl_context=client_tls_context(config), timeout=30)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login(USER, "not the password")
    imap.login(USER, PASSWORD)
    imap.select("INBOX")
    imap.uid("FETCH", "1:*", "(UID FLAGS)")
    during = scrape(server.metrics)
    imap.logout()
    pop3s = server.listen("pop3.listen_tls")
    pop = poplib.POP3_SSL(pop3s.host, pop3s.port, context=client_tls_context(config), timeout=30)
    pop.user(USER)
    pop.pass_(PASSWORD)
    pop.retr(1)
    pop.quit()
    # The forwarded message's delivery is tried at once and deferred (nothing listens).
    after = until(lambda: (s := scrape(server.metrics)) and
                  total(s, "postroom_deliveries_total", kind="remote", result="deferred") >= 1 and s,
                  "the forwarded message's attempt")
    return before, during, after


def moved(before, after, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_counters_move_with_smtp_sessions(sessions):
    before, _, after = sessions
    assert moved(before, after, "postroom_connections_total", service="smtp", result="accepted") == 1
    assert moved(before, after, "postroom_messages_total", service="smtp", result="accepted", reason="2.0.0") == 2
    assert moved(before, after, "postroom_smtp_refusals_total", service="smtp", command="RCPT", reason="5.1.1") == 1
    assert moved(before, after, "postroom_deliveries_total", kind="local", result="delivered") == 2
    assert moved(before, after, "postroom_delivery_seconds_count", kind="local") == 2
    assert moved(before, after, "postroom_delivery_seconds_sum", kind="local") > 0
    assert moved(before, after, "postroom_deliveries_total", kind="remote", result="deferred") == 1
    assert moved(before, after, "postroom_delivery_seconds_count", kind="remote") == 1
    assert moved(before, after, "postroom_policy_verdicts_total", stage="data", verdict="accept") == 2
    assert moved(before, after, "postroom_fsync_seconds_count", kind="commit") >= 1
    assert moved(before, after, "postroom_fsync_seconds_count", kind="queue") >= 1


def test_counters_move_with_imap_and_pop3_sessions(sessions):
    before, during, after = sessions
    assert moved(before, after, "postroom_connections_total", service="imaps", result="accepted") == 1
    assert moved(before, after, "postroom_connections_total", service="pop3s", result="accepted") == 1
    assert total(during, "postroom_connections_open", service="imaps") == 1  # the session held open
    assert moved(before, after, "postroom_logins_total", service="imap", result="failed") == 1
    assert moved(before, after, "postroom_logins_total", service="imap", result="ok") == 1
    assert moved(before, after, "postroom_logins_total", service="pop3", result="ok") == 1
    assert moved(before, after, "postroom_imap_command_seconds_count", command="LOGIN", status="NO") == 1
    assert moved(before, after, "postroom_imap_command_seconds_count", command="SELECT", status="OK") == 1
    assert moved(before, after, "postroom_imap_command_seconds_count", command="UID FETCH", status="OK") == 1
    assert moved(before, after, "postroom_imap_command_seconds_sum", command="UID FETCH") > 0
    for command in ("USER", "PASS", "RETR", "QUIT"):
        assert moved(before, after, "postroom_pop3_command_seconds_count", command=command) == 1, command


def test_queue_and_store_are_read_at_the_scrape(sessions):
    before, _, after = sessions
    assert total(after, "postroom_queue_messages", state="deferred") == 1  # the forwarded message
    assert total(after, "postroom_queue_recipients", state="deferred") == 1
    assert {dict(ls)["shard"] for n, ls in after if n == "postroom_store_messages"} == {"0", "1", "2", "3"}
    assert moved(before, after, "postroom_store_messages") == 1
    assert moved(before, after, "postroom_store_bytes") > 0
    assert not [n for n, _ in after if n.startswith("postroom_stale")], "serve kept an earlier run's file"


def test_grafana_dashboard_queries_only_metrics_that_exist(sessions):
    _, _, after = sessions
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    queried = {name for expr in expressions for name in re.findall(r"\bpostroom_[a-z0-9_]+", expr)}
    served = {name for name, _ in after}
    assert len(queried) >= 15, queried
    assert queried <= served, f"the dashboard queries metrics Postroom does not serve: {sorted(queried - served)}"


def test_docs_scrape_block(server, sessions):
    for line in commands("metrics.md", "scrape", replace={"127.0.0.1:9154": str(server.metrics)}):
        out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines and all(line.startswith("postroom_") for line in lines)
        assert any(line.startswith('postroom_connections_total{') for line in lines)


def test_a_restarted_daemon_keeps_its_counts_and_drops_its_open_connections(server, sessions):
    imap = server.listen("imap.listen")  # plain: a connection counts at once (993's after its handshake)

    def imap_total() -> float:
        return total(scrape(server.metrics), "postroom_connections_total", service="imap")

    held = socket.create_connection((imap.host, imap.port))
    held.recv(512)
    until(lambda: total(scrape(server.metrics), "postroom_connections_open", service="imap") == 1, "one open")
    old = server.child_pid("imapd")
    os.kill(old, signal.SIGKILL)
    held.close()
    until(lambda: "worker_restarted" in server.stderr(), "imapd restarted")
    after = scrape(server.metrics)
    assert total(after, "postroom_connections_open", service="imap") == 0  # the dead process's gauge is gone
    assert total(after, "postroom_connections_total", service="imap") == 1  # its counter stays
    until(lambda: _connects(imap.host, imap.port), "the new imapd listening")
    until(lambda: imap_total() >= 2, "the new imapd's connection counted on top")


def test_port_in_use_stops_serve_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config_file(tmp_path / "postroom.toml", tmp_path / "var",
                                 metrics={"listen": [f"127.0.0.1:{port}"]})
        out = subprocess.run([POSTROOM, "--config", str(path), "serve"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    said = [line for line in out.stderr.splitlines() if not line.startswith("ts=")]  # the log lines aside
    assert said == [f"postroom: metrics on 127.0.0.1:{port}: Address already in use"]
    assert "event=ready" not in out.stderr


def test_separate_daemons_share_one_endpoint_and_take_over(tmp_path):
    """imapd and pop3d as separate units: the first to start answers for both; when it
    stops, the other answers. Files of processes gone are removed at a start."""
    path = write_config_file(tmp_path / "postroom.toml", tmp_path / "var",
                             metrics={"listen": [f"127.0.0.1:{free_port()}"]}, pop3={"plaintext_auth": True})
    config = conf.load(path)
    gone = _exited_pid()
    write_stale_file(config.server.data_dir / "metrics", gone)
    address = config.metrics.listen[0]
    logs = [open(tmp_path / f"{name}.err", "wb") for name in ("imapd", "pop3d")]
    imapd = subprocess.Popen([str(BIN / "imapd"), "--config", str(path)], stdout=subprocess.DEVNULL, stderr=logs[0],
                             stdin=subprocess.DEVNULL)
    pop3d = None
    try:
        until(lambda: _answers(address), "imapd answering the scrape")
        pop3d = subprocess.Popen([str(BIN / "pop3d"), "--config", str(path)], stdout=subprocess.DEVNULL,
                                 stderr=logs[1], stdin=subprocess.DEVNULL)
        pop3 = config.pop3.listen[0]
        until(lambda: _connects(pop3.host, pop3.port), "pop3d listening")
        assert not [n for n, _ in scrape(address) if n.startswith("postroom_stale")], "a dead pid's file was kept"
        with socket.create_connection((pop3.host, pop3.port)) as s:
            s.recv(512)
            s.sendall(b"CAPA\r\n")
            s.recv(512)
        # pop3d's counts, served by imapd.
        until(lambda: total(scrape(address), "postroom_pop3_command_seconds_count", command="CAPA") == 1,
              "pop3d's command in imapd's scrape")
        imapd.send_signal(signal.SIGTERM)
        assert imapd.wait(WAIT) == 0
        until(lambda: _answers(address), "pop3d taking over the scrape")
        assert total(scrape(address), "postroom_pop3_command_seconds_count", command="CAPA") == 1
    finally:
        for process in (imapd, pop3d):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(WAIT)
        for log in logs:
            log.close()
    assert "metrics_listening" in (tmp_path / "pop3d.err").read_text()


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _answers(address) -> bool:
    try:
        scrape(address)
    except OSError:
        return False
    return True


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True
