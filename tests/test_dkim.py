"""DKIM signing (policy/dkim.py) and its CLI, checked by two verifiers we did not write:
dkimpy's, fed the TXT record `postroom dkim keygen` printed through its `dnsfunc`, and
Debian's opendkim-testmsg, which asks DNS for it (tests/opendkim_ns.py serves the record
inside a network namespace of its own)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone
import pytest

import conf
import scale
from conftest import POSTROOM, render_config
from policy.dkim import DKIMSigner, keygen, signed_fields
from policy.dkim_body import MessageDigest, RelaxedBodyHash

HERE = Path(__file__).resolve().parent

MESSAGE = (
    b"Received: from client by mail.example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: the minutes,\r\n"
    b"  folded\r\n"
    b"Date: Mon, 30 Nov 2026 15:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Id: <minutes.example.test>\r\n"
    b"X-Mailer: mutt\r\n"
    b"\r\n"
    b"Hello Bob,  here are the minutes.\r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def printed_record(stdout: str) -> tuple[str, str]:
    """(DNS name, TXT text) from the zone-file line `dkim keygen` printed."""
    (line,) = [line for line in stdout.splitlines() if "._domainkey." in line]
    name, rest = line.split(None, 1)
    assert rest.startswith("IN TXT ")
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rest[len("IN TXT "):])
    return name.rstrip("."), b"".join(rdata.strings).decode()


@pytest.fixture(scope="module")
def keyring(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A data dir with example.test, an rsa key (selector s1) and an ed25519 key (e1), made
    by the CLI once for the module (three CLI processes and an RSA key cost each test a
    second or two); and the DNS records as printed."""
    root = tmp_path_factory.mktemp("keyring")
    config = root / "postroom.toml"
    config.write_text(render_config({"server": {"hostname": "mail.example.test", "data_dir": str(root / "var")},
                                     "storage": {"shards": 4}}))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(config), *args], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, cwd=root)

    ok(cli("domain", "add", "example.test"))
    records = dict([printed_record(ok(cli("dkim", "keygen", "example.test", "--selector", "s1"))),
                    printed_record(ok(cli("dkim", "keygen", "example.test", "--selector", "e1",
                                          "--algorithm", "ed25519")))])
    assert set(records) == {"s1._domainkey.example.test", "e1._domainkey.example.test"}
    return root / "var", records


@pytest.fixture
def keys(keyring, data_dir):
    """The keyring's data dir copied to this test's (modes kept); returns the DNS records."""
    made, records = keyring
    shutil.copytree(made, data_dir)
    return dict(records)


def dnsfunc(records: dict[str, str]):
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        text = records.get(name.decode().rstrip("."))
        return text.encode() if text is not None else None

    return lookup


def dkimpy_verifies(message: bytes, records: dict[str, str], idx: int = 0) -> bool:
    try:
        return dkim.DKIM(message).verify(idx, dnsfunc=dnsfunc(records))
    except dkim.DKIMException:
        return False


def opendkim(message: bytes, records: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps(records))
    return subprocess.run(
        ["unshare", "--net", "--mount", "--map-root-user", sys.executable, str(HERE / "opendkim_ns.py"),
         str(records_file)],
        input=message, capture_output=True, timeout=120)


def opendkim_verifies(message: bytes, records: dict[str, str], tmp_path: Path) -> bool:
    result = opendkim(message, records, tmp_path)
    asked = result.stdout.decode().split()
    # It must have asked our DNS for the key: a pass without the lookup proves nothing.
    assert any(name.endswith("._domainkey.example.test.") for name in asked), (result.stdout, result.stderr)
    if result.returncode != 0:
        assert b"dkim_eom()" in result.stderr, result.stderr  # a verdict, not a broken tool
    return result.returncode == 0


def split_signatures(signatures: bytes) -> list[bytes]:
    parts = signatures.split(b"\r\nDKIM-Signature:")
    return [parts[0] + b"\r\n"] + [b"DKIM-Signature:" + p + (b"" if p.endswith(b"\r\n") else b"\r\n")
                                   for p in parts[1:]]


