"""AUTH (RFC 4954, SASL PLAIN and LOGIN) and the DSN parameters (RFC 3461) in the sans-IO
SMTP session (mtad/session.py, mtad/sasl.py, mtad/paths.py), fed scripted bytes whole and
in 1-10 byte fragments. The adapter's part is tests/core_drivers.SMTPDriver: AUTH succeeds
with SMTP_PASSWORD. And the pure reading of a submitted message's header (mtad/headers.py)."""

from __future__ import annotations

import base64
import random
import re

import pytest

from core_drivers import SMTP_PASSWORD, SMTPDriver, cut
from mtad.events import Auth, MailDSN, RcptDSN
from mtad.headers import HeaderBlock, fields, from_addresses, missing_fields
from mtad.paths import decode_xtext, encode_xtext
from mtad.session import MAX_SASL_LINE, SessionConfig
from mtad.states import State

SUBMISSION = SessionConfig("mail.example.test", max_message_size=10_000, max_recipients=5, tls_available=True,
                           auth=True, dsn=True)
SUBMISSION_TLS = SessionConfig("mail.example.test", max_message_size=10_000, max_recipients=5, tls_available=True,
                               is_tls=True, auth=True, dsn=True)
MX = SessionConfig("mx.example.test", max_message_size=10_000, max_recipients=5, tls_available=True, dsn=True)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


PLAIN_OK = b"AUTH PLAIN " + b64(f"\0alice@example.test\0{SMTP_PASSWORD}") + b"\r\n"
PLAIN_WRONG = b"AUTH PLAIN " + b64("\0alice@example.test\0wrong") + b"\r\n"


def run(script: bytes, config: SessionConfig = SUBMISSION_TLS, seed: int | None = None) -> tuple[list[str], SMTPDriver]:
    """Each reply's last line as "code enhanced" (or "code text" for 334), and the driver;
    fed whole, or in random 1-10 byte pieces for a seed."""
    driver = SMTPDriver(config)
    if seed is None:
        driver.feed([script])
    else:
        rng = random.Random(seed)
        driver.feed(cut(script, [rng.randint(1, 10) for _ in range(len(script))]))
    return codes(driver.wire.decode()), driver


def codes(wire: str) -> list[str]:
    out = []
    for line in wire.split("\r\n"):
        if line.startswith("334 "):
            out.append(line)
        elif m := re.match(r"^(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", line):
            out.append(f"{m.group(1)} {m.group(2)}" if m.group(2) else m.group(1))
    return out[1:]  # not the greeting


def ehlo_keywords(driver: SMTPDriver) -> set[str]:
    """The keywords of the first EHLO reply."""
    lines = driver.wire.decode().split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("250-"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("250 "))
    return {line[4:] for line in lines[start + 1:end + 1]}


# -- what is offered, and when ---------------------------------------------------------------

