"""Message authentication checks: MessageScan (forged Authentication-Results removed, body
hashes streamed), DKIM and ARC verification, DMARC. Messages are signed here with dkimpy
(DKIM and ARC), keys and DMARC records are served by a DNSZone on loopback, and the checks
ask it through the policy Resolver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import dkim
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from conf.schema import DNSConfig
from conf.values import Duration
import scale
from dnszone import DNSZone
from policy.arc import verify_arc
from policy.dkim import zone_txt
from policy.dkim_body import BodyHashes, BodySpec
from policy.dkim_verify import verify_dkim
from policy.dmarc import check_dmarc
from policy.evidence import ARCResult, DKIMResult, DMARCResult, MessageFacts, SPFResult
from policy.message_scan import MessageScan
from policy.resolver import Resolver

OURS = "mx.example.net"

MESSAGE = (
    b"Received: from client by mail.example.test\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: the minutes\r\n"
    b"Date: Mon, 30 Nov 2026 15:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,  here are the minutes. \r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n\r\n"
)


# -- keys, zone, helpers ----------------------------------------------------------------

# A 768-bit key (`openssl genrsa -traditional 768`): too small to be trusted (RFC 8301 §3.2).
SMALL_RSA = b"""-----BEGIN RSA PRIVATE KEY-----
MIIByQIBAAJhAKYrXX9lGjLyJZkGGTJ7/loZ0YGVmF8A13w/Tgz0JFEBiBQRVpvv
VODXOPqCkygp3Q7YnYLkAfLHMiD35eh2BB00zRB9cnMJfu9F/AFIInaogOe7bQDq
8NtRXzkNqBlERwIDAQABAmB0DXdYQPkiOaHulKbGbni+3qdGlH79Yu4cVW4id+Rh
OuuZ8F4HvAgQm9+sfcNe2pTriEqSKpYsf5a7JUPBpj8zZqVwzG5lwpaVYt2pSSpi
Ke7vG3AlsFy4D9NNR1kV3oECMQDZfQA4MCZm4WqsVFUJ3LyOe6JmElFRSqQoP3qf
z9kJOgVanGqs4SQBfaErWB9g50ECMQDDmATW1IqjA9icbCI0qL7Dr1LiBoDpc5Hw
bDh1ItOiwQkg0KSu1Uu9AMaTqMekEYcCMHm9w/qv0T8znS+7wSJVImMrh7tVM5mq
i3tQFUcR5K6KgOa4uent2ObQuP/3QxFOQQIwab13cES7JmHf6sCyxVEswFG6NyNY
8dxe22FGLF1FmMlPDAR/41zAc09GC3HFbDdlAjBHW7EnoTZJFkqLdK1c+PEjagBw
ZxXDPXjSuG0Gf0GEg/KGsScBuiqjo1txlkD02ns=
-----END RSA PRIVATE KEY-----
"""

class Keys:
    """An RSA and an ed25519 key pair, as dkimpy signs with them and DNS publishes them."""

    def __init__(self) -> None:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption())
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        self.rsa_record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        self.small_rsa = SMALL_RSA  # cryptography makes no key under 1024 bits
        small = serialization.load_pem_private_key(SMALL_RSA, password=None)
        der = small.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        self.small_rsa_record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
        ed = ed25519.Ed25519PrivateKey.generate()
        self.ed25519 = base64.b64encode(ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                         serialization.NoEncryption()))
        raw = ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.ed25519_record = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def zone_records(keys: Keys, extra: dict | None = None) -> dict:
    records = {
        "rsa._domainkey.example.test": {"TXT": [zone_txt(keys.rsa_record)]},
        "ed._domainkey.example.test": {"TXT": [zone_txt(keys.ed25519_record)]},
        "small._domainkey.example.test": {"TXT": [zone_txt(keys.small_rsa_record)]},
        "rsa._domainkey.other.example": {"TXT": [zone_txt(keys.rsa_record)]},
        "revoked._domainkey.example.test": {"TXT": ['"v=DKIM1; k=rsa; p="']},
        "arc._domainkey.relay.example": {"TXT": [zone_txt(keys.rsa_record)]},
        "arc._domainkey.list.example": {"TXT": [zone_txt(keys.rsa_record)]},
        "_dmarc.example.test": {"TXT": ['"v=DMARC1; p=reject; rua=mailto:d@example.test"']},
        "_dmarc.quarantine.example": {"TXT": ['"v=DMARC1; p=quarantine"']},
        "_dmarc.none.example": {"TXT": ['"v=DMARC1; p=none"']},
        "_dmarc.org.example": {"TXT": ['"v=DMARC1; p=reject; sp=quarantine"', '"v=spf1 -all"']},
        "_dmarc.pct0.example": {"TXT": ['"v=DMARC1; p=reject; pct=0"']},
        "_dmarc.pct50.example": {"TXT": ['"v=DMARC1; p=quarantine; pct=50"']},
        "_dmarc.strict.example": {"TXT": ['"v=DMARC1; p=reject; adkim=s; aspf=s"']},
        "_dmarc.multi.example": {"TXT": ['"v=DMARC1; p=reject"', '"v=DMARC1; p=none"']},
        "_dmarc.other.example": {"TXT": ['"v=dmarc1; p=reject"', '"p=reject; v=DMARC1"']},
        "_dmarc.badp.example": {"TXT": ['"v=DMARC1; p=block"']},
        "_dmarc.badprua.example": {"TXT": ['"v=DMARC1; p=block; rua=mailto:r@badprua.example"']},
    }
    records.update(extra or {})
    return records


@pytest.fixture(scope="module")
def zone(keys):
    with DNSZone(zone_records(keys), servfail={"broken.example"}) as served:
        yield served


def resolver_for(zone: DNSZone, timeout: float = 2) -> Resolver:
    return Resolver(DNSConfig(nameservers=("127.0.0.1",), port=zone.port, timeout=Duration(timeout)))


def scan_of(message: bytes, pieces: int | None = None, authserv_id: str = OURS) -> tuple[MessageScan, bytes]:
    """The message fed whole (or in `pieces`-byte chunks); (scan, bytes it returned)."""
    scan = MessageScan(authserv_id)
    step = pieces or len(message) or 1
    out = b"".join(scan.update(message[i:i + step]) for i in range(0, len(message), step))
    return scan, out + scan.finish()


def sign(message: bytes, keys: Keys, *, selector=b"rsa", domain=b"example.test", algorithm=b"rsa-sha256",
         canonicalize=(b"relaxed", b"relaxed"), length=False, private=None) -> bytes:
    key = private or (keys.ed25519 if algorithm == b"ed25519-sha256" else keys.rsa)
    return dkim.sign(message, selector, domain, key, signature_algorithm=algorithm, canonicalize=canonicalize,
                     include_headers=[b"from", b"to", b"subject", b"date", b"message-id"], length=length) + message


def dkim_results(message: bytes, zone: DNSZone, pieces: int | None = 7) -> list[DKIMResult]:
    scan, _ = scan_of(message, pieces)

    async def run():
        with ThreadPoolExecutor(2) as pool:
            loop = asyncio.get_running_loop()
            return await verify_dkim(scan, resolver_for(zone), lambda fn, *args: loop.run_in_executor(pool, fn, *args))
    return asyncio.run(run())


# -- MessageScan: forged Authentication-Results ------------------------------------------

FORGED = (
    b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=x@example.test\r\n"
    b"Received: from a by b\r\n"
    b"authentication-results :\r\n (a (nested \\) comment) ) \"MX.Example.NET.\" 1;\r\n dkim=pass\r\n"
    b"Authentication-Results: relay.example; spf=fail\r\n"
    b"Authentication-Results: mx.example.net.evil; spf=pass\r\n"
    b"AUTHENTICATION-RESULTS:mx.example.net(no space);dmarc=pass\r\n"
    b"X-Authentication-Results: mx.example.net; spf=pass\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.net; in the body stays\r\n"
)
KEPT = (
    b"Received: from a by b\r\n"
    b"Authentication-Results: relay.example; spf=fail\r\n"
    b"Authentication-Results: mx.example.net.evil; spf=pass\r\n"
    b"X-Authentication-Results: mx.example.net; spf=pass\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.net; in the body stays\r\n"
)


def test_forged_results_removed_wherever_the_chunks_are_cut():
    """Ours (any case, a trailing dot, quoted, after comments, folded, no space) removed;
    another authserv-id, a longer one, another field name and the body kept. Cut in two at
    every position (inside the field name too), and fed 1 to 10 bytes at a time."""
    cuts = [[FORGED[:at], FORGED[at:]] for at in range(len(FORGED) + 1)]
    cuts += [[FORGED[i:i + size] for i in range(0, len(FORGED), size)] for size in range(1, 11)]
    for pieces in cuts:
        scan = MessageScan(OURS)
        out = []
        for piece in pieces:
            returned = scan.update(piece)
            assert scan.header is not None or returned == b""  # nothing while the header is read
            out.append(returned)
        out.append(scan.finish())
        assert b"".join(out) == KEPT, pieces
        assert scan.header == FORGED.split(b"\r\n\r\n")[0] + b"\r\n"  # the original, for DKIM
        assert scan.removed == 3


def test_body_chunks_pass_as_they_come():
    scan = MessageScan(OURS)
    assert scan.update(b"From: a@example.test\r\n") == b""
    assert scan.update(b"\r\nfirst ") == b"From: a@example.test\r\n\r\nfirst "
    assert scan.update(b"second\r\n") == b"second\r\n"
    assert scan.finish() == b""


def test_a_message_that_is_all_header_comes_out_at_finish():
    message = b"Authentication-Results: mx.example.net; spf=pass\r\nSubject: x\r\n"
    scan, out = scan_of(message, 5)
    assert out == b"Subject: x\r\n" and scan.header == message
    assert scan_of(b"\r\nbody only\r\n")[1] == b"\r\nbody only\r\n"


def test_a_header_past_the_bound_passes_nothing_on():
    scan = MessageScan(OURS)
    field = b"X-Filler: " + b"x" * 998 + b"\r\n"
    returned = [scan.update(field * 64) for _ in range(80)]  # 5 MiB, never an empty line
    assert not any(returned) and scan.update(b"\r\nbody") == b"" and scan.finish() == b""
    assert scan.header_too_long and scan.header is None


# -- MessageScan: body hashes -----------------------------------------------------------

BODIES = [b"", b"\r\n", b"\r\n\r\n\r\n", b"Hello,\r\n\r\nbye \t\r\n\r\n \r\n\r\n",
          b"a \t \r\n  b\t\tc  d \r\n\t\r\n e\t\r\n", b"no final line end  "]


@pytest.mark.parametrize("body", BODIES)
def test_streamed_body_hashes_are_dkimpys(body):
    """Simple and relaxed, with and without l=, cut at every position: the digests are
    dkimpy's own canonicalization of the whole body, hashed and cut as it does."""
    specs = [BodySpec(c, "sha256", limit) for c in ("simple", "relaxed") for limit in (None, 0, 5)]
    specs.append(BodySpec("simple", "sha1"))
    want = {}
    for spec in specs:
        canonical = dkim.CanonicalizationPolicy.from_c_value(b"simple/" + spec.canonicalization.encode())
        text = canonical.canonicalize_body(body)
        want[spec] = hashlib.new(spec.algorithm, text if spec.limit is None else text[:spec.limit]).digest()
    for at in range(len(body) + 1):
        hashes = BodyHashes(specs)
        hashes.update(body[:at])
        hashes.update(body[at:])
        assert hashes.digests() == want, at


