"""DKIM and ARC verification stay cheap whatever a sender's DNS and header hold (issue 14):
RSA keys over 4096 bits or with a big exponent, h= lists of many names, folded fields,
whitespace runs in a signature, thousands of signatures. dkimpy's pure Python holds the GIL,
so each of these froze the event loop before it was bounded.

Keys (real and hostile) are served by a DNSZone on loopback and asked through the policy
Resolver; messages are signed with dkimpy, as a sender does. Times are bounds far above what
the bounded code takes and far below what the unbounded code took.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conf.schema import DNSConfig
from conf.values import Duration
from dnszone import DNSZone
from policy.arc import verify_arc
from policy.dkim import zone_txt
from policy.dkim_verify import header_fields, verify_dkim
from policy.message_scan import MessageScan

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: the minutes\r\n"
    b"Date: Mon, 30 Nov 2026 15:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def record_of(key) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def hostile_record(bits: int, exponent_bits: int) -> str:
    """An RSAPublicKey (DER, as dkimpy also reads) with a random `bits` modulus and exponent."""
    def der_len(n: int) -> bytes:
        return bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
            (n.bit_length() + 7) // 8, "big")

    def der_int(value: int) -> bytes:
        body = value.to_bytes((value.bit_length() + 8) // 8, "big")
        return b"\x02" + der_len(len(body)) + body
    modulus = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    exponent = secrets.randbits(exponent_bits) | (1 << (exponent_bits - 1)) | 1
    inner = der_int(modulus) + der_int(exponent)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30" + der_len(len(inner)) + inner).decode()


class Keys:
    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
        self.e3 = rsa.generate_private_key(public_exponent=3, key_size=1024)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def zone(keys):
    def txt(text):
        return {"TXT": [zone_txt(text)]}
    records = {
        "rsa._domainkey.example.test": txt(record_of(keys.rsa)),
        "big._domainkey.example.test": txt(record_of(keys.big)),
        "e3._domainkey.example.test": txt(record_of(keys.e3)),
        "huge._domainkey.example.test": txt(hostile_record(8192, 17)),
        "hugee._domainkey.example.test": txt(hostile_record(2048, 2048)),
        "worst._domainkey.example.test": txt(hostile_record(12288, 12288)),
        "arc._domainkey.relay.example": txt(record_of(keys.rsa)),
        "arc._domainkey.huge.example": txt(hostile_record(8192, 17)),
    }
    with DNSZone(records) as served:
        yield served


def scan_of(message: bytes) -> MessageScan:
    scan = MessageScan("mx.example.net")
    for i in range(0, len(message), 65536):
        scan.update(message[i:i + 65536])
    scan.finish()
    return scan


def resolver_for(zone: DNSZone):
    from policy.resolver import Resolver
    return Resolver(DNSConfig(nameservers=("127.0.0.1",), port=zone.port, timeout=Duration(2)))


def dkim_results(message: bytes, zone: DNSZone):
    return asyncio.run(verify_dkim(scan_of(message), resolver_for(zone)))


def timed_dkim(message: bytes, zone: DNSZone):
    """(results, seconds spent in verify_dkim once the message was scanned)."""
    scan, resolver = scan_of(message), resolver_for(zone)
    started = time.perf_counter()
    results = asyncio.run(verify_dkim(scan, resolver))
    return results, time.perf_counter() - started


def sign(message: bytes, key, selector: bytes = b"rsa", include=SIGNED) -> bytes:
    return dkim.sign(message, selector, b"example.test", private_pem(key), canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=list(include)) + message


def forged(selector: bytes, h: bytes, b: bytes = b"AAAA", head: bytes = MESSAGE) -> bytes:
    """A DKIM-Signature that dkimpy checks up to its RSA step (its bh= is right)."""
    body = head.split(b"\r\n\r\n", 1)[1]
    bh = base64.b64encode(hashlib.sha256(body).digest())
    return (b"DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=example.test; s=" + selector
            + b"; h=" + h + b"; bh=" + bh + b"; b=" + b + b"\r\n" + head)


# -- 3. RSA keys: size and exponent --------------------------------------------------------

def test_real_keys_pass_up_to_4096_bits_and_exponent_3(keys, zone):
    for key, selector in ((keys.rsa, b"rsa"), (keys.big, b"big"), (keys.e3, b"e3")):
        (result,) = dkim_results(sign(MESSAGE, key, selector), zone)
        assert (result.result, result.selector) == ("pass", selector.decode()), result


@pytest.mark.parametrize("selector, reason", [
    (b"huge", "RSA key of 8192 bits, over 4096 (RFC 8301)"),
    (b"hugee", "RSA public exponent of 2048 bits, over 32"),
    (b"worst", "RSA key of 12288 bits, over 4096 (RFC 8301)"),
])
def test_a_huge_key_or_exponent_is_permerror_before_any_rsa(zone, selector, reason):
    """findings/dkim_huge_key.py: 12288-bit n and e took 4.8 s of pow() a signature."""
    sigs = b"".join(forged(selector, b"from:to:subject", b=base64.b64encode(secrets.token_bytes(1536))).split(
        b"From:", 1)[0] for _ in range(8))
    results, took = timed_dkim(sigs + MESSAGE, zone)
    assert [(r.result, r.reason) for r in results] == [("permerror", reason)] * 8
    assert took < 1.0, took


def test_arc_with_a_huge_seal_key_fails_before_any_rsa(keys, zone):
    message = b"Authentication-Results: huge.example; dkim=pass\r\n" + MESSAGE
    arc_set = dkim.arc_sign(message, b"arc", b"huge.example", private_pem(keys.rsa), b"huge.example",
                            include_headers=SIGNED)
    result = asyncio.run(verify_arc(scan_of(b"".join(arc_set) + message), resolver_for(zone)))
    assert (result.result, result.reason) == (
        "fail", "key arc._domainkey.huge.example: RSA key of 8192 bits, over 4096 (RFC 8301)")


# -- 4. h= names x fields, folded fields, whitespace runs ----------------------------------

def test_64_signed_names_pass_and_65_are_permerror(keys, zone):
    names = SIGNED + [f"x-absent-{i}".encode() for i in range(59)]
    (result,) = dkim_results(sign(MESSAGE, keys.rsa, include=names), zone)
    assert result.result == "pass", result
    (result,) = dkim_results(sign(MESSAGE, keys.rsa, include=names + [b"x-one-more"]), zone)
    assert (result.result, result.reason) == ("permerror", "too many signed fields (65, over 64)")


def hostile_h(n: int) -> bytes:
    """findings/dkim_h_quadratic.py: n absent names in h=, n filler fields."""
    names = b":".join(b"z%d" % i for i in range(n))
    return forged(b"rsa", b"from:" + names, head=MESSAGE.replace(b"\r\n\r\n", b"\r\n" + b"a:\r\n" * n + b"\r\n\r\n"))


def test_names_times_fields_is_refused_in_linear_time(zone):
    """The attack's shape (as many names as fields) grew quadratically: 83 s at 300 KB."""
    (small,), t1 = timed_dkim(hostile_h(1000), zone)
    (large,), t8 = timed_dkim(hostile_h(8000), zone)
    assert small.reason == "too many signed fields (1001, over 64)"
    assert large.reason == "signature syntax: field over 16384 bytes"
    assert t8 < 8 * 2 * t1 + 0.3, (t1, t8)


