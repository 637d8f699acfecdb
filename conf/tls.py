"""TLS from config: the server contexts, and the self-signed certificate for development.

`ensure_certificate` creates cert/key when `[tls] self_signed = true` and they are missing
(ECDSA P-256, SANs for the host name, localhost, 127.0.0.1 and ::1, key file mode 0600).
`server_context` loads the pair once for the asyncio side (mtad); `server_tls` loads it
once more for the Twisted side (imapd, pop3d), with pyOpenSSL, which is what Twisted's TLS
speaks. Every TLS listener and STARTTLS of a daemon shares its context. Same policy on both
sides: minimum protocol TLS 1.2 (RFC 8996 deprecates 1.0 and 1.1; RFC 8314 for mail), and
TLS 1.2 with TLS12_CIPHERS only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from conf.schema import TLSConfig


# Mozilla's "intermediate" server profile (ssl-config.mozilla.org) for TLS 1.2: ECDHE key
# exchange (forward secrecy) with an AEAD cipher. No CBC suites (padding oracles: Lucky
# Thirteen), no RSA key exchange (no forward secrecy), no SHA-1 MACs; the profile's DHE suites
# are left out too (they need DH parameters, and every client that has them has ECDHE). TLS
# 1.3 suites are all AEAD: OpenSSL's defaults stand. ServerTLS, the Twisted context, uses the
# same list.
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))


class TLSSetupError(Exception):
    """The configured certificate cannot be used; str() says which file and why."""


def ensure_certificate(tls: TLSConfig, hostname: str) -> bool:
    """Generate a self-signed pair if allowed and missing; True when one was created."""
    if not tls.enabled or not tls.self_signed:
        return False
    assert tls.cert is not None and tls.key is not None
    if tls.cert.exists() and tls.key.exists():
        return False
    try:
        _write_self_signed(tls.cert, tls.key, hostname)
    except OSError as e:
        detail = f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror)
        raise TLSSetupError(f"{tls.cert}: cannot write the self-signed certificate ({detail})") from None
    return True


def server_context(tls: TLSConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    assert tls.cert is not None
    key = tls.key or tls.cert
    for path, name in ((tls.cert, "tls.cert"), (key, "tls.key")):
        if not path.is_file():
            raise TLSSetupError(f"{path}: file not found (set by {name})")
        if not os.access(path, os.R_OK):
            raise TLSSetupError(f"{path}: not readable by this user (set by {name})")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(tls.cert, key)
    except ssl.SSLError as e:
        raise TLSSetupError(f"{tls.cert}: cannot load certificate with key {key}: {e.reason or e}") from None
    return context


class ServerTLS:
    """A pyOpenSSL server context for Twisted's `startTLS` and TLS listeners (the legacy
    context-factory interface: `getContext()`, one shared context)."""

    def __init__(self, tls: TLSConfig):
        from OpenSSL import SSL

        assert tls.cert is not None
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(TLS12_CIPHERS.encode())
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
        # Idle connections (IDLE, POP3 clients thinking) give their TLS buffers back: ~34 KiB each.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.use_certificate_chain_file(str(tls.cert))
        context.use_privatekey_file(str(tls.key or tls.cert))
        context.check_privatekey()
        self._context = context

    def getContext(self):  # noqa: N802 - Twisted's interface
        return self._context


def server_tls(tls: TLSConfig) -> ServerTLS | None:
    """The Twisted side's context; None without a configured certificate (call after
    server_context, which has checked the files and says what is wrong with them)."""
    if not tls.enabled:
        return None
    # Imported here: mtad uses this module and never loads Twisted.
    from twisted.internet.interfaces import IOpenSSLContextFactory
    from zope.interface import classImplements

    classImplements(ServerTLS, IOpenSSLContextFactory)  # what Twisted's TLS asks of a context factory
    return ServerTLS(tls)


def _write_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomic(key_path, key_bytes, 0o600)
    _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL: a file left behind by someone else never lends us its (looser) mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