# -- MessageScan: facts ------------------------------------------------------------------

@pytest.mark.parametrize("fields, domains, count", [
    (b"From: Alice <alice@Example.TEST.>\r\n", ("example.test",), 1),
    (b"From: a@one.example, \"B, b\" <b@two.example>\r\nFrom: c@one.example\r\n", ("one.example", "two.example"), 2),
    (b"From: =?utf-8?q?J=C3=BCrgen?= <j@b\xc3\xbccher.example>\r\n", ("xn--bcher-kva.example",), 1),
    (b"From: undisclosed-recipients:;\r\n", (), 1),
    (b"From: <<<@@@>>> (unclosed\r\n", (), 1),
    (b"From: a@[192.0.2.1]\r\n", (), 1),
    (b"From : obsolete@example.test\r\n", ("example.test",), 1),  # RFC 5322 §4.5.3
    (b"From: " + b"\"" * 3000 + b"\r\n", (), 1),
    (b"Sender: s@example.test\r\n", (), 0),
])
def test_from_domains_junk_tolerated(fields, domains, count):
    scan, _ = scan_of(fields + b"Message-ID: <x@y>\r\n\r\nbody\r\n")
    facts = scan.facts()
    assert facts == MessageFacts(from_domains=domains, from_fields=count, has_message_id=True, has_date=False)