def tag(signature: bytes, name: bytes) -> bytes:
    unfolded = b"".join(signature.split(b"\r\n")).replace(b"\t", b" ")
    for part in unfolded.split(b":", 1)[1].split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return b"".join(value.split())
    raise AssertionError(f"no {name!r}= in {signature!r}")


def test_dual_signature_verified_by_dkimpy_and_opendkim(keys, data_dir, tmp_path):
    signatures = DKIMSigner(data_dir / "dkim").sign(MESSAGE, "example.test")
    rsa_sig, ed_sig = split_signatures(signatures)
    assert tag(rsa_sig, b"a") == b"rsa-sha256" and tag(rsa_sig, b"s") == b"s1"
    assert tag(ed_sig, b"a") == b"ed25519-sha256" and tag(ed_sig, b"s") == b"e1"
    for sig in (rsa_sig, ed_sig):
        assert tag(sig, b"c") == b"relaxed/relaxed" and tag(sig, b"d") == b"example.test"
    signed = signatures + MESSAGE
    assert dkimpy_verifies(signed, keys, 0) and dkimpy_verifies(signed, keys, 1)
    # opendkim passes a message when any signature verifies: give it each one alone.
    assert opendkim_verifies(rsa_sig + MESSAGE, keys, tmp_path)
    assert opendkim_verifies(ed_sig + MESSAGE, keys, tmp_path)


def test_h_covers_the_usual_fields_and_oversigns_from(keys, data_dir):
    rsa_sig, _ = split_signatures(DKIMSigner(data_dir / "dkim").sign(MESSAGE, "example.test"))
    h = tag(rsa_sig, b"h").split(b":")
    assert h == [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
                 b"list-id", b"from"]
    assert signed_fields(b"To: x\r\nTo: y\r\nReferences: <a>\r\n\r\nFrom: not a header\r\n") == \
        [b"to", b"to", b"references", b"from"]


@pytest.mark.parametrize("change", ["body", "subject", "second from", "unsigned header"])
def test_tampering_breaks_the_signatures(keys, data_dir, tmp_path, change):
    signatures = DKIMSigner(data_dir / "dkim").sign(MESSAGE, "example.test")
    rsa_sig, ed_sig = split_signatures(signatures)
    if change == "body":
        tampered = MESSAGE.replace(b"the minutes.", b"the invoice.")
    elif change == "subject":
        tampered = MESSAGE.replace(b"the minutes,", b"the payment,")
    elif change == "second from":
        # Both verifiers refuse a second From outright (so this case alone would pass
        # without over-signing: test_h_covers_... checks the extra `from` in h=).
        tampered = b"From: ceo@example.test\r\n" + MESSAGE
    else:
        tampered = b"X-Spam: no\r\n" + MESSAGE  # not signed: must still verify
    expected = change == "unsigned header"
    assert dkimpy_verifies(signatures + tampered, keys, 0) is expected
    assert dkimpy_verifies(signatures + tampered, keys, 1) is expected
    if change == "second from":
        # libopendkim refuses a message with two From fields before it looks at a key.
        for sig in (rsa_sig, ed_sig):
            result = opendkim(sig + tampered, keys, tmp_path)
            assert result.returncode != 0 and b"Syntax error" in result.stderr, result.stderr
        return
    assert opendkim_verifies(rsa_sig + tampered, keys, tmp_path) is expected
    assert opendkim_verifies(ed_sig + tampered, keys, tmp_path) is expected


def test_relaxed_canonicalization_survives_refolding(keys, data_dir, tmp_path):
    signatures = DKIMSigner(data_dir / "dkim").sign(MESSAGE, "example.test")
    rsa_sig, _ = split_signatures(signatures)
    # What relays do: refold a header, change whitespace runs, strip trailing space,
    # add blank lines at the end of the body.
    relayed = (MESSAGE.replace(b"Subject: the minutes,\r\n  folded", b"Subject:  the minutes,\r\n\tfolded")
               .replace(b"Bob,  here", b"Bob, here").replace(b"-- \r\n", b"--\r\n") + b"\r\n\r\n")
    assert dkimpy_verifies(signatures + relayed, keys, 0) and dkimpy_verifies(signatures + relayed, keys, 1)
    assert opendkim_verifies(rsa_sig + relayed, keys, tmp_path)


