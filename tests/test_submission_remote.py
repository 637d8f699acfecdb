"""Remote recipients, end to end: what submission and the MX put into the outbound queue
(storage/queue.py), DKIM-signed for our users (policy/dkim.py), SRS-rewritten for forwards
(mtad/srs.py), with the DSN parameters; read back through the queue's own API while the
delivery runner can only defer it."""

from __future__ import annotations

import re
import smtplib
import time

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from conftest import add_accounts, client_tls_context, refusing_port
from storage import Queue, Store, open_data_dir

PASSWORD = "correct horse battery"


@pytest.fixture
def config_path(write_config):
    """The remote domains routed to a port nobody listens on: the delivery runner defers
    their mail, and what was queued stays there to be looked at."""
    closed = f"127.0.0.1:{refusing_port()}"
    return write_config(**{"outbound.routes": {'"remote.example"': closed, '"sender.example"': closed}})


@pytest.fixture
def sub(cli, daemon, data_dir):
    add_accounts(daemon.config_path, PASSWORD, ["alice@example.test", "bob@example.test"],
                 {"fwd@example.test": ["someone@remote.example"],
                  "both@example.test": ["bob@example.test", "other@remote.example"]})
    keygen = cli("dkim", "keygen", "example.test")
    assert keygen.returncode == 0, keygen.stderr
    daemon.dkim_record = printed_record(keygen.stdout)
    daemon.data = open_data_dir(data_dir, 4)
    return daemon


def printed_record(stdout: str) -> tuple[str, bytes]:
    """(DNS name, TXT text) from the zone-file line `dkim keygen` printed."""
    (line,) = [line for line in stdout.splitlines() if "._domainkey." in line]
    name, rest = line.split(None, 1)
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rest[len("IN TXT "):])
    return name.rstrip("."), b"".join(rdata.strings)


def submit(daemon) -> smtplib.SMTP:
    address = daemon.listen("submission.listen_tls")
    client = smtplib.SMTP_SSL(address.host, address.port, timeout=30, context=client_tls_context(daemon.config))
    client.ehlo("laptop.example.org")
    client.login("alice@example.test", PASSWORD)
    return client


MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: someone@remote.example\r\nSubject: out\r\n"
           b"Message-ID: <out@example.test>\r\nDate: Mon, 30 Nov 2026 15:00:00 +0000\r\n\r\nHello, world.\r\n")


def queued_as(text: bytes) -> str:
    match = re.fullmatch(rb"2\.0\.0 OK: queued as ([0-9A-Z]{12,})", text)
    assert match, text
    return match.group(1).decode()