# -- MessageScan: bounded and linear ------------------------------------------------------

def signed_big(keys: Keys, size: int) -> bytes:
    line = b"0123456789 abcdef\t\tghij  \r\n"
    body = line * (size // len(line)) + b"\r\n \r\n"
    head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    # dkimpy signs from the whole message: its bh= is the reference the stream must match.
    signed = sign(head + body, keys, canonicalize=(b"relaxed", b"simple"))
    return sign(signed, keys, selector=b"ed", algorithm=b"ed25519-sha256")


def feed(scan: MessageScan, message: bytes, chunk: int = 65536) -> int:
    stored = 0
    for start in range(0, len(message), chunk):
        stored += len(scan.update(message[start:start + chunk]))
    return stored + len(scan.finish())


@pytest.mark.long
def test_a_big_body_is_hashed_in_bounded_memory(keys, zone):
    """6 MB in `make test` (one copy is 3x the bound), 20 MB under `make test-long`."""
    message = signed_big(keys, scale.count(6_000_000, 20_000_000))
    scan = MessageScan(OURS)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        stored = feed(scan, message)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert stored == len(message)
    assert peak < 2_000_000, peak
    assert set(scan.body_hashes) == {BodySpec("simple", "sha256"), BodySpec("relaxed", "sha256")}
    results = asyncio.run(verify_dkim(scan, resolver_for(zone)))
    assert [r.result for r in results] == ["pass", "pass"], results


def test_scan_time_is_linear_in_the_message(keys):
    """Size N and 8N, with two canonicalizations and a header of many fields and forged
    results: the time per byte stays the same (a scan that re-read what it held, or a
    comment parser that backtracked, would grow 8x more)."""
    def cost(size: int) -> float:
        header = b"".join(b"X-F%d: v\r\n" % i for i in range(size // 400))
        # Forged results whose authserv-id hides behind long nested comments and folds.
        header += (b"Authentication-Results: " + b"(" * 500 + b"x\r\n " + b")" * 500 + b" mx.example.net; a=b\r\n"
                   ) * (size // 40_000)
        message = header + signed_big(keys, size)
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            feed(MessageScan(OURS), message, 4096)
            best = min(best, time.perf_counter() - started)
        return best
    small, large = cost(400_000), cost(3_200_000)
    assert large < small * 8 * 2.5, (small, large)


# -- DKIM ----------------------------------------------------------------------------------

def test_valid_rsa_and_ed25519_signatures_pass(keys, zone):
    message = sign(sign(MESSAGE, keys), keys, selector=b"ed", algorithm=b"ed25519-sha256")
    results = dkim_results(message, zone)
    assert [(r.result, r.domain, r.selector, r.algorithm) for r in results] == [
        ("pass", "example.test", "ed", "ed25519-sha256"), ("pass", "example.test", "rsa", "rsa-sha256")]
    top = dkim.util.parse_tag_value(message.split(b"\r\nDKIM-Signature:")[0].split(b":", 1)[1])
    assert results[0].identity == "@example.test"
    assert results[0].signature == b"".join(top[b"b"].split())[:8].decode()


@pytest.mark.parametrize("canonicalize", [(b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")])
def test_every_canonicalization_passes(keys, zone, canonicalize):
    assert [r.result for r in dkim_results(sign(MESSAGE, keys, canonicalize=canonicalize), zone)] == ["pass"]


def test_a_changed_body_fails_with_body_hash_mismatch(keys, zone):
    message = sign(MESSAGE, keys).replace(b"the minutes.", b"the MINUTES.")
    (result,) = dkim_results(message, zone)
    assert (result.result, result.reason) == ("fail", "body hash mismatch")


def test_a_changed_signed_header_fails(keys, zone):
    message = sign(MESSAGE, keys).replace(b"Subject: the minutes", b"Subject: the money")
    (result,) = dkim_results(message, zone)
    assert (result.result, result.reason) == ("fail", "signature did not verify")


def test_l_tag_signs_a_prefix_and_appended_text_still_passes(keys, zone):
    signed = sign(MESSAGE, keys, length=True)
    assert b" l=" in signed or b";l=" in signed or b"l=" in signed.split(b"\r\n\r\n")[0]
    appended = signed + b"-- \r\nlist footer\r\n"
    assert [r.result for r in dkim_results(appended, zone)] == ["pass"]
    changed = signed.replace(b"Hello Bob", b"Hello Eve")
    assert [r.result for r in dkim_results(changed, zone)] == ["fail"]


def test_missing_revoked_small_and_mismatched_keys_are_permerror(keys, zone):
    cases = {
        b"absent": "no key",
        b"revoked": "key revoked",
        b"small": "key: public key too small: 768",
        b"ed": "key is k=ed25519 for a=rsa-sha256",
    }
    for selector, reason in cases.items():
        private = keys.small_rsa if selector == b"small" else keys.rsa
        (result,) = dkim_results(sign(MESSAGE, keys, selector=selector, private=private), zone)
        assert (result.result, result.selector, result.reason) == ("permerror", selector.decode(), reason)


def test_dns_trouble_is_temperror(keys, zone):
    message = sign(MESSAGE, keys, domain=b"broken.example")
    (result,) = dkim_results(message.replace(b"From: Alice <alice@example.test>", b"From: a@broken.example"), zone)
    assert (result.result, result.domain) == ("temperror", "broken.example")


def test_rsa_sha1_is_not_accepted(keys, zone):
    (result,) = dkim_results(sign(MESSAGE, keys, algorithm=b"rsa-sha1"), zone)
    assert (result.result, result.reason) == ("fail", "rsa-sha1 not accepted (RFC 8301)")


def test_unreadable_signatures_and_too_many(keys, zone):
    good = sign(MESSAGE, keys)
    junk = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; garbage\r\n"
    missing = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; h=from; b=AAAA\r\n"
    results = dkim_results(junk + missing + good, zone)
    assert [r.result for r in results] == ["permerror", "permerror", "pass"]
    assert "missing" in results[1].reason and "bh" in results[1].reason
    many = good
    for _ in range(9):
        many = sign(many, keys)
    results = dkim_results(many, zone)
    assert [r.result for r in results] == ["pass"] * 8 + ["permerror"]
    assert results[-1].reason == "2 more signatures not checked"


def test_a_misaligned_signature_still_passes_dkim(keys, zone):
    (result,) = dkim_results(sign(MESSAGE, keys, domain=b"other.example"), zone)
    assert (result.result, result.domain) == ("pass", "other.example")


def test_no_signature_no_result(zone):
    assert dkim_results(MESSAGE, zone) == []


def test_expired_signature_and_unreadable_header_are_permerror(keys, zone):
    expired = sign(MESSAGE, keys).replace(b"DKIM-Signature: v=1;", b"DKIM-Signature: v=1; x=1000;", 1)
    (result,) = dkim_results(expired, zone)
    assert result.result == "permerror" and "x= value is past" in result.reason
    # A header line that is no field (dkimpy's parser refuses it): each signature says so.
    junk = sign(MESSAGE, keys).replace(b"To: bob", b"no colon here\r\nTo: bob", 1)
    (result,) = dkim_results(junk, zone)
    assert result.result == "permerror" and result.reason.startswith("header section unreadable")


# -- ARC -----------------------------------------------------------------------------------

def arc_seal(message: bytes, keys: Keys, domain: bytes, results: bytes) -> bytes:
    """`domain` adds its Authentication-Results and ARC-seals the message, as a relay does."""
    message = b"Authentication-Results: " + domain + b"; " + results + b"\r\n" + message
    arc_set = dkim.arc_sign(message, b"arc", domain, keys.rsa, domain,
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    assert len(arc_set) == 3, arc_set
    return b"".join(arc_set) + message


def arc_result(message: bytes, zone: DNSZone):
    scan, _ = scan_of(message, 11)

    async def run():
        with ThreadPoolExecutor(2) as pool:
            loop = asyncio.get_running_loop()
            return await verify_arc(scan, resolver_for(zone), lambda fn, *args: loop.run_in_executor(pool, fn, *args))
    return asyncio.run(run())


def one_hop(keys: Keys) -> bytes:
    return arc_seal(sign(MESSAGE, keys), keys, b"relay.example", b"dkim=pass header.d=example.test")


def test_arc_one_and_two_instances_pass(keys, zone):
    first = one_hop(keys)
    assert arc_result(first, zone) == ARCResult("pass", 1, "")
    second = arc_seal(first, keys, b"list.example", b"arc=pass")
    assert arc_result(second, zone) == ARCResult("pass", 2, "")


def test_arc_body_changed_after_the_newest_seal_fails(keys, zone):
    message = one_hop(keys).replace(b"the minutes.", b"the MINUTES.")
    result = arc_result(message, zone)
    assert (result.result, result.instances) == ("fail", 1)
    assert "ARC-Message-Signature did not validate" in result.reason


def test_arc_body_changed_between_hops_passes_at_the_newest(keys, zone, caplog):
    """A list that rewrites the body breaks the first hop's AMS, not the chain: only the
    newest AMS must validate (RFC 8617 §5.2), the seals still cover the sets. dkimpy's
    complaints stay out of the log (the result carries them)."""
    first = one_hop(keys).replace(b"Alice\r\n", b"Alice\r\n-- \r\nlist footer\r\n")
    second = arc_seal(first, keys, b"list.example", b"arc=pass")
    caplog.clear()
    assert arc_result(second, zone) == ARCResult("pass", 2, "")
    assert not [r for r in caplog.records if r.name == "dkimpy" and r.levelname == "ERROR"], caplog.records


def test_arc_broken_chains_fail(keys, zone):
    first = one_hop(keys)
    second = arc_seal(first, keys, b"list.example", b"arc=pass")
    # A seal's signed text changed: the seal no longer verifies.
    tampered = second.replace(b"ARC-Authentication-Results: i=1; relay.example",
                              b"ARC-Authentication-Results: i=1; relay.example; spf=pass")
    assert tampered != second
    assert arc_result(tampered, zone).result == "fail"
    # A set missing a field.
    without_seal_1 = b"\r\n".join(x for x in _unfolded(second) if not x.startswith(b"ARC-Seal: i=1"))
    assert arc_result(without_seal_1, zone) == ARCResult("fail", 2, "ARC set i=1 is missing a field or has one twice")
    # The newest seal says the chain had already failed.
    failed = arc_seal(first, keys, b"list.example", b"arc=fail")
    assert arc_result(failed, zone) == ARCResult("fail", 2, "ARC-Seal i=2 says cv=fail")
    # Too many instances.
    too_many = b"ARC-Seal: i=51; cv=pass; a=rsa-sha256; d=x.example; s=s; b=AAAA\r\n" + first
    assert arc_result(too_many, zone).reason == "more than 50 ARC sets"


def test_arc_key_missing_or_unanswered_fails(keys, zone):
    message = one_hop(keys)
    missing = message.replace(b"s=arc", b"s=gone")
    assert arc_result(missing, zone).result == "fail"
    unanswered = arc_seal(sign(MESSAGE, keys), keys, b"relay.example", b"dkim=pass").replace(
        b"d=relay.example", b"d=broken.example")
    result = arc_result(unanswered, zone)
    assert result.result == "fail" and "no DNS answer for arc._domainkey.broken.example" in result.reason


def test_no_arc_is_none(zone):
    assert arc_result(MESSAGE, zone) == ARCResult("none", 0, "")


def _unfolded(message: bytes) -> list[bytes]:
    """The header fields (each unfolded into one line) and then the body lines."""
    head, body = message.split(b"\r\n\r\n", 1)
    return head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t").split(b"\r\n") + [b""] + body.split(b"\r\n")


# -- DMARC ---------------------------------------------------------------------------------

def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result, "mailfrom", domain, f"bounce@{domain}")


def passing(domain: str) -> list[DKIMResult]:
    return [DKIMResult("pass", domain, "s1", "rsa-sha256")]


def dmarc(zone: DNSZone, from_domains, spf_result=None, dkim_results=(), random=lambda: 0.0, from_fields=None):
    facts = MessageFacts(from_domains=tuple(from_domains),
                         from_fields=len(from_domains) if from_fields is None else from_fields)
    return asyncio.run(check_dmarc(resolver_for(zone), facts, spf_result, list(dkim_results), random=random))


def test_dmarc_pass_by_aligned_dkim_or_spf(zone):
    by_dkim = dmarc(zone, ["example.test"], spf("fail", "elsewhere.example"), passing("mail.example.test"))
    assert (by_dkim.result, by_dkim.dkim_aligned, by_dkim.spf_aligned, by_dkim.policy) == \
        ("pass", True, False, "reject")
    by_spf = dmarc(zone, ["example.test"], spf("pass", "bounces.example.test"), [])
    assert (by_spf.result, by_spf.spf_aligned, by_spf.disposition) == ("pass", True, "none")


@pytest.mark.parametrize("domain, disposition", [
    ("example.test", "reject"), ("quarantine.example", "quarantine"), ("none.example", "none")])
def test_dmarc_fail_takes_the_policy(zone, domain, disposition):
    result = dmarc(zone, [domain], spf("pass", "elsewhere.example"), passing("other.example")
                   + [DKIMResult("fail", domain, "s1")])
    assert (result.result, result.policy, result.disposition, result.record_domain) == (
        "fail", disposition, disposition, domain)


def test_dmarc_organizational_domain_fallback_and_sp(zone):
    sub = dmarc(zone, ["mail.sub.org.example"], spf("fail", "org.example"))
    assert (sub.result, sub.domain, sub.record_domain, sub.policy, sub.disposition) == (
        "fail", "mail.sub.org.example", "org.example", "quarantine", "quarantine")
    org = dmarc(zone, ["org.example"])
    assert (org.result, org.policy, org.record_domain) == ("fail", "reject", "org.example")
    relaxed = dmarc(zone, ["mail.sub.org.example"], None, passing("org.example"))
    assert (relaxed.result, relaxed.dkim_aligned) == ("pass", True)


def test_dmarc_pct(zone):
    never = dmarc(zone, ["pct0.example"], random=lambda: 0.0)
    assert (never.result, never.policy, never.disposition) == ("fail", "reject", "quarantine")
    assert "pct=0" in never.reason
    assert dmarc(zone, ["example.test"], random=lambda: 0.999).disposition == "reject"  # pct=100
    assert dmarc(zone, ["pct50.example"], random=lambda: 0.49).disposition == "quarantine"
    assert dmarc(zone, ["pct50.example"], random=lambda: 0.5).disposition == "none"


def test_dmarc_strict_alignment(zone):
    subdomain = dmarc(zone, ["strict.example"], spf("pass", "mail.strict.example"), passing("mail.strict.example"))
    assert (subdomain.result, subdomain.spf_aligned, subdomain.dkim_aligned) == ("fail", False, False)
    exact = dmarc(zone, ["strict.example"], spf("pass", "strict.example"), passing("Strict.Example."))
    assert (exact.result, exact.spf_aligned, exact.dkim_aligned) == ("pass", True, True)


def test_dmarc_several_from_domains_strictest_wins(zone):
    result = dmarc(zone, ["none.example", "example.test", "quarantine.example"])
    assert (result.result, result.domain, result.disposition) == ("fail", "example.test", "reject")
    one_passes = dmarc(zone, ["example.test", "none.example"], None, passing("example.test"))
    assert (one_passes.result, one_passes.domain) == ("fail", "none.example")


def test_dmarc_no_from_or_unreadable_from(zone):
    assert dmarc(zone, []) == DMARCResult("none", reason="no From domain")
    assert dmarc(zone, [], from_fields=1).result == "permerror"


def test_dmarc_records_ignored_or_bad(zone):
    assert dmarc(zone, ["nothing.example"]) == DMARCResult("none", "nothing.example", reason="no DMARC record")
    several = dmarc(zone, ["multi.example"])
    assert (several.result, several.reason) == ("none", "several DMARC records at _dmarc.multi.example")
    # Not "v=DMARC1" first, exactly: discarded (here nothing is left, so no DMARC).
    assert dmarc(zone, ["other.example"]).result == "none"
    assert dmarc(zone, ["badp.example"]).result == "permerror"
    with_rua = dmarc(zone, ["badprua.example"])
    assert (with_rua.result, with_rua.policy, with_rua.disposition) == ("fail", "none", "none")
    assert dmarc(zone, ["broken.example"]).result == "temperror"


def test_dmarc_of_a_signed_message(keys, zone):
    """The whole path: a message signed by its From domain passes; signed by another domain
    with a failing SPF, it fails with the From domain's p=reject."""
    for signer, want in ((b"example.test", "pass"), (b"other.example", "fail")):
        scan, _ = scan_of(sign(MESSAGE, keys, domain=signer), 13)
        results = asyncio.run(verify_dkim(scan, resolver_for(zone)))
        assert [r.result for r in results] == ["pass"]
        verdict = asyncio.run(check_dmarc(resolver_for(zone), scan.facts(), spf("fail", "example.test"), results))
        assert (verdict.result, verdict.domain) == (want, "example.test")
        assert verdict.disposition == ("none" if want == "pass" else "reject")

