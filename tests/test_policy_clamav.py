"""The anti-virus scan and the per-user rates in the running daemon, and the loop never
stalled by a check: a real clamd (tests/clamd_peer.py, Debian's clamav-daemon with a
one-signature database), a clamd that never answers, a DNS server that never answers."""

from __future__ import annotations

import smtplib
import threading
import time
import uuid

import pytest

from clamd_peer import Clamd, SilentClamd
from conftest import client_tls_context
from dnszone import DNSZone
from test_policy_mx import ALLOWED, PASSWORD, ZONE, find, message, send, start_mx, stop_mx

# The EICAR test file (not a virus: the string every scanner reports as one).
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def infected(subject: str = "eicar") -> bytes:
    return message("x@softfail.example", subject=subject, body=EICAR.decode() + "\r\n")


def mx_send(daemon, raw: bytes):
    return send(daemon, raw, sender="x@softfail.example")


@pytest.fixture
def zone():
    with DNSZone(ZONE, silent={"slow.example"}) as served:
        yield served


def submit(daemon, user: str = "bob@example.test") -> smtplib.SMTP:
    address = daemon.listen("submission.listen")
    client = smtplib.SMTP(address.host, address.port, timeout=30)
    client.ehlo("laptop.example.org")
    client.starttls(context=client_tls_context(daemon.config))
    client.ehlo("laptop.example.org")
    client.login(user, PASSWORD)
    return client


def submitted(subject: str, body: str = "Hello\r\n") -> bytes:
    return (f"From: bob@example.test\r\nTo: carol@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\n{body}").encode()


def test_a_virus_is_refused_554_and_never_stored_a_clean_message_is_marked(tmp_path, zone):
    with Clamd() as clamd:
        daemon = start_mx(tmp_path, zone, clamav={"enabled": True, "address": clamd.address, "timeout": 10})
        try:
            code, text = mx_send(daemon, infected())
            assert code == 554 and text.startswith(b"5.7.1") and b"Eicar-Test-Signature" in text
            assert daemon.store.uids("bob@example.test", "INBOX")[1] == []
            assert "virus=Eicar-Test-Signature" in daemon.stdout() + daemon.stderr()
            assert mx_send(daemon, message("x@softfail.example", subject="clean"))[0] == 250
            parsed = find(daemon, "clean")[1]
            assert parsed["X-Virus-Scanned"].startswith("clean")
            # Submitted mail is scanned too.
            with submit(daemon) as client:
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    client.sendmail("bob@example.test", ["carol@example.test"],
                                    submitted("eicar out", EICAR.decode() + "\r\n"))
                assert refused.value.smtp_code == 554 and b"Eicar-Test-Signature" in refused.value.smtp_error
                client.sendmail("bob@example.test", ["carol@example.test"], submitted("clean out"))
            assert find(daemon, "clean out", "carol@example.test")[1]["X-Virus-Scanned"].startswith("clean")
            # clamd stops: a temporary failure, not a message let through unscanned.
            clamd.stop()
            code, text = mx_send(daemon, infected("after stop"))
            assert code == 451 and text.startswith(b"4.7.1")
            assert daemon.store.uids("bob@example.test", "INBOX")[1] != [] and \
                all(b"after stop" not in daemon.store.read_message(m)
                    for m in daemon.store.fetch("bob@example.test", "INBOX", [(1, 2**32 - 1)]))
        finally:
            stop_mx(daemon)


def test_with_on_failure_accept_an_unscanned_message_is_delivered_and_says_so(tmp_path, zone):
    with SilentClamd() as fake:
        daemon = start_mx(tmp_path, zone, clamav={"enabled": True, "address": fake.address, "timeout": 1,
                                                  "on_failure": "accept"})
        try:
            assert mx_send(daemon, message("x@softfail.example", subject="unscanned"))[0] == 250
            parsed = find(daemon, "unscanned")[1]
            assert parsed["X-Virus-Scanned"].startswith("no,")
        finally:
            stop_mx(daemon)