def with_fields(message: bytes, fields: bytes) -> bytes:
    """`fields` added at the end of the header section (after signing: dkimpy signs slowly too)."""
    head, body = message.split(b"\r\n\r\n", 1)
    return head + b"\r\n" + fields + b"\r\n" + body


def selecting(n: int, keys) -> bytes:
    """8 signatures of 64 names each, 59 of them absent, over n more fields: dkimpy's
    select_headers scanned all the fields for each absent name of each signature."""
    message = MESSAGE
    for s in range(8):
        message = sign(message, keys.rsa, include=SIGNED + [b"x-%d-%d" % (s, i) for i in range(59)])
    return with_fields(message, b"a:\r\n" * n)


def test_signatures_with_many_names_over_many_fields_are_linear(keys, zone):
    results1, t1 = timed_dkim(selecting(25000, keys), zone)
    results8, t8 = timed_dkim(selecting(200000, keys), zone)  # 800 KB of fields
    assert [r.result for r in results1] == [r.result for r in results8] == ["pass"] * 8
    assert t8 < 8 * 2 * t1 + 0.3 and t8 < 3.0, (t1, t8)


def folded(n: int, keys) -> bytes:
    return with_fields(sign(MESSAGE, keys.rsa), b"X-Folded: x\r\n" + b" x\r\n" * n)


def test_a_field_folded_into_many_lines_is_read_in_linear_time(keys, zone):
    """dkimpy's parser adds each folded line with +=: 80,000 lines took 2.2 s, 8x more ~140 s."""
    (result1,), t1 = timed_dkim(folded(30000, keys), zone)
    (result8,), t8 = timed_dkim(folded(240000, keys), zone)  # 960 KB
    assert result1.result == result8.result == "pass"
    assert t8 < 8 * 2 * t1 + 0.3 and t8 < 1.5, (t1, t8)


def test_header_fields_reads_as_dkimpy_does():
    for section in (MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n",
                    b"From nobody Mon\r\nA: 1\r\n  2\r\nFrom x\r\n\tcontinues A\r\nB:3\nC :4\r\n",
                    b"a:\r\n" * 5 + b"X-Odd!: v\r\n\r\nBody: not a field\r\n"):
        try:
            expected = [tuple(field) for field in dkim.rfc822_parse(section + b"\r\n")[0]]
        except dkim.MessageFormatError:
            with pytest.raises(dkim.MessageFormatError):
                header_fields(section + b"\r\n")
            continue
        assert header_fields(section + b"\r\n") == expected


