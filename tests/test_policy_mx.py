"""The policy chain in the running MX (mtad/inbound.py, policy/chain.py), as other servers
meet it: SPF, DKIM, DMARC and DNSBL answered by a DNS zone served on loopback
(tests/dnszone.py), messages signed here with dkimpy, clients sending from chosen
127.0.0.0/8 addresses, the verdict read back from the store (INBOX or Junk, and the
Authentication-Results: and X-Spam-* fields in front of the message)."""

from __future__ import annotations

import base64
import email
import email.policy
import smtplib
import time
import uuid
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

import conf
from conftest import CHEAP_PASSWORDS, LISTENERS, free_port, render_config, start_daemon
from dnszone import DNSZone
from postroom.datadir import open_accounts
from storage import open_data_dir
from storage.store import Store

ALLOWED, FORBIDDEN, LISTED = "127.0.0.2", "127.0.0.3", "127.0.0.9"
AUTHSERV = "mail.example.test"
PASSWORD = "correct horse battery"


# -- keys and the zone -------------------------------------------------------------------

def _rsa_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


def _ed25519_key() -> tuple[bytes, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"


def txt(text: str) -> str:
    """A TXT record's zone text: strings of at most 255 octets (RFC 1035 §3.3.14)."""
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


RSA_KEY, RSA_RECORD = _rsa_key()
ED_KEY, ED_RECORD = _ed25519_key()
OTHER_KEY, OTHER_RECORD = _rsa_key()

ZONE = {
    "example.org": {"TXT": [txt(f"v=spf1 ip4:{ALLOWED} -all")]},
    "sel._domainkey.example.org": {"TXT": [txt(RSA_RECORD)]},
    "ed._domainkey.example.org": {"TXT": [txt(ED_RECORD)]},
    # p for example.org, sp for its subdomains (found through the organizational domain).
    "_dmarc.example.org": {"TXT": [txt("v=DMARC1; p=reject; sp=quarantine")]},
    "sub.example.org": {"TXT": [txt(f"v=spf1 ip4:{ALLOWED} -all")]},
    "quarantine.example": {"TXT": [txt("v=spf1 -all")]},
    "_dmarc.quarantine.example": {"TXT": [txt("v=DMARC1; p=quarantine")]},
    "other.example": {"TXT": [txt(f"v=spf1 ip4:{ALLOWED} -all")]},
    "sel._domainkey.other.example": {"TXT": [txt(OTHER_RECORD)]},
    "softfail.example": {"TXT": [txt("v=spf1 ~all")]},
    "pct.example": {"TXT": [txt("v=spf1 ?all")]},  # neutral: the score alone stays under Junk
    "_dmarc.pct.example": {"TXT": [txt("v=DMARC1; p=quarantine; pct=50")]},
    # The DNSBL: 127.0.0.9 is listed (RFC 5782 §2.1: the octets reversed under the zone).
    "9.0.0.127.bl.example": {"A": ["127.0.0.2"], "TXT": [txt("Listed for testing, see https://bl.example/9")]},
}


def message(sender: str = "alice@example.org", *, subject: str = "hello", body: str = "Hi Bob,\r\nlunch?\r\n",
            extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>\r\n"
            f"{extra}\r\n{body}").encode()


def signed(raw: bytes, domain: str = "example.org", selector: str = "sel", key: bytes = RSA_KEY,
           algorithm: bytes = b"rsa-sha256") -> bytes:
    signature = dkim.sign(raw, selector.encode(), domain.encode(), key, signature_algorithm=algorithm,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + raw


# -- the daemon ------------------------------------------------------------------------------

def start_mx(tmp: Path, zone: DNSZone, **sections: dict) -> tuple:
    data_dir = tmp / "var"
    config = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir), "log_level": "info"},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
        "storage": {"shards": 4},
        "smtp": {"max_connections_per_ip": 200},
        "dns": {"nameservers": ["127.0.0.1"], "port": zone.port, "timeout": 2},
        "policy": {"enabled": True, "dnsbl_zones": ["bl.example"]},
        "accounts": dict(CHEAP_PASSWORDS),
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        config.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    path = tmp / "postroom.toml"
    path.write_text(render_config(config))
    _, accounts = open_accounts(conf.load(path))
    with accounts:
        accounts.add_domain("example.test")
        for user in ("bob", "carol"):
            accounts.add_user(f"{user}@example.test", PASSWORD)
    daemon = start_daemon(path, tmp)
    daemon.store = Store(open_data_dir(data_dir, 4))
    return daemon


