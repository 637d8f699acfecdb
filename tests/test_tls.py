"""The TLS every listener offers: Mozilla's "intermediate" profile. TLS 1.2 with forward-secret
AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305: no CBC, no RSA key exchange, no
SHA-1 MAC), and TLS 1.3. Checked on the running daemon through each way in, with the stdlib
clients restricted to one suite: SMTP STARTTLS (asyncio's ssl context), IMAP STARTTLS, IMAPS,
POP3 STLS and POP3S (Twisted's pyOpenSSL context). The dev certificate is ECDSA P-256, so the
suites are the ECDSA ones."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl

from conftest import client_tls_context

TIMEOUT = 10

# Suites a TLS 1.2 client may offer, and what the server must do with each.
REFUSED = ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA256",
           "ECDHE-ECDSA-AES256-SHA384")
ACCEPTED = ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305")


# Each returns the suite agreed on; a failed handshake raises ssl.SSLError, and the client
# has closed its socket by then.

def _smtp_starttls(address, context) -> str:
    with smtplib.SMTP(address.host, address.port, timeout=TIMEOUT) as client:
        client.starttls(context=context)
        return client.sock.cipher()[0]


def _imap_starttls(address, context) -> str:
    client = imaplib.IMAP4(address.host, address.port, timeout=TIMEOUT)
    client.starttls(ssl_context=context)
    return _agreed(client, client.logout)


def _imaps(address, context) -> str:
    client = imaplib.IMAP4_SSL(address.host, address.port, ssl_context=context, timeout=TIMEOUT)
    return _agreed(client, client.logout)


def _pop3_stls(address, context) -> str:
    client = poplib.POP3(address.host, address.port, timeout=TIMEOUT)
    client.stls(context)
    return _agreed(client, client.quit)


def _pop3s(address, context) -> str:
    client = poplib.POP3_SSL(address.host, address.port, context=context, timeout=TIMEOUT)
    return _agreed(client, client.quit)


def _agreed(client, goodbye) -> str:
    """The suite of the client's connection, which it then ends with `goodbye`."""
    cipher = client.sock.cipher()[0]
    goodbye()
    return cipher


WAYS_IN = {
    "smtp.listen": _smtp_starttls,
    "imap.listen": _imap_starttls,
    "imap.listen_tls": _imaps,
    "pop3.listen": _pop3_stls,
    "pop3.listen_tls": _pop3s,
}


def _negotiate(daemon, listener: str, suite: str | None) -> str:
    """The suite the handshake agreed on, or "refused"; `suite` None: TLS 1.3, any suite."""
    context = client_tls_context(daemon.config)
    if suite is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(suite)
    try:
        return WAYS_IN[listener](daemon.listen(listener), context)
    except ssl.SSLError:
        return "refused"


def test_every_listener_offers_tls12_with_aead_suites_only(daemon):
    wrong = []
    for listener in WAYS_IN:
        for suite in REFUSED + ACCEPTED:
            expected = suite if suite in ACCEPTED else "refused"
            got = _negotiate(daemon, listener, suite)
            if got != expected:
                wrong.append(f"{listener} {suite}: {got}")
    assert not wrong, "TLS 1.2 suites not as the intermediate profile says:\n" + "\n".join(wrong)


def test_every_listener_speaks_tls13(daemon):
    for listener in WAYS_IN:
        assert _negotiate(daemon, listener, None).startswith("TLS_"), listener