def test_wrong_record_fails_in_opendkim(keys, data_dir, tmp_path):
    """The opendkim check can fail: the same message against another key's record."""
    signatures = DKIMSigner(data_dir / "dkim").sign(MESSAGE, "example.test")
    rsa_sig, _ = split_signatures(signatures)
    wrong = keygen(tmp_path / "other", "example.test", "s1", "rsa")
    assert not opendkim_verifies(rsa_sig + MESSAGE, {**keys, "s1._domainkey.example.test": wrong}, tmp_path)
    assert not dkimpy_verifies(rsa_sig + MESSAGE, {**keys, "s1._domainkey.example.test": wrong})


def test_no_key_no_signature_and_new_keys_seen_at_once(cli, data_dir):
    signer = DKIMSigner(data_dir / "dkim")
    assert signer.sign(MESSAGE, "example.test") == b""
    ok(cli("domain", "add", "example.test"))
    name, record = printed_record(ok(cli("dkim", "keygen", "example.test", "--selector", "s1")))
    sig = signer.sign(MESSAGE, "example.test")
    assert dkimpy_verifies(sig + MESSAGE, {name: record})
    assert signer.sign(MESSAGE, "other.test") == b""
    assert signer.sign(MESSAGE, "../example.test") == b""


def test_keygen_files_modes_and_refusals(cli, data_dir):
    ok(cli("domain", "add", "example.test"))
    out = ok(cli("dkim", "keygen", "Example.TEST", "--selector", "s1"))
    key = data_dir / "dkim" / "example.test" / "s1.rsa.key"
    assert out.splitlines()[0] == f"wrote 2048-bit rsa key {key}"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(key.parent.parent.stat().st_mode) == 0o700
    assert key.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    _, first = printed_record(out)
    assert first.startswith("v=DKIM1; k=rsa; p=")

    again = cli("dkim", "keygen", "example.test", "--selector", "s1")
    assert again.returncode == 1 and again.stderr == f"postroom: {key} exists: use --force to replace it " \
                                                     "(and publish the new record)\n"
    assert printed_record(ok(cli("dkim", "keygen", "example.test", "--selector", "s1", "--force")))[1] != first
    clash = cli("dkim", "keygen", "example.test", "--selector", "s1", "--algorithm", "ed25519")
    assert clash.returncode == 1 and "already has an rsa key" in clash.stderr
    unknown = cli("dkim", "keygen", "nowhere.test")
    assert unknown.returncode == 1
    assert unknown.stderr == "postroom: unknown domain nowhere.test: add it with 'postroom domain add'\n"
    bad = cli("dkim", "keygen", "example.test", "--selector", "../../etc")
    assert bad.returncode == 1 and "invalid selector" in bad.stderr and "Traceback" not in bad.stderr
    assert cli("dkim", "keygen", "example.test", "--algorithm", "dsa").returncode == 2
    default = ok(cli("dkim", "keygen", "example.test", "--algorithm", "ed25519"))
    name, record = printed_record(default)
    assert name.startswith("ed2") and record.startswith("v=DKIM1; k=ed25519; p=")
    assert sorted(os.listdir(key.parent)) == sorted(["s1.rsa.key", f"{name.split('.')[0]}.ed25519.key"])


