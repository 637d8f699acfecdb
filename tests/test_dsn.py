"""Delivery status notifications (mtad/dsn.py), read back with Python's email package as a
mail client would: the structure RFC 3464 and RFC 6522 give them, each field, what RET
returns, the SMTPUTF8 form (RFC 6533), and the rules on who gets one."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import tracemalloc
from email.parser import BytesHeaderParser

import pytest

from mtad.dsn import FULL_LIMIT, RecipientReport, build_report, is_bounce, wants_report, write_report

ARRIVAL = 1_796_000_000.0
NOW = ARRIVAL + 600
ORIGINAL = (
    b"Received: from client by mail.example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net, carol@example.net\r\n"
    b"Subject: the minutes\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"The body, which RET=HDRS keeps to itself.\r\n"
)
BOB_FAILED = RecipientReport(
    address="bob@example.net", orcpt="rfc822;Bob+Lists@example.net", action="failed", status="5.1.1",
    diagnostic="smtp; 550 5.1.1 <bob@example.net>: no such user", remote_mta="mx.example.net",
    last_attempt=ARRIVAL + 500, will_retry_until=None)
CAROL_DELAYED = RecipientReport(
    address="carol@example.net", orcpt=None, action="delayed", status="4.4.1",
    diagnostic="smtp; 451 4.4.1 try later", remote_mta="mx2.example.net",
    last_attempt=ARRIVAL + 550, will_retry_until=ARRIVAL + 5 * 86400)


def report(**overrides) -> bytes:
    args = dict(reporting_mta="mail.example.test", sender="alice@example.test", envid="QUEUE+42",
                arrival=ARRIVAL, recipients=[BOB_FAILED], ret=None, original=ORIGINAL, now=NOW)
    args.update(overrides)
    return build_report(**args)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def words(text: str) -> str:
    return " ".join(text.split())


def status_blocks(raw: bytes) -> list[dict[str, str]]:
    """The field blocks of the report's second part, parsed from the raw bytes (Python's
    email package reads message/global-delivery-status as one message, not as blocks)."""
    boundary = parse(raw).get_boundary().encode()
    part = raw.split(b"--" + boundary)[2]
    body = part.split(b"\r\n\r\n", 1)[1]
    blocks = [b for b in body.strip(b"\r\n").split(b"\r\n\r\n") if b.strip()]
    return [dict(BytesHeaderParser(policy=email.policy.SMTPUTF8).parsebytes(b + b"\r\n\r\n").items())
            for b in blocks]


def test_failure_report_structure_and_fields():
    raw = report()
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert b"\r\nTo: <alice@example.test>\r\n" in raw
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Message-ID"].endswith("@mail.example.test>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, returned = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = words(human.get_content())
    assert "Your message to <bob@example.net> could not be delivered" in text
    assert "The server mx.example.net answered: 550 5.1.1 <bob@example.net>: no such user" in text
    assert status.get_content_type() == "message/delivery-status"
    per_message, bob = status_blocks(raw)
    assert per_message == {"Reporting-MTA": "dns; mail.example.test", "Original-Envelope-Id": "QUEUE+42",
                           "Arrival-Date": email.utils.format_datetime(
                               email.utils.parsedate_to_datetime("Mon, 30 Nov 2026 00:53:20 +0000"))}
    assert bob == {
        "Original-Recipient": "rfc822;Bob+Lists@example.net",  # given decoded: mtad/paths.py decodes xtext once
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: no such user",
        "Last-Attempt-Date": "Mon, 30 Nov 2026 01:01:40 +0000",
    }
    # The python email package sees the same per-recipient fields.
    assert [dict(b.items())["Action"] for b in status.get_payload()[1:]] == ["failed"]
    # A small original comes back whole when RET is not given.
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = returned.get_payload()
    assert inner["Subject"] == "the minutes" and "RET=HDRS keeps" in inner.get_content()


def test_lines_are_crlf_and_short():
    raw = report(recipients=[dataclasses.replace(BOB_FAILED, diagnostic="smtp; 550 " + "x" * 3000)])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_ret_hdrs_returns_only_the_headers():
    msg = parse(report(ret="HDRS"))
    *_, returned = msg.iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"
    content = returned.get_payload(decode=True)
    assert content == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"RET=HDRS keeps" not in report(ret="HDRS")
    assert "The headers of your message are attached" in words(next(msg.iter_parts()).get_content())


def test_ret_full_and_the_default_limit():
    big = ORIGINAL + (b"y" * 998 + b"\r\n") * (FULL_LIMIT // 1000 + 1)
    # RET=FULL: the whole message, whatever its size.
    *_, returned = parse(report(ret="FULL", original=big)).iter_parts()
    assert returned.get_content_type() == "message/rfc822"
    assert big in report(ret="FULL", original=big)
    # No RET: whole up to 64 KiB, headers beyond (a bounce should not carry a big attachment back).
    *_, returned = parse(report(original=big)).iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"y" * 998 not in report(original=big)


def test_delay_report_carries_headers_and_retry_until():
    raw = report(recipients=[CAROL_DELAYED], ret="FULL")
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    human, _, returned = msg.iter_parts()
    assert returned.get_content_type() == "text/rfc822-headers"  # RET=FULL is for failures
    assert "has not been delivered yet" in words(human.get_content())
    assert "delivery will be tried again until Sat, 05 Dec 2026 00:53:20 +0000" in words(human.get_content())
    _, carol = status_blocks(raw)
    assert carol["Action"] == "delayed" and carol["Status"] == "4.4.1"
    assert carol["Will-Retry-Until"] == "Sat, 05 Dec 2026 00:53:20 +0000"
    assert "Original-Recipient" not in carol


def test_success_report():
    delivered = RecipientReport("bob@example.net", None, "delivered", "2.0.0", None, None, None, None)
    relayed = RecipientReport("dan@example.org", None, "relayed", "2.0.0", "smtp; 250 2.0.0 ok", "mx.example.org",
                              NOW, None)
    raw = report(recipients=[delivered, relayed], envid=None)
    msg = parse(raw)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    human, _, returned = msg.iter_parts()
    assert "Your message to <bob@example.net> was delivered." in words(human.get_content())
    assert "passed on to a server that does not send delivery reports" in words(human.get_content())
    per_message, bob, dan = status_blocks(raw)
    assert "Original-Envelope-Id" not in per_message
    assert (bob["Action"], dan["Action"], dan["Remote-MTA"]) == ("delivered", "relayed", "dns; mx.example.org")
    assert returned.get_content_type() == "text/rfc822-headers"


def test_smtputf8_report_uses_the_global_types():
    original = "From: Jörg <jörg@example.test>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    failed = RecipientReport("bjørn@exämple.net", "utf-8;bjørn@exämple.net", "failed", "5.1.1",
                             "smtp; 550 5.1.1 unknown", "mx.xn--exmple-cua.net", NOW, None)
    raw = report(recipients=[failed], original=original, smtputf8=True, sender="jörg@example.test", envid=None)
    msg = parse(raw)
    assert msg.get_param("report-type") == "global-delivery-status"
    human, status, returned = msg.iter_parts()
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global"
    assert human.get_content_charset() == "utf-8" and "<bjørn@exämple.net>" in human.get_content()
    _, bjorn = status_blocks(raw)
    assert bjorn["Final-Recipient"] == "utf-8; bjørn@exämple.net"
    assert bjorn["Original-Recipient"] == "utf-8;bjørn@exämple.net"
    raw = report(recipients=[failed], original=original, smtputf8=True, ret="HDRS")
    *_, returned = parse(raw).iter_parts()
    assert returned.get_content_type() == "message/global-headers"
    # Without SMTPUTF8, a UTF-8 address is escaped (RFC 6533 §3, embedded-unicode).
    _, bjorn = status_blocks(report(recipients=[failed]))
    assert bjorn["Final-Recipient"] == "utf-8; bj\\x{F8}rn@ex\\x{E4}mple.net"


def test_remote_text_cannot_add_header_fields():
    evil = RecipientReport("bob@example.net", None, "failed", "5.0.0",
                           "smtp; 550 no\r\nX-Evil: yes\r\n\r\n--boundary", "mx.example.net\r\nX-Host: 1", NOW, None)
    raw = report(recipients=[evil])
    _, bob = status_blocks(raw)
    assert "X-Evil" not in bob and "X-Host" not in bob
    assert bob["Diagnostic-Code"] == "smtp; 550 no X-Evil: yes --boundary"
    assert len(list(parse(raw).iter_parts())) == 3


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        report(recipients=[])
    with pytest.raises(ValueError):
        report(recipients=[RecipientReport("a@b.c", None, "bounced", "5.1.1")])
    with pytest.raises(ValueError):
        report(recipients=[RecipientReport("a@b.c", None, "failed", "550")])


def test_big_original_is_streamed_not_held(tmp_path):
    """A 25 MB original, from a file, to a file: the copy goes through in chunks, so the
    report never costs more than a small multiple of a chunk in memory."""
    path = tmp_path / "original"
    with open(path, "wb") as f:
        f.write(ORIGINAL)
        line = b"z" * 998 + b"\r\n"
        for _ in range(25 * 1024 * 1024 // len(line)):
            f.write(line)
    out_path = tmp_path / "report"
    sizes = []
    with open(path, "rb") as original, open(out_path, "wb") as out:
        def write(chunk: bytes) -> None:
            sizes.append(len(chunk))
            out.write(chunk)

        tracemalloc.start()
        write_report(write, reporting_mta="mail.example.test", sender="alice@example.test", envid=None,
                     arrival=ARRIVAL, recipients=[BOB_FAILED], ret="FULL", original=original, now=NOW)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    assert max(sizes) <= 64 * 1024 + 4096
    assert out_path.stat().st_size > path.stat().st_size
    with open(out_path, "rb") as f:
        tail = f.read()[-200:]
    assert tail.endswith(b"--\r\n") and b"z" * 100 + b"\r\n\r\n--=_" in tail


@pytest.mark.parametrize("notify, action, expected", [
    ((), "failed", True), ((), "delayed", True), ((), "delivered", False), ((), "relayed", False),
    (("NEVER",), "failed", False), (("NEVER",), "delayed", False),
    (("SUCCESS",), "delivered", True), (("SUCCESS",), "relayed", True), (("SUCCESS",), "expanded", True),
    (("SUCCESS",), "failed", False), (("success", "delay"), "delayed", True),
    (("FAILURE",), "delayed", False), (("FAILURE",), "failed", True), (("DELAY",), "failed", False),
])
def test_wants_report(notify, action, expected):
    assert wants_report(notify, action) is expected


def test_never_a_report_to_null_or_of_a_report():
    assert is_bounce("", ORIGINAL)
    assert is_bounce("MAILER-DAEMON@mx.example.net")
    assert not is_bounce("alice@example.test", ORIGINAL)
    # A report some relay passed on with a sender is still a report.
    dsn = report()
    assert is_bounce("relay@example.net", dsn)
    assert is_bounce("x@example.net", b"Content-Type: multipart/report;\r\n report-type=\"global-delivery-status\";"
                                      b" boundary=x\r\n\r\n")
    mdn = b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"
    assert not is_bounce("x@example.net", mdn)  # a read receipt is not a bounce
    # The report itself says it is automatic, and it goes out with the null sender.
    assert parse(dsn)["Auto-Submitted"] == "auto-replied"
