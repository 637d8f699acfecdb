"""policy/dkimpy_speed.py: the C conversions give dkimpy's own bytes for every integer and
length its RSA asks for (and for the ones it never asks for); a key record is parsed once,
to what dkimpy's own parse gives, and a bad one is refused each time; dkimpy runs them."""

from __future__ import annotations

import base64
import importlib.util
import random

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from policy import dkimpy_speed


def _dkimpys_own():
    """dkim/crypto.py loaded afresh: its int2str and str2int as shipped."""
    spec = importlib.util.spec_from_file_location("dkimpy_crypto_as_shipped", dkim.crypto.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.int2str, module.str2int


def test_the_same_bytes_as_dkimpys():
    int2str, str2int = _dkimpys_own()
    rng = random.Random(17)
    numbers = [0, 1, 255, 256, 65535, 65536] + [rng.getrandbits(bits) for bits in (7, 8, 9, 1024, 2047, 2048, 4096)]
    for n in numbers:
        for length in (-1, 0, 1, 2, 3, 128, 256, 257, 512, 513):
            if length >= 0 and length < (n.bit_length() + 7) // 8:
                continue  # dkimpy keeps the low bytes and then fails its own assert (off under -O)
            assert dkimpy_speed.int2str(n, length) == int2str(n, length), (n, length)
            assert type(dkimpy_speed.int2str(n, length)) is bytearray
        raw = bytes(int2str(n))
        assert dkimpy_speed.str2int(raw) == str2int(raw) == n
        assert dkimpy_speed.str2int(b"\x00\x00" + raw) == str2int(b"\x00\x00" + raw)
    assert dkimpy_speed.str2int(b"") == str2int(b"") == 0


def _key_record() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def test_a_key_record_is_parsed_once_to_dkimpys_own_key():
    record = _key_record()
    first = dkimpy_speed.evaluate_pk("s._domainkey.example.org", record)
    assert first == dkimpy_speed._evaluate_pk("s._domainkey.example.org", record)
    assert first[1:3] == (2048, b"rsa")
    assert dkimpy_speed.evaluate_pk("t._domainkey.example.net", bytes(record)) is first  # one entry a record


def test_a_key_record_padded_past_the_bound_is_parsed_but_not_kept():
    record = _key_record() + b"; n=" + b"x" * (dkimpy_speed.MAX_KEPT_RECORD + 1)
    first = dkimpy_speed.evaluate_pk("s._domainkey.example.org", record)
    assert first[1] == 2048
    assert dkimpy_speed.evaluate_pk("s._domainkey.example.org", record) is not first


def test_a_bad_key_record_is_refused_each_time():
    for _ in range(2):
        with pytest.raises(dkim.KeyFormatError):
            dkimpy_speed.evaluate_pk("s._domainkey.example.org", b"v=DKIM1; k=rsa; p=AAAA")


def test_dkimpy_runs_them_once_a_dkim_module_is_loaded():
    import policy.dkim_verify  # noqa: F401 - its import installs them

    assert dkim.crypto.int2str is dkimpy_speed.int2str
    assert dkim.crypto.str2int is dkimpy_speed.str2int
    assert dkim.evaluate_pk is dkimpy_speed.evaluate_pk
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkimpy_speed.rsassa_pkcs1_v1_5_verify


class _Hashed:
    """What dkimpy hands its RSA check: a hash object with a name (dkim.HashThrough)."""

    def __init__(self, name: str, data: bytes):
        import hashlib

        self.name = name
        self._digest = hashlib.new(name, data).digest()

    def digest(self) -> bytes:
        return self._digest


def _signed(bits: int, name: str, data: bytes) -> tuple[bytes, dict]:
    """A signature of `data` by a new key of `bits` bits, and the key as dkimpy parses it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    algorithm = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[name]
    signature = key.sign(data, padding.PKCS1v15(), algorithm)
    numbers = key.public_key().public_numbers()
    return signature, {"modulus": numbers.n, "publicExponent": numbers.e}


@pytest.mark.parametrize("bits,name", [(2048, "sha256"), (1024, "sha256"), (4096, "sha256"), (2048, "sha1")])
def test_openssls_rsa_check_agrees_with_dkimpys(bits, name):
    shipped = dkimpy_speed._rsa_verify
    signature, key = _signed(bits, name, b"the canonical header fields")
    wrong = bytearray(signature)
    wrong[-1] ^= 1
    cases = [(b"the canonical header fields", signature),  # valid
             (b"other fields", signature),  # another hash
             (b"the canonical header fields", bytes(wrong)),  # one bit off
             (b"the canonical header fields", signature[1:]),  # a byte short
             (b"the canonical header fields", b"\x00" + signature),  # a byte long, same number
             (b"the canonical header fields", signature.lstrip(b"\x00")),  # no leading zeros
             (b"the canonical header fields",  # the same number plus the modulus: past it
              (int.from_bytes(signature, "big") + key["modulus"]).to_bytes(len(signature) + 1, "big"))]
    for data, sig in cases:
        hashed = _Hashed(name, data)
        assert dkimpy_speed.rsassa_pkcs1_v1_5_verify(hashed, sig, key) == shipped(hashed, sig, key), (data, sig[:4])
    assert dkimpy_speed.rsassa_pkcs1_v1_5_verify(_Hashed(name, cases[0][0]), signature, key) is True


def test_a_key_openssl_will_not_load_or_a_small_one_gets_dkimpys_answer():
    signature, key = _signed(2048, "sha256", b"fields")
    hashed = _Hashed("sha256", b"fields")
    even = dict(key, publicExponent=65536)  # OpenSSL refuses an even exponent; dkimpy computes
    assert dkimpy_speed.rsassa_pkcs1_v1_5_verify(hashed, signature, even) is False
    assert dkimpy_speed._rsa_verify(hashed, signature, even) is False
    # An even modulus 2m, and a number that dkimpy's arithmetic takes for a signature under
    # it (by the Chinese remainder theorem, from m's private exponent): OpenSSL would refuse
    # it, dkimpy passes it, and dkimpy's verdict is the one kept.
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    m, d = private.public_key().public_numbers().n, private.private_numbers().d
    modlen = len(dkim.crypto.int2str(2 * m))
    encoded = int.from_bytes(dkim.crypto.EMSA_PKCS1_v1_5_encode(hashed, modlen), "big")
    number = pow(encoded, d, m)
    number += m if number % 2 != encoded % 2 else 0
    even = {"modulus": 2 * m, "publicExponent": 65537}
    forged = number.to_bytes(modlen, "big")
    assert dkimpy_speed._rsa_verify(hashed, forged, even) is True
    assert dkimpy_speed.rsassa_pkcs1_v1_5_verify(hashed, forged, even) is True
    small = {"modulus": key["modulus"] >> 1600 | 1, "publicExponent": 65537}  # 448 bits
    for k in (small, dict(small, modulus=small["modulus"] << 500 | 1)):  # 448 and 948 bits
        outcomes = []
        for verify in (dkimpy_speed.rsassa_pkcs1_v1_5_verify, dkimpy_speed._rsa_verify):
            try:
                outcomes.append(verify(hashed, signature[:k["modulus"].bit_length() // 8], k))
            except Exception as e:  # noqa: BLE001 - dkimpy's own error, the same from both
                outcomes.append(type(e))
        assert outcomes[0] == outcomes[1], outcomes