def test_dns_records_cli(keys, cli, config_path):
    out = ok(cli("dns-records", "example.test"))
    zone = dns.zone.from_text(out, origin="example.test.", relativize=False, check_origin=False)

    def rdatas(name: str, kind: str) -> list:
        rdataset = zone.get_rdataset(name, kind)
        assert rdataset is not None, (name, kind, out)
        return list(rdataset)

    (mx,) = rdatas("example.test.", "MX")
    assert mx.exchange.to_text() == "mail.example.test."
    assert [b"".join(r.strings) for r in rdatas("example.test.", "TXT")] == [b"v=spf1 mx -all"]
    for name, record in keys.items():
        (txt,) = rdatas(name + ".", "TXT")
        assert b"".join(txt.strings).decode() == record
        assert all(len(s) <= 255 for s in txt.strings)
    (dmarc,) = rdatas("_dmarc.example.test.", "TXT")
    assert b"".join(dmarc.strings) == b"v=DMARC1; p=none; rua=mailto:postmaster@example.test"
    # The SRV ports are this config's listeners (the test config's loopback ports).
    config = conf.load(config_path)
    expected = {
        "_submission": config.submission.listen[0].port, "_submissions": config.submission.listen_tls[0].port,
        "_imap": config.imap.listen[0].port, "_imaps": config.imap.listen_tls[0].port,
        "_pop3s": config.pop3.listen_tls[0].port,
    }
    for service, port in expected.items():
        (srv,) = rdatas(f"{service}._tcp.example.test.", "SRV")
        assert (srv.port, srv.target.to_text()) == (port, "mail.example.test.")
    assert cli("dns-records", "nowhere.test").returncode == 1


# -- signing as the message streams by (policy/dkim_body.py) ------------------------------

HEAD = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
# Bodies whose relaxed canonicalization depends on what comes next: trailing empty lines,
# whitespace before line ends and inside lines, whitespace-only lines.
BODIES = {
    "empty": b"",
    "only_empty_lines": b"\r\n\r\n\r\n",
    "trailing_empty_lines": b"Hello,\r\n\r\nbye\r\n\r\n\r\n \t\r\n\r\n",
    "whitespace_at_line_ends": b"a \t \r\n  b\t\tc  d \r\n\t\r\n e\t\r\n",
    "blank_lines_inside": b"\r\n\r\n  \r\nfirst\r\n\t\r\n\r\nlast \r\n",
}
# Bodies the SMTP core never passes on (mtad/readers.py refuses a bare CR or LF, and DATA
# ends with CRLF.CRLF): the stream must still agree with dkimpy, which reads a bare LF as a
# line end and keeps a last SP before the end of an unterminated body (opendkim does not).
UNTERMINATED = {"no_final_crlf": b"last line  ", "ends_in_cr": b"x\r\n\r",
                "bare_cr_and_lf": b"x\ry \r \r\nz\n w \n\r\n\r\r\n"}


def dkimpy_body_hash(message: bytes) -> bytes:
    """bh= as dkimpy computes it from the whole message: the reference."""
    _, body = dkim.rfc822_parse(message)
    policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    return hashlib.sha256(policy.canonicalize_body(body)).digest()


def cuts(data: bytes):
    """`data` cut in two at every place, then in pieces of 1 to 10 bytes."""
    for at in range(len(data) + 1):
        yield [data[:at], data[at:]]
    for size in range(1, 11):
        yield [data[i:i + size] for i in range(0, len(data), size)]


def digest_of(pieces) -> MessageDigest:
    digest = MessageDigest()
    for piece in pieces:
        digest.update(piece)
    return digest


@pytest.mark.parametrize("body", [*BODIES.values(), *UNTERMINATED.values()], ids=[*BODIES, *UNTERMINATED])
def test_streamed_body_hash_is_dkimpys_wherever_the_chunks_are_cut(body):
    """Cut everywhere: between CR and LF, inside a whitespace run before a line end, inside
    the trailing empty lines, at the end of the header section."""
    message = HEAD + body
    want = dkimpy_body_hash(message)
    for pieces in cuts(message):
        digest = digest_of(pieces)
        assert digest.header == HEAD[:-2] and digest.body.digest() == want, pieces