def test_per_user_rates_on_submission(tmp_path, zone):
    daemon = start_mx(tmp_path, zone, rates={"user_messages_per_hour": 2, "user_recipients_per_day": 3})
    try:
        with submit(daemon) as client:
            client.sendmail("bob@example.test", ["carol@example.test", "bob@example.test"], submitted("one"))
            # The fourth recipient today is refused, the third taken.
            refused = client.sendmail("bob@example.test", ["carol@example.test", "bob@example.test"],
                                      submitted("two"))
            assert list(refused) == ["bob@example.test"] and refused["bob@example.test"][0] == 450
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # the third message this hour
                client.sendmail("bob@example.test", ["carol@example.test"], submitted("three"))
            assert refused.value.smtp_code == 450 and refused.value.smtp_error.startswith(b"4.7.1")
        with submit(daemon, "carol@example.test") as client:  # another user: buckets of her own
            client.sendmail("carol@example.test", ["bob@example.test"],
                            submitted("from carol").replace(b"From: bob@", b"From: carol@"))
    finally:
        stop_mx(daemon)


def test_a_slow_dns_server_and_a_slow_clamd_hold_up_only_their_own_sessions(tmp_path, zone):
    with SilentClamd() as fake:
        # Rates counted for loopback too: their table work must not queue behind the scans.
        daemon = start_mx(tmp_path, zone, clamav={"enabled": True, "address": fake.address, "timeout": 4},
                          dns={"timeout": 4}, rates={"exempt": [], "connections_per_minute": 1000})
        try:
            address = daemon.listen("smtp.listen")
            started = threading.Event()
            outcomes: dict[str, tuple] = {}

            def waits_on_dns() -> None:  # SPF of slow.example: its server never answers
                with smtplib.SMTP(address.host, address.port, timeout=30, source_address=(ALLOWED, 0)) as client:
                    client.ehlo()
                    started.set()
                    t0 = time.monotonic()
                    outcomes["dns"] = (client.mail("x@slow.example"), time.monotonic() - t0)

            def waits_on_clamd() -> None:
                t0 = time.monotonic()
                outcomes["clamd"] = (mx_send(daemon, message("x@softfail.example", subject="slow scan")),
                                     time.monotonic() - t0)

            def waits_on_clamd_too(i: int) -> None:
                outcomes[f"clamd{i}"] = mx_send(daemon, message("x@softfail.example", subject=f"slow scan {i}"))

            # Ten scans waiting at once: more than the CPU and table threads together.
            threads = [threading.Thread(target=waits_on_dns), threading.Thread(target=waits_on_clamd)] + \
                [threading.Thread(target=waits_on_clamd_too, args=(i,)) for i in range(9)]
            for thread in threads:
                thread.start()
            started.wait(10)
            time.sleep(0.5)  # both are waiting now: DNS is asked at MAIL, clamd at the end of data
            t0 = time.monotonic()  # from the connection on: the greeting must not wait either
            with smtplib.SMTP(address.host, address.port, timeout=30, source_address=(ALLOWED, 0)) as client:
                client.ehlo()
                assert client.mail("x@softfail.example")[0] == 250
                assert client.rcpt("carol@example.test")[0] == 250
                quick = time.monotonic() - t0
            for thread in threads:
                thread.join(30)
            assert quick < 1.0, f"connect to RCPT took {quick:.2f} s while others waited"
            (code, _), took = outcomes["dns"]
            assert code == 250 and took >= 3  # SPF temperror is recorded, not refused
            (code, _), took = outcomes["clamd"]
            assert code == 451 and took >= 3  # not scanned: tempfail
        finally:
            stop_mx(daemon)


def test_submitted_mail_cannot_carry_results_in_our_name(tmp_path, zone):
    """A user must not hand a recipient "dkim=pass header.d=paypal.com" under our
    authserv-id: submission removes such fields as the MX does."""
    daemon = start_mx(tmp_path, zone)
    try:
        forged = ("Authentication-Results: mail.example.test; dkim=pass header.d=paypal.com\r\n"
                  "Authentication-Results: =?us-ascii?q?mail.example.test?=; spf=pass\r\n"
                  "Authentication-Results: mx.elsewhere.example; spf=pass\r\n")
        raw = submitted("forged results").replace(b"Subject:", forged.encode() + b"Subject:")
        with submit(daemon) as client:
            client.sendmail("bob@example.test", ["carol@example.test"], raw)
        parsed = find(daemon, "forged results", "carol@example.test")[1]
        assert parsed.get_all("Authentication-Results") == ["mx.elsewhere.example; spf=pass"]
    finally:
        stop_mx(daemon)