def test_auth_is_offered_only_once_the_session_is_tls():
    got, driver = run(b"EHLO c\r\n", SUBMISSION)
    assert "STARTTLS" in ehlo_keywords(driver) and not any(k.startswith("AUTH") for k in ehlo_keywords(driver))
    # Before TLS: AUTH is refused as needing encryption (RFC 4954 §6), MAIL as needing AUTH.
    got, driver = run(b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n", SUBMISSION)
    assert got == ["250", "538 5.7.11", "530 5.7.0"]
    assert not any(event[0] == "auth" for event in driver.events)  # the password never reached the adapter
    # After STARTTLS the client greets again, and AUTH is offered and works.
    driver.feed([b"STARTTLS\r\n"])
    driver.feed([b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n"])
    assert "AUTH PLAIN LOGIN" in driver.wire.decode().split("220 2.0.0 Ready to start TLS\r\n")[1]
    assert codes(driver.wire.decode())[-3:] == ["250", "235 2.7.0", "250 2.1.0"]
    assert driver.session.authenticated == "alice@example.test"


def test_implicit_tls_offers_auth_at_once():
    _, driver = run(b"EHLO c\r\n", SUBMISSION_TLS)
    assert {"AUTH PLAIN LOGIN", "DSN"} <= ehlo_keywords(driver) and "STARTTLS" not in ehlo_keywords(driver)


def test_the_mx_offers_dsn_and_no_auth():
    got, driver = run(b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<a@b.example>\r\n", MX)
    assert "DSN" in ehlo_keywords(driver) and not any(k.startswith("AUTH") for k in ehlo_keywords(driver))
    assert got == ["250", "503 5.5.1", "250 2.1.0"]


def test_plaintext_auth_is_a_setting():
    config = SessionConfig("m", 10_000, 5, tls_available=False, auth=True, plaintext_auth=True)
    got, _ = run(b"EHLO c\r\n" + PLAIN_OK, config)
    assert got == ["250", "235 2.7.0"]


def test_mail_before_auth_is_530():
    got, _ = run(b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\n" + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n")
    assert got == ["250", "530 5.7.0", "235 2.7.0", "250 2.1.0"]


# -- the SASL exchange -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_plain_with_and_without_initial_response(seed):
    got, driver = run(b"EHLO c\r\n" + PLAIN_OK, seed=seed)
    assert got == ["250", "235 2.7.0"]
    got, driver = run(b"EHLO c\r\nAUTH PLAIN\r\n" + b64(f"\0alice@example.test\0{SMTP_PASSWORD}") + b"\r\n", seed=seed)
    assert got == ["250", "334 ", "235 2.7.0"]
    assert ("auth", "PLAIN", "alice@example.test", "") in driver.events


@pytest.mark.parametrize("seed", [None, 4, 5])
def test_login_prompts_for_user_and_password(seed):
    got, driver = run(b"EHLO c\r\nauth login\r\n" + b64("bob@example.test") + b"\r\n" + b64(SMTP_PASSWORD) + b"\r\n",
                      seed=seed)
    assert got == ["250", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0"]
    assert ("auth", "LOGIN", "bob@example.test", "") in driver.events
    # An initial response is the user name.
    got, _ = run(b"EHLO c\r\nAUTH LOGIN " + b64("bob@example.test") + b"\r\n" + b64(SMTP_PASSWORD) + b"\r\n", seed=seed)
    assert got == ["250", "334 UGFzc3dvcmQ6", "235 2.7.0"]


def test_authzid_is_passed_to_the_adapter_and_the_password_never_shown():
    _, driver = run(b"EHLO c\r\nAUTH PLAIN " + b64(f"boss@example.test\0alice@example.test\0{SMTP_PASSWORD}") + b"\r\n")
    assert ("auth", "PLAIN", "alice@example.test", "boss@example.test") in driver.events
    assert SMTP_PASSWORD not in repr(Auth("PLAIN", "alice@example.test", SMTP_PASSWORD))


@pytest.mark.parametrize("script, expected", [
    (b"AUTH PLAIN\r\n*\r\n", ["334 ", "501 5.0.0"]),  # cancelled (RFC 4954 §4)
    (b"AUTH LOGIN\r\n" + b64("bob@example.test") + b"\r\n*\r\n", ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "501 5.0.0"]),
    (b"AUTH PLAIN !!!notbase64\r\n", ["501 5.5.2"]),
    (b"AUTH PLAIN\r\nAAA=AAA\r\n", ["334 ", "501 5.5.2"]),
    (b"AUTH PLAIN\r\n\xff\xfe\r\n", ["334 ", "501 5.5.2"]),
    (b"AUTH PLAIN " + b64("no nuls in it") + b"\r\n", ["501 5.5.2"]),
    (b"AUTH PLAIN " + base64.b64encode(b"\0al\xffice\0pw") + b"\r\n", ["501 5.5.2"]),  # not UTF-8
    (b"AUTH PLAIN =\r\n", ["501 5.5.2"]),  # an empty PLAIN message
    (b"AUTH CRAM-MD5\r\n", ["504 5.5.4"]),
    (b"AUTH\r\n", ["501 5.5.4"]),
    (b"AUTH PLAIN a b\r\n", ["501 5.5.4"]),
    (PLAIN_WRONG, ["535 5.7.8"]),
])
def test_failed_exchanges_leave_the_session_usable(script, expected):
    got, driver = run(b"EHLO c\r\n" + script + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n")
    assert got == ["250", *expected, "235 2.7.0", "250 2.1.0"]
    assert driver.session.state is State.READY


def test_auth_twice_and_auth_in_a_transaction_are_503():
    got, _ = run(b"EHLO c\r\n" + PLAIN_OK + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n" + PLAIN_OK + b"RSET\r\n"
                 + PLAIN_OK)
    assert got == ["250", "235 2.7.0", "503 5.5.1", "250 2.1.0", "503 5.5.1", "250 2.0.0", "503 5.5.1"]
    _, driver = run(b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<alice@example.test>\r\n" + PLAIN_OK)
    assert driver.wire.decode().endswith("503 5.5.1 AUTH not allowed during a mail transaction\r\n")


def test_auth_needs_a_greeting_first():
    got, _ = run(PLAIN_OK)
    assert got == ["503 5.5.1"]


def test_pipelined_auth_and_mail_are_answered_in_order():
    script = b"EHLO c\r\n" + PLAIN_WRONG + b"MAIL FROM:<alice@example.test>\r\n" + PLAIN_OK + \
        b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\nSubject: s\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    for seed in (None, 7, 8):
        got, driver = run(script, seed=seed)
        assert got == ["250", "535 5.7.8", "530 5.7.0", "235 2.7.0", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0",
                       "221 2.0.0"]
        assert driver.messages == [b"Subject: s\r\n\r\nhi\r\n"]


def test_a_long_sasl_response_is_taken_and_an_overlong_one_ends_the_exchange():
    password = "p" * 6000  # base64 of it is over 512 octets, far under 12288
    got, driver = run(b"EHLO c\r\nAUTH PLAIN\r\n" + b64(f"\0alice@example.test\0{password}") + b"\r\n")
    assert got == ["250", "334 ", "535 5.7.8"]  # read whole and passed on, wrong as it is
    got, driver = run(b"EHLO c\r\nAUTH PLAIN\r\n" + b"A" * (MAX_SASL_LINE + 100) + b"\r\n" + PLAIN_OK, seed=None)
    assert got == ["250", "334 ", "500 5.5.6", "235 2.7.0"]


def test_an_initial_response_may_be_as_long_as_a_sasl_response():
    """RFC 4954 §4: the AUTH command line with an initial response may take 12288 octets,
    not 512 (a 700-character password was refused 500 Line too long: found by an attack)."""
    password = "p" * 6000
    got, _ = run(b"EHLO c\r\nAUTH PLAIN " + b64(f"\0alice@example.test\0{password}") + b"\r\n" + PLAIN_OK, seed=3)
    assert got == ["250", "535 5.7.8", "235 2.7.0"]
    # Over the limit: refused and skipped whole; and on the MX, where AUTH is not offered,
    # any line over 512 octets is too long.
    got, _ = run(b"EHLO c\r\nAUTH PLAIN " + b"A" * MAX_SASL_LINE + b"\r\n" + PLAIN_OK)
    assert got[0] == "250" and got[1].startswith("500") and got[2] == "235 2.7.0"
    got, _ = run(b"EHLO c\r\nAUTH PLAIN " + b"A" * 1000 + b"\r\n", MX)
    assert got == ["250", "500 5.5.2"]


def test_starttls_forgets_the_authentication():
    got, driver = run(b"EHLO c\r\n" + PLAIN_OK, SessionConfig("m", 10_000, 5, tls_available=True, auth=True,
                                                            plaintext_auth=True))
    assert driver.session.authenticated
    driver.feed([b"STARTTLS\r\n"])
    assert driver.session.authenticated is None
    driver.feed([b"EHLO c\r\nMAIL FROM:<alice@example.test>\r\n"])
    assert codes(driver.wire.decode())[-1] == "530 5.7.0"


def test_failed_auths_count_against_the_error_budget():
    config = SessionConfig("m", 10_000, 5, tls_available=False, is_tls=True, auth=True, max_errors=3)
    got, driver = run(b"EHLO c\r\n" + PLAIN_WRONG * 5)
    got, driver = run(b"EHLO c\r\n" + PLAIN_WRONG * 5, config)
    assert got == ["250", "535 5.7.8", "535 5.7.8", "421 4.7.0"] and driver.closed


# -- DSN parameters (RFC 3461) ---------------------------------------------------------------

def _dsn_events(script: bytes, config: SessionConfig = MX) -> tuple[list[str], list]:
    got, driver = run(b"EHLO c\r\n" + script, config)
    return got[1:], driver.asked


def test_dsn_parameters_are_checked_and_carried():
    got, asked = _dsn_events(b"MAIL FROM:<a@b.example> RET=hdrs ENVID=QQ+2B1+3Dx\r\n"
                             b"RCPT TO:<c@example.test> NOTIFY=success,Delay ORCPT=rfc822;c+2Bx@example.test\r\n"
                             b"RCPT TO:<d@example.test> NOTIFY=NEVER\r\nRCPT TO:<e@example.test>\r\n")
    assert got == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"]
    mail, first, second, third = asked
    assert mail.dsn == MailDSN("HDRS", "QQ+1=x")
    assert first.dsn == RcptDSN(("SUCCESS", "DELAY"), "rfc822;c+x@example.test")
    assert second.dsn == RcptDSN(("NEVER",), None) and third.dsn == RcptDSN((), None)


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@b.example> RET=PARTIAL", b"MAIL FROM:<a@b.example> RET",
    b"MAIL FROM:<a@b.example> ENVID=" + b"x" * 101,
    b"MAIL FROM:<a@b.example> ENVID=a+0Ab", b"MAIL FROM:<a@b.example> ENVID=a+2b", b"MAIL FROM:<a@b.example> ENVID=a+",
])
def test_bad_mail_dsn_parameters_are_501(line):
    got, asked = _dsn_events(line + b"\r\n")
    assert got == ["501 5.5.4"] and asked == []


@pytest.mark.parametrize("param", [
    b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=", b"NOTIFY=SUCCESS,,DELAY", b"NOTIFY=SOMETIMES", b"NOTIFY=DELAY,DELAY",
    b"ORCPT=c@example.test", b"ORCPT=rfc822;", b"ORCPT=rfc822;c+0D+0A@x", b"ORCPT=rfc(822);c", b"ORCPT=rfc822;c+ZZ",
])
def test_bad_rcpt_dsn_parameters_are_501(param):
    got, asked = _dsn_events(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.test> " + param + b"\r\n")
    # "NOTIFY=" is no esmtp-param at all (RFC 5321 §4.1.2): a syntax error of the whole argument.
    assert got == ["250 2.1.0", "501 5.1.3" if param == b"NOTIFY=" else "501 5.5.4"] and len(asked) == 1


def test_without_the_dsn_extension_its_parameters_are_unknown():
    config = SessionConfig("mx", 10_000, 5, tls_available=True)
    _, driver = run(b"EHLO c\r\nMAIL FROM:<a@b.example> RET=FULL\r\nMAIL FROM:<a@b.example>\r\n"
                    b"RCPT TO:<c@example.test> NOTIFY=NEVER\r\n", config)
    assert codes(driver.wire.decode()) == ["250", "555 5.5.4", "250 2.1.0", "555 5.5.4"]
    assert "DSN" not in driver.wire.decode()


def test_mail_auth_parameter_is_taken_on_submission_only():
    got, _ = run(b"EHLO c\r\n" + PLAIN_OK + b"MAIL FROM:<alice@example.test> AUTH=<>\r\n")
    assert got[-1] == "250 2.1.0"
    got, _ = run(b"EHLO c\r\nMAIL FROM:<a@b.example> AUTH=<>\r\n", MX)
    assert got[-1] == "555 5.5.4"


@pytest.mark.parametrize("text", ["plain", "a+b=c", "sp ace", "\x01\x7f", "ünï"])
def test_xtext_round_trips(text):
    encoded = encode_xtext(text)
    assert "=" not in encoded and " " not in encoded and decode_xtext(encoded) == text


# -- a submitted message's header (mtad/headers.py) ------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (" Alice <alice@example.test>", ["alice@example.test"]),
    (" alice@example.test", ["alice@example.test"]),
    (" alice@example.test (Alice)", ["alice@example.test"]),
    (' "Smith, Alice" <alice@example.test>, bob@example.test', ["alice@example.test", "bob@example.test"]),
    (' "alice@example.test" <bob@example.test>', ["bob@example.test"]),
    (' "a \\" <x@y.example>" <alice@example.test>', ["alice@example.test"]),
    (" (<x@y.example>) alice@example.test", ["alice@example.test"]),
    (" =?utf-8?q?J=C3=B6rg?= <jörg@example.test>", ["jörg@example.test"]),
    (" alice@example.org)<bob@example.org>", None),  # what getaddresses reads as three
    (" undisclosed-recipients:;", None),
    (" <alice@example.test> trailing", None),
    (" Alice <alice@example.test", None),
    (' "unterminated <alice@example.test>', None),
    (" (unterminated <alice@example.test>", None),
    (" a@b.example <c@d.example> <e@f.example>", None),
    (" <>", None),
    ("", None),
    (" Alice Smith", None),
])
def test_from_addresses(value, expected):
    assert from_addresses(value) == expected


@pytest.mark.parametrize("seed", range(20))
def test_the_header_block_ends_at_the_first_empty_line_however_cut(seed):
    message = b"From: a@b.example\r\nSubject: s\r\n folded\r\n\r\nbody\r\n\r\nmore\r\n"
    rng = random.Random(seed)
    block = HeaderBlock()
    pieces = cut(message, [rng.randint(1, 6) for _ in range(len(message))])
    for i, piece in enumerate(pieces):
        if block.feed(piece):
            rest = block.rest + b"".join(pieces[i + 1:])
            break
    assert block.header == b"From: a@b.example\r\nSubject: s\r\n folded\r\n" and rest == b"\r\nbody\r\n\r\nmore\r\n"
    assert fields(block.header) == [("from", " a@b.example"), ("subject", " s folded")]


def test_a_header_block_without_fields_or_without_body():
    block = HeaderBlock()
    assert block.feed(b"\r\nbody only\r\n") and block.header == b"" and block.rest == b"\r\nbody only\r\n"
    block = HeaderBlock()
    assert not block.feed(b"Subject: no body\r\n")
    block.finish()
    assert block.header == b"Subject: no body\r\n" and block.rest == b""


def test_obsolete_from_syntax_and_stray_lines_are_counted():
    got = fields(b"From : a@b.example\r\nnot a field\r\nFROM:c@d.example\r\n")
    assert [name for name, _ in got] == ["from", "", "from"]


def test_missing_date_and_message_id_are_added_once():
    added = missing_fields(fields(b"From: a@b.example\r\n"), "mail.example.test", now=0)
    assert re.fullmatch(rb"Date: Thu, 01 Jan 1970 [^\r]+\r\nMessage-ID: <[0-9a-f.]+@mail\.example\.test>\r\n",
                        added)
    assert missing_fields(fields(b"DATE: x\r\nMessage-Id: <y@z>\r\n"), "m") == b""