def test_streamed_body_hash_random_bodies():
    rng = random.Random(6376)
    alphabet = [b"a", b"bc", b" ", b"\t", b"  ", b"\r", b"\n", b"\r\n", b"\r\n", b"\r\n\r\n"]
    for _ in range(3000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        pieces, at = [], 0
        while at < len(HEAD + body):
            step = rng.randrange(1, 8)
            pieces.append((HEAD + body)[at:at + step])
            at += step
        assert digest_of(pieces).body.digest() == dkimpy_body_hash(HEAD + body), body


def test_a_message_that_is_all_header_has_an_empty_body():
    digest = digest_of([b"From: a@example.test\r\nSubject: x\r\n"])
    assert digest.header == b"From: a@example.test\r\nSubject: x\r\n"
    assert digest.body.digest() == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_streamed_signatures_verify_in_dkimpy_and_opendkim(keys, data_dir, tmp_path, body):
    """Signed from 3-byte pieces (every awkward cut happens somewhere), then verified whole."""
    message = HEAD + body
    pieces = [message[i:i + 3] for i in range(0, len(message), 3)]
    signatures = DKIMSigner(data_dir / "dkim").sign_digest(digest_of(pieces), "example.test")
    rsa_sig, ed_sig = split_signatures(signatures)
    assert tag(rsa_sig, b"bh") == tag(ed_sig, b"bh") == base64.b64encode(dkimpy_body_hash(message))
    assert dkimpy_verifies(signatures + message, keys, 0) and dkimpy_verifies(signatures + message, keys, 1)
    assert opendkim_verifies(rsa_sig + message, keys, tmp_path)
    assert opendkim_verifies(ed_sig + message, keys, tmp_path)


def big_message(size: int) -> bytes:
    """`size` bytes of lines with whitespace at their ends and inside, blank lines at the end."""
    line = b"0123456789 abcdef\t\tghij  \r\n"
    return HEAD + line * ((size - len(HEAD)) // len(line)) + b"\r\n \r\n\r\n"


@pytest.mark.long
def test_signing_a_big_message_holds_no_copy_of_it(keys, data_dir, tmp_path):
    """The whole message given to sign() (as before) or fed in 64 KiB chunks: either way the
    signing allocates a few chunks, not the message (dkimpy made ~3.6 copies of it). 6 MB in
    `make test` (one copy is 3x the bound), 25 MB under `make test-long`."""
    message = big_message(scale.count(6_000_000, 25_000_000))
    signer = DKIMSigner(data_dir / "dkim")
    signer.sign(MESSAGE, "example.test")  # keys loaded, modules warm
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        signatures = signer.sign(message, "example.test")
        whole_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        digest = MessageDigest()
        for start in range(0, len(message), 65536):
            digest.update(message[start:start + 65536])
        streamed = signer.sign_digest(digest, "example.test")
        streamed_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert whole_peak < 2_000_000 and streamed_peak < 2_000_000, (whole_peak, streamed_peak)
    assert tag(signatures, b"bh") == tag(streamed, b"bh") == base64.b64encode(dkimpy_body_hash(message))
    rsa_sig, ed_sig = split_signatures(streamed)
    assert dkimpy_verifies(streamed + message, keys, 0) and dkimpy_verifies(streamed + message, keys, 1)
    assert opendkim_verifies(rsa_sig + message, keys, tmp_path)
    assert opendkim_verifies(ed_sig + message, keys, tmp_path)


@pytest.mark.parametrize("filler", [b" ", b"\r\n", b" \t\r"], ids=["spaces", "empty_lines", "ws_cr"])
def test_streamed_body_hash_is_linear_in_long_runs(filler):
    """A body of one long whitespace run (or of empty lines) costs what its size does: a
    regex anchored at the end of each chunk would retry every start (64 KiB^2 per chunk)."""
    piece = filler * (65536 // len(filler))
    started = time.monotonic()
    body = RelaxedBodyHash()
    for _ in range(128):  # 8 MiB
        body.update(piece)
    body.update(b"x\r\n")
    body.digest()
    assert time.monotonic() - started < 10