def stop_mx(daemon) -> None:
    daemon.store.close()
    assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture(scope="module")
def zone():
    with DNSZone(ZONE) as served:
        yield served


@pytest.fixture(scope="module")
def mx(tmp_path_factory, zone):
    daemon = start_mx(tmp_path_factory.mktemp("mx"), zone)
    yield daemon
    stop_mx(daemon)


def send(daemon, raw: bytes, *, sender: str = "alice@example.org", to: tuple[str, ...] = ("bob@example.test",),
         source: str = ALLOWED, helo: str = "mx.example.org") -> tuple[int, bytes]:
    """One transaction from `source`: the first refusal (code, text) or the DATA reply."""
    address = daemon.listen("smtp.listen")
    with smtplib.SMTP(address.host, address.port, timeout=30, source_address=(source, 0),
                      local_hostname=helo) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for recipient in to:
            code, text = client.rcpt(recipient)
            if code != 250:
                return code, text
        return client.data(raw)


def stored(daemon, mailbox: str = "INBOX", account: str = "bob@example.test") -> list[bytes]:
    store = daemon.store
    return [store.read_message(m) for m in store.fetch(account, mailbox, [(1, 2**32 - 1)])]


def find(daemon, subject: str, account: str = "bob@example.test") -> tuple[str, email.message.Message]:
    """(mailbox, message) of the one message with this subject, waiting briefly: the 250 comes
    after the commit, so it is there already."""
    for mailbox in ("INBOX", "Junk"):
        for raw in stored(daemon, mailbox, account):
            parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
            if parsed["Subject"] == subject:
                return mailbox, parsed
    raise AssertionError(f"no message {subject!r} stored")


def results(parsed) -> str:
    """Our Authentication-Results: field, unfolded."""
    ours = [v for v in parsed.get_all("Authentication-Results", []) if v.split(";")[0].strip() == AUTHSERV]
    assert len(ours) == 1, parsed.get_all("Authentication-Results")
    return " ".join(ours[0].split())


# -- the tests ---------------------------------------------------------------------------------

def test_an_aligned_signed_message_passes_and_says_so(mx):
    subject = f"aligned {uuid.uuid4().hex}"
    code, _ = send(mx, signed(message(subject=subject)))
    assert code == 250
    mailbox, parsed = find(mx, subject)
    assert mailbox == "INBOX"
    header = results(parsed)
    assert "spf=pass smtp.mailfrom=alice@example.org" in header
    assert "dkim=pass" in header and "header.d=example.org" in header and "header.s=sel" in header
    assert "dmarc=pass" in header and "header.from=example.org" in header
    assert float(parsed["X-Spam-Score"]) < 0
    assert parsed["X-Spam-Status"].startswith("No")
    assert "dkim_pass" in parsed["X-Spam-Report"]
    log = mx.stdout() + mx.stderr()
    assert "spf=pass" in log and "dmarc=pass" in log


def test_an_ed25519_signature_verifies(mx):
    subject = f"ed25519 {uuid.uuid4().hex}"
    assert send(mx, signed(message(subject=subject), selector="ed", key=ED_KEY, algorithm=b"ed25519-sha256"))[0] == 250
    header = results(find(mx, subject)[1])
    assert "dkim=pass" in header and "header.s=ed" in header and "ed25519-sha256" in header


def test_a_changed_body_fails_dkim_but_alone_does_not_stop_delivery(mx):
    subject = f"changed {uuid.uuid4().hex}"
    raw = signed(message(subject=subject)).replace(b"lunch?", b"dinner?")
    assert send(mx, raw)[0] == 250  # SPF passes aligned: DMARC passes
    mailbox, parsed = find(mx, subject)
    header = results(parsed)
    assert mailbox == "INBOX"
    assert "dkim=fail" in header and "spf=pass" in header and "dmarc=pass" in header


def test_dmarc_reject_refuses_a_forged_sender_550(mx):
    code, text = send(mx, message(subject="forged"), source=FORBIDDEN)
    assert code == 550 and text.startswith(b"5.7.1") and b"DMARC" in text
    assert all(b"Subject: forged" not in raw for raw in stored(mx))