def test_a_remote_recipient_is_queued_signed_and_named_by_its_queue_id(sub):
    with submit(sub) as client:
        client.mail("alice@example.test", ["RET=HDRS", "ENVID=env+2B1"])
        assert client.rcpt("someone@remote.example", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;someone@remote.example"]
                           )[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250
    qid = queued_as(text)
    with Queue(sub.data) as queue:
        entry = queue.get(qid)
        raw = queue.read(qid)
    assert entry.envelope.sender == "alice@example.test" and entry.envelope.user == "alice@example.test"
    assert entry.envelope.ret == "HDRS" and entry.envelope.envid == "env+1" and entry.envelope.origin == "submission"
    (recipient,) = entry.recipients
    assert (recipient.address, recipient.notify, recipient.orcpt) == (
        "someone@remote.example", ("SUCCESS", "FAILURE"), "rfc822;someone@remote.example")
    # DKIM-Signature first, then our Received: with the queue id; no Return-Path: (the last hop's).
    assert raw.startswith(b"DKIM-Signature: ") and b"Return-Path:" not in raw.split(b"\r\n\r\n")[0]
    assert re.search(rb"\r\nReceived: from laptop\.example\.org\r\n\tby mail\.example\.test \(Postroom\) "
                     rb"with ESMTPSA id " + qid.encode(), raw)
    name, record = sub.dkim_record
    assert dkim.verify(raw, dnsfunc=lambda asked, timeout=5: record if asked.decode().rstrip(".") == name else None)
    # Every line the submission agent logged about the message carries the queue id.
    accepted = [line for line in sub.stderr().splitlines() if "event=message_accepted" in line]
    assert len(accepted) == 1 and f"qid={qid}" in accepted[0]
    assert 'message_id=<out@example.test>' in accepted[0] or 'message_id="<out@example.test>"' in accepted[0]
    # No copy is kept for the sender: her client APPENDs to Sent.
    with Store(sub.data) as store:
        assert store.mailbox("alice@example.test", "INBOX").exists == 0


def test_local_and_remote_recipients_of_one_message(sub):
    with submit(sub) as client:
        client.mail("alice@example.test")
        client.rcpt("bob@example.test")
        client.rcpt("someone@remote.example")
        code, text = client.data(MESSAGE)
    qid = queued_as(text)
    with Store(sub.data) as store:
        (stored,) = [store.read_message(m) for m in store.fetch("bob@example.test", "INBOX", [(1, 2**32 - 1)])]
    assert f"with ESMTPSA id {qid}".encode() in stored and b"DKIM-Signature" not in stored
    with Queue(sub.data) as queue:
        assert [r.address for r in queue.get(qid).recipients] == ["someone@remote.example"]


def test_the_mx_forwards_a_remote_alias_target_with_srs(sub):
    address = sub.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("mx.sender.example")
        assert client.has_extn("dsn")
        client.mail("someone@sender.example")
        assert client.rcpt("both@example.test", ["NOTIFY=FAILURE"])[0] == 250
        code, text = client.data(b"From: someone@sender.example\r\nSubject: fwd\r\n\r\nforward me\r\n")
    qid = queued_as(text)
    with Queue(sub.data) as queue:
        entry = queue.get(qid)
        raw = queue.read(qid)
    assert entry.envelope.origin == "forward"
    assert re.fullmatch(r"SRS0=[^=]+=[^=]+=sender\.example=someone@mail\.example\.test", entry.envelope.sender)
    (recipient,) = entry.recipients
    assert (recipient.address, recipient.orcpt, recipient.notify) == (
        "other@remote.example", "rfc822;both@example.test", ("FAILURE",))
    assert raw.startswith(b"Received: from mx.sender.example") and b"DKIM-Signature" not in raw
    with Store(sub.data) as store:  # the local target has its copy
        assert store.mailbox("bob@example.test", "INBOX").exists == 1
    # A bounce to the SRS address goes back to the original sender, through the queue.
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("mx.remote.example")
        client.mail("")
        assert client.rcpt(entry.envelope.sender)[0] == 250
        code, text = client.data(b"From: MAILER-DAEMON@remote.example\r\nSubject: bounce\r\n\r\nno such user\r\n")
    back = queued_as(text)
    with Queue(sub.data) as queue:
        bounce = queue.get(back)
    assert bounce.envelope.sender == "" and [r.address for r in bounce.recipients] == ["someone@sender.example"]
    # A forged one is unknown here.
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("mx.remote.example")
        client.mail("")
        code, _ = client.rcpt("SRS0=AAAA=AA=sender.example=someone@mail.example.test")
    assert code == 550


def test_a_success_report_for_a_local_delivery_that_asked_for_one(sub):
    """RFC 3461 §6.2.6.1: NOTIFY=SUCCESS and delivered here: a "delivered" report to the
    sender, into her INBOX when she is ours, through the queue from <> when she is not."""
    with submit(sub) as client:
        client.mail("alice@example.test", ["ENVID=trip+2B42"])  # xtext: decoded once, "trip+42"
        assert client.rcpt("bob@example.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob+2Bx@example.test"])[0] == 250
        code, text = client.data(MESSAGE.replace(b"someone@remote.example", b"bob@example.test"))
    qid = queued_as(text)
    deadline = time.monotonic() + 10
    while "event=dsn_sent" not in sub.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    with Store(sub.data) as store:
        (report,) = [store.read_message(m) for m in store.fetch("alice@example.test", "INBOX", [(1, 2**32 - 1)])]
    assert report.startswith(b"Return-Path: <>\r\n") and b"report-type=delivery-status" in report
    assert b"Action: delivered" in report and b"Original-Recipient: rfc822;bob+x@example.test" in report
    assert b"Original-Envelope-Id: trip+42\r\n" in report and b"Subject: out" in report  # the headers returned
    assert b"Hello, world." not in report
    line = next(line for line in sub.stderr().splitlines() if "event=dsn_sent" in line)
    assert f"qid={qid}" in line and "where=store" in line
    # From the MX, to a remote sender: queued from <>; without NOTIFY=SUCCESS, nothing.
    address = sub.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("mx.sender.example")
        for notify in (["NOTIFY=SUCCESS,FAILURE"], []):
            client.mail("someone@sender.example")
            client.rcpt("bob@example.test", notify)
            code, text = client.data(b"From: someone@sender.example\r\nSubject: in\r\n\r\nhi\r\n")
            assert code == 250
    deadline = time.monotonic() + 10
    while sub.stderr().count("event=dsn_sent") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    with Queue(sub.data) as queue:
        reports = [m for m in queue.list() if m.envelope.origin == "dsn"]
    assert len(reports) == 1 and reports[0].envelope.sender == ""
    assert [r.address for r in reports[0].recipients] == ["someone@sender.example"]


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_big_signed_submission_does_not_grow_mtad_by_its_size(sub):
    """DKIM signing streams (policy/dkim_body.py): a 23 MB message to a remote recipient
    grew mtad by ~100 MiB when the spooled message was read back whole and given to dkimpy.
    Measured from after the login (argon2id's 64 MiB is the login's, not the message's)."""
    import base64
    import os

    pid = sub.child_pid("mtad")
    body = base64.encodebytes(os.urandom(17_000_000)).replace(b"\n", b"\r\n") + b"trailing  \r\n\r\n\r\n"
    message = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    assert 23_000_000 < len(message) < sub.config.smtp.max_message_size - 100_000
    with submit(sub) as client:
        client.mail("alice@example.test")
        assert client.rcpt("someone@remote.example")[0] == 250
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")  # the peak RSS starts again from here
        before = _status_kib(pid, "VmRSS")
        code, text = client.data(message)
    assert code == 250, text
    peak = _status_kib(pid, "VmHWM")
    assert peak - before < 20_000, f"mtad grew from {before} KiB to a peak of {peak} KiB"
    with Queue(sub.data) as queue:
        raw = queue.read(queued_as(text))
    name, record = sub.dkim_record
    assert raw.startswith(b"DKIM-Signature: ") and raw.endswith(body)
    assert dkim.verify(raw, dnsfunc=lambda asked, timeout=5: record if asked.decode().rstrip(".") == name else None)
