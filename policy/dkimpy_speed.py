"""Three of dkimpy's pure-Python costs, replaced by equivalents that give the same results.

- dkimpy checks an RSA signature with its own pow() (180 us for a 2048-bit key, ~6 ms for
  the costliest key dkim_verify lets through): OpenSSL's (cryptography) checks the same
  RFC 8017 RSASSA-PKCS1-v1_5 encoding in ~20 us. A key OpenSSL will not load, or one under
  RFC 8301's 1024 bits (dkimpy refuses those itself, with its own error), and a hash other
  than SHA-256 or SHA-1 are left to dkimpy's own check.
- dkimpy's RSA (dkim.crypto) turns integers into byte strings and back one byte at a time:
  int2str runs twice a signature checked (the modulus's length, then pow()'s result).
  int.to_bytes and int.from_bytes give the same bytes in C: 60-140 us less a 2048-bit
  verification (of 610-780), and signing pays the same.
- dkimpy parses a key record (tags, base64, its own ASN.1 reader) at each signature, and
  dkim_verify's key check parses it once more before: 190 us a message for a 2048-bit key.
  The same record from the same name parses to the same key, so the parse is kept
  (KEYS_KEPT records, the least recently used going first; a record that does not parse
  raises each time, as before). dkimpy never changes a key it is given.

dkimpy looks these names up in its modules at each call, so replacing them there changes
nothing but the speed, for every user of dkimpy in the process (verification, ARC,
signing). install() is idempotent; the modules that use dkimpy call it when imported.
"""

from __future__ import annotations

import functools

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

KEYS_KEPT = 1024  # records kept parsed, each at most MAX_KEPT_RECORD: a few MB at most
MAX_KEPT_RECORD = 4096  # a 4096-bit RSA key's record is ~750 bytes

_evaluate_pk = dkim.evaluate_pk  # dkimpy's own, before install() replaces it
_rsa_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify  # the same
_PREHASHED = {"sha256": utils.Prehashed(hashes.SHA256()), "sha1": utils.Prehashed(hashes.SHA1())}
_MIN_BITS = 1024  # RFC 8301 §3.2; dkimpy's own check says what is wrong with a smaller key


def int2str(n: int, length: int = -1) -> bytearray:
    """As dkim.crypto.int2str: n big-endian, at least one byte, left-padded with zeros to
    `length`; like dkimpy's (whose callers never ask for it), the low `length` bytes of an n
    that needs more."""
    assert n >= 0
    if length < 0:
        return bytearray(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
    return bytearray((n & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))


def str2int(s: bytes | bytearray) -> int:
    """As dkim.crypto.str2int: the big-endian integer of `s` (0 for no bytes)."""
    return int.from_bytes(s, "big")


@functools.lru_cache(maxsize=KEYS_KEPT)
def _kept_key(record: bytes) -> tuple:
    return _evaluate_pk("", record)  # the name is only ever in an error, which is not kept


def evaluate_pk(name: object, s: bytes | str) -> tuple:
    """As dkim.evaluate_pk: (key, bits, k= tag, tlsrpt service), from a key record; parsed
    once per record of at most MAX_KEPT_RECORD bytes (a sender's zone chooses the size: a
    record padded with junk tags must not make the cache hold megabytes, as the Resolver
    keeps no answer over 4 KiB either)."""
    if isinstance(s, bytes) and len(s) <= MAX_KEPT_RECORD:
        try:
            return _kept_key(s)
        except Exception:
            pass  # raised again below, with the record's name in it
    return _evaluate_pk(name, s)


@functools.lru_cache(maxsize=KEYS_KEPT)
def _openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def rsassa_pkcs1_v1_5_verify(hash, signature: bytes, public_key: dict) -> bool:  # noqa: A002 - dkimpy's name
    """As dkim.crypto.RSASSA_PKCS1_v1_5_verify: whether `signature` is the RSASSA-PKCS1-v1_5
    signature of `hash` (dkimpy's HashThrough) under `public_key` (dkimpy's parse)."""
    algorithm = _PREHASHED.get(hash.name.lower())
    modulus, exponent = public_key["modulus"], public_key["publicExponent"]
    # An even modulus is no RSA key: OpenSSL refuses every signature under it, dkimpy checks
    # the arithmetic as for any other, and its verdict is the one kept.
    if algorithm is None or modulus.bit_length() < _MIN_BITS or modulus % 2 == 0:
        return _rsa_verify(hash, signature, public_key)
    try:
        key = _openssl_key(modulus, exponent)
    except ValueError:  # an even or out-of-range exponent, a modulus OpenSSL will not take
        return _rsa_verify(hash, signature, public_key)
    # dkimpy reads the signature as a number whatever its length (RFC 8017 §8.2.2 wants
    # exactly the modulus's): the same number, written at the modulus's length, gets the
    # same verdict from OpenSSL; one past the modulus (only made up) is dkimpy's to judge.
    number = int.from_bytes(signature, "big")
    if number >= modulus:
        return _rsa_verify(hash, signature, public_key)
    try:
        key.verify(number.to_bytes((modulus.bit_length() + 7) // 8, "big"), hash.digest(), padding.PKCS1v15(),
                   algorithm)
    except InvalidSignature:
        return False
    return True


def install() -> None:
    dkim.crypto.int2str = int2str
    dkim.crypto.str2int = str2int
    dkim.evaluate_pk = evaluate_pk
    dkim.RSASSA_PKCS1_v1_5_verify = rsassa_pkcs1_v1_5_verify