def test_a_misaligned_signature_does_not_pass_dmarc(mx):
    # Signed by other.example, sent with an other.example envelope: both pass, neither aligns
    # with the From domain, example.org, whose policy is reject.
    raw = signed(message(subject="misaligned"), domain="other.example", key=OTHER_KEY)
    code, text = send(mx, raw, sender="bounce@other.example")
    assert code == 550 and b"DMARC" in text


def test_dmarc_quarantine_delivers_to_junk(mx):
    subject = f"quarantined {uuid.uuid4().hex}"
    code, _ = send(mx, message("news@quarantine.example", subject=subject), sender="news@quarantine.example",
                   source=FORBIDDEN)
    assert code == 250
    mailbox, parsed = find(mx, subject)
    assert mailbox == "Junk"
    assert "dmarc=fail" in results(parsed) and "spf=fail" in results(parsed)


def test_a_message_sent_again_gets_the_same_pct_sample(mx):
    """pct=50: whether a failing message is quarantined is drawn from the message itself, so a
    sender that lost our 250 and sends again is not stored once in INBOX and once in Junk."""
    subject = f"pct {uuid.uuid4().hex}"
    raw = message("news@pct.example", subject=subject)
    for _ in range(6):
        assert send(mx, raw, sender="news@pct.example", source=FORBIDDEN)[0] == 250
    copies = [m for box in ("INBOX", "Junk") for m in stored(mx, box) if subject.encode() in m]
    assert len(copies) == 1


def test_a_subdomain_without_a_record_gets_the_organizational_domains_sp(mx):
    subject = f"subdomain {uuid.uuid4().hex}"
    code, _ = send(mx, message("x@sub.example.org", subject=subject), sender="x@sub.example.org", source=FORBIDDEN)
    assert code == 250  # sp=quarantine, not p=reject
    mailbox, parsed = find(mx, subject)
    assert mailbox == "Junk" and "dmarc=fail" in results(parsed) and "header.from=sub.example.org" in results(parsed)


def test_forged_authentication_results_of_ours_are_removed_others_kept(mx):
    subject = f"forged-ar {uuid.uuid4().hex}"
    extra = (f"Authentication-Results: {AUTHSERV}; spf=pass smtp.mailfrom=x@example.org;\r\n"
             " dkim=pass header.d=bank.example\r\n"
             f"authentication-results:   {AUTHSERV.upper()} (comment);\r\n dmarc=pass\r\n"
             "Authentication-Results: mx.elsewhere.example; spf=pass\r\n")
    assert send(mx, signed(message(subject=subject, extra=extra)))[0] == 250
    parsed = find(mx, subject)[1]
    fields = parsed.get_all("Authentication-Results")
    assert len(fields) == 2
    assert "bank.example" not in " ".join(fields)
    assert any(f.startswith("mx.elsewhere.example") for f in fields)


def test_a_message_without_from_or_several_is_scored_not_crashed_on(mx):
    for subject, head in ((f"nofrom {uuid.uuid4().hex}", "To: bob@example.test\r\n"),
                          (f"twofrom {uuid.uuid4().hex}", "From: a@example.org, b@quarantine.example\r\n")):
        raw = f"{head}Subject: {subject}\r\n\r\nbody\r\n".encode()
        code, _ = send(mx, raw)
        assert code == 250, code
        parsed = find(mx, subject)[1]
        assert "no_from" in parsed["X-Spam-Report"]


def test_a_null_sender_is_checked_by_its_helo_name(mx):
    subject = f"bounce {uuid.uuid4().hex}"
    code, _ = send(mx, message("mailer-daemon@example.org", subject=subject), sender="", helo="example.org")
    assert code == 250
    header = results(find(mx, subject)[1])
    assert "spf=pass smtp.helo=example.org" in header


def test_a_dnsbl_listing_is_refused_554_with_the_lists_reason(mx):
    code, text = send(mx, message(subject="listed"), source=LISTED)
    assert code == 554 and text.startswith(b"5.7.1") and b"Listed for testing" in text


def test_softfail_is_recorded_and_scored(mx):
    subject = f"softfail {uuid.uuid4().hex}"
    assert send(mx, message("a@softfail.example", subject=subject), sender="a@softfail.example")[0] == 250
    parsed = find(mx, subject)[1]
    assert "spf=softfail" in results(parsed) and "spf_softfail=1" in parsed["X-Spam-Report"]


# -- settings that need their own daemon ------------------------------------------------------