@pytest.mark.parametrize("b", [b"AAAA" + b"\r\n\t" * 5000 + b"!", b"AAAA" * 5000])
def test_whitespace_runs_and_oversized_signatures_are_permerror_fast(zone, b):
    """dkimpy's b= regex backtracks over folding whitespace: 15 KB of it took 1.8 s."""
    results, took = timed_dkim(forged(b"rsa", b"from:to", b=b), zone)
    assert [r.result for r in results] == ["permerror"], results
    assert "whitespace run over 64" in results[0].reason or "field over 16384 bytes" in results[0].reason
    assert took < 0.5, took


def test_arc_too_many_names_in_an_ams_fails(keys, zone):
    message = b"Authentication-Results: relay.example; dkim=pass\r\n" + MESSAGE
    names = SIGNED + [b"x-%d" % i for i in range(60)]
    arc_set = dkim.arc_sign(message, b"arc", b"relay.example", private_pem(keys.rsa), b"relay.example",
                            include_headers=names)
    result = asyncio.run(verify_arc(scan_of(b"".join(arc_set) + message), resolver_for(zone)))
    assert (result.result, result.reason) == (
        "fail", "ARC-Message-Signature i=1: too many signed fields (65, over 64)")


# -- 5. thousands of signatures ------------------------------------------------------------

def test_signatures_past_the_eighth_make_one_result(keys, zone):
    """findings/many_signatures.py: each tiny signature became an A-R result (2.24 MB)."""
    message = sign(MESSAGE, keys.rsa)
    message = b"DKIM-Signature: v=1; d=attacker.example; s=s\r\n" * 20000 + message
    results = dkim_results(message, zone)
    assert len(results) == 9
    assert [r.result for r in results] == ["permerror"] * 9
    assert results[-1].reason == "19993 more signatures not checked"


# -- ARC: 50 sets multiply every cost --------------------------------------------------------

@pytest.fixture(scope="module")
def chain50(keys) -> bytes:
    """A message through 50 ARC hops (RFC 8617 §4.2.1's most), each its own authserv-id."""
    message = sign(MESSAGE, keys.rsa)
    for hop in range(50):
        srv = b"hop%d" % hop
        message = b"Authentication-Results: %s; arc=%s\r\n" % (srv, b"pass" if hop else b"none") + message
        message = b"".join(dkim.arc_sign(message, b"arc", b"relay.example", private_pem(keys.rsa), srv,
                                         include_headers=SIGNED)) + message
    return message


def timed_arc(message: bytes, zone: DNSZone):
    scan, resolver = scan_of(message), resolver_for(zone)
    started = time.perf_counter()
    result = asyncio.run(verify_arc(scan, resolver))
    return result, time.perf_counter() - started


def test_a_50_set_chain_over_many_fields_is_linear(chain50, zone):
    """Each of the 50 seals made dkimpy canonicalize and scan every field: 200,000 fields
    took 49.6 s."""
    result1, t1 = timed_arc(with_fields(chain50, b"a:\r\n" * 25000), zone)
    result8, t8 = timed_arc(with_fields(chain50, b"a:\r\n" * 200000), zone)
    assert (result1.result, result1.instances) == (result8.result, result8.instances) == ("pass", 50)
    assert t8 < 8 * 2 * t1 + 0.3 and t8 < 3.0, (t1, t8)


def test_arc_seals_skip_what_only_the_newest_ams_signs(chain50, zone):
    """A 900 KB To: at the bottom is what the newest AMS selects; the seals sign ARC fields
    only, and dkimpy canonicalized all the fields it was given for each of them."""
    result, took = timed_arc(with_fields(chain50, b"To: " + b"x, " * 300000 + b"\r\n"), zone)
    assert (result.result, result.reason) == ("fail", "Most recent ARC-Message-Signature did not validate")
    assert took < 1.0, took


def test_arc_fields_over_their_bounds_fail(chain50, zone):
    aar = b"ARC-Authentication-Results: i=1; hop0"
    big = chain50.replace(aar, aar + b"".join(b";\r\n x%d=pass" % i for i in range(1500)))
    result, _ = timed_arc(big, zone)
    assert (result.result, result.reason) == ("fail", "ARC-Authentication-Results i=1: field over 16384 bytes")
    every = b"".join(b";\r\n x%d=pass" % i for i in range(400))
    for hop in range(50):
        aar = b"ARC-Authentication-Results: i=%d; hop%d" % (hop + 1, hop)
        chain50 = chain50.replace(aar, aar + every)
    result, took = timed_arc(chain50, zone)
    assert result.result == "fail" and result.reason.startswith("ARC fields of "), result
    assert result.reason.endswith(" bytes, over 262144") and took < 0.5, (result, took)