def test_spf_fail_is_refused_at_mail_when_configured(tmp_path, zone):
    daemon = start_mx(tmp_path, zone, policy={"enabled": True, "spf_fail": "reject"})
    try:
        code, text = send(daemon, message(), source=FORBIDDEN)
        assert code == 550 and text.startswith(b"5.7.23")
        assert send(daemon, message("x@softfail.example"), sender="x@softfail.example", source=FORBIDDEN)[0] == 250
    finally:
        stop_mx(daemon)


def test_rate_limits_per_client_address(tmp_path, zone):
    daemon = start_mx(tmp_path, zone, rates={"exempt": [], "connections_per_minute": 3, "messages_per_minute": 2,
                                             "recipients_per_minute": 3})
    try:
        address = daemon.listen("smtp.listen")
        with smtplib.SMTP(address.host, address.port, timeout=10, source_address=(ALLOWED, 0)) as client:
            client.ehlo()
            assert client.mail("alice@example.org")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250
            assert client.rcpt("carol@example.test")[0] == 250
            assert client.rcpt("bob@example.test")[0] == 250
            code, text = client.rcpt("carol@example.test")  # the fourth recipient this minute
            assert code == 450 and text.startswith(b"4.7.1")
            client.rset()
            assert client.mail("alice@example.org")[0] == 250  # the second message this minute
        with smtplib.SMTP(address.host, address.port, timeout=10, source_address=(ALLOWED, 0)) as client:
            client.ehlo()
            code, text = client.mail("alice@example.org")
            assert code == 450 and text.startswith(b"4.7.1")
        # Two connections so far; the third is allowed, the fourth refused at the greeting.
        smtplib.SMTP(address.host, address.port, timeout=10, source_address=(ALLOWED, 0)).quit()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP(address.host, address.port, timeout=10, source_address=(ALLOWED, 0))
        assert refused.value.smtp_code == 421 and refused.value.smtp_error.startswith(b"4.7.0")
        # Another address has buckets of its own.
        assert send(daemon, message("x@softfail.example"), source=FORBIDDEN, sender="x@softfail.example")[0] == 250
    finally:
        stop_mx(daemon)


def test_greylisting_defers_a_first_try_and_accepts_the_retry(tmp_path, zone):
    daemon = start_mx(tmp_path, zone, greylist={"enabled": True, "delay": 1})
    try:
        raw = message("x@softfail.example", subject="grey")
        code, text = send(daemon, raw, sender="x@softfail.example")
        assert code == 451 and text.startswith(b"4.7.1") and b"Greylisted" in text
        code, text = send(daemon, raw, sender="x@softfail.example")  # too soon
        assert code == 451
        time.sleep(1.2)
        assert send(daemon, raw, sender="x@softfail.example")[0] == 250
        assert find(daemon, "grey")[0] == "INBOX"
        # A "+detail" is the same mailbox: no new triplet (or a sender could fill the table).
        assert send(daemon, message("x@softfail.example", subject="grey detail"), sender="x@softfail.example",
                    to=("bob+news@example.test",))[0] == 250
        # A domain that passed aligned (here DKIM and SPF, DMARC pass) once is trusted: its
        # next message to a new recipient is not delayed.
        aligned = signed(message(subject="aligned grey"))
        assert send(daemon, aligned)[0] == 451
        time.sleep(1.2)
        assert send(daemon, aligned)[0] == 250
        assert send(daemon, signed(message(subject="trusted")), to=("carol@example.test",))[0] == 250
    finally:
        stop_mx(daemon)


def test_rate_limits_hold_across_mtads_worker_processes(tmp_path, zone):
    """Each worker counts in the same LMDB table (<data_dir>/rates.lmdb): a client spread over
    both by SO_REUSEPORT gets the limit once, not once per worker."""
    daemon = start_mx(tmp_path, zone, smtp={"workers": 2}, rates={"exempt": [], "connections_per_minute": 6})
    try:
        address = daemon.listen("smtp.listen")
        greeted = refused = 0
        for _ in range(14):
            try:
                smtplib.SMTP(address.host, address.port, timeout=10, source_address=(ALLOWED, 0)).quit()
                greeted += 1
            except smtplib.SMTPConnectError as e:
                assert e.smtp_code == 421
                refused += 1
        assert (greeted, refused) == (6, 8)
        log = daemon.stderr() + daemon.stdout()
        serving = {line.split(" pid=")[1].split()[0] for line in log.splitlines()
                   if "event=connect " in line or "event=connection_refused" in line}
        assert len(serving) == 2, "both workers took connections"
    finally:
        stop_mx(daemon)
