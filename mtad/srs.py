"""The Sender Rewriting Scheme: the envelope sender of mail we forward to another domain
(an alias with a remote target), so that the forward passes SPF at the destination and a
bounce comes back to us, to be decoded and sent on to the original sender.

The addresses are those of libsrs2 and postsrsd ("guarded" SRS, Shevek's SRS paper):

    SRS0=HHHH=TT=orig-domain=orig-local@srs-domain      we are the first forwarder
    SRS1=HHHH=first-hop==HHHH=TT=orig-domain=orig-local@srs-domain
                                                        the sender was already SRS0
                                                        (bounces go to the first hop)

HHHH is the HMAC-SHA1 of the other fields, lowercased, keyed by the secret, base64 and cut
to 4 characters, compared without regard to case (some relays lowercase addresses); TT is
the day number mod 1024 in base32, and an SRS0 address is honoured for 21 days. srslib does
the scheme (its addresses are libsrs2's); this module adds the policy: the null sender and
a sender of our own SRS domain stay as they are (a bounce must never be rewritten, and our
own domain already passes SPF), and `reverse` answers None for anything it will not route
(not SRS, another domain, a bad hash, expired), which the caller answers 550 5.1.1.

The secret is `[srs] secret`, or `<data_dir>/srs.key` (a text line, as postsrsd keeps its
secret, made 0600 on first use). Changing it makes bounces of mail already forwarded
undeliverable: load_secret never replaces the file.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

import srslib

if TYPE_CHECKING:
    from conf.schema import SRSConfig
    from storage import DataDir

VALIDITY_DAYS = 21
HASH_LENGTH = 4
SECRET_FILE = "srs.key"


class SRSError(Exception):
    """The secret cannot be read or made; str() is one line for the sysadmin."""


class SRS:
    def __init__(self, secret: bytes, domain: str, *, clock=time.time):
        if not secret:
            raise SRSError("empty SRS secret")
        self.domain = domain.lower().rstrip(".")
        self._srs = srslib.SRS(secret, validity_days=VALIDITY_DAYS, hash_length=HASH_LENGTH)
        # srslib reads the time through this attribute (its own tests set it); a day
        # boundary in our tests needs it to be our clock.
        self._srs._time_fn = clock

    def forward(self, sender: str) -> str:
        """The envelope sender to forward with: SRS0 for an ordinary sender, SRS1 for an SRS
        sender of another forwarder, unchanged for "" (a bounce), for a sender in our SRS
        domain and for one without a domain."""
        local, at, domain = sender.rpartition("@")
        if not at or not local or not domain or domain.lower().rstrip(".") == self.domain:
            return sender
        return self._srs.forward(sender, self.domain)

    def reverse(self, address: str) -> str | None:
        """The address a bounce to `address` goes on to (the original sender for SRS0, the
        first forwarder's SRS0 address for SRS1), or None: not an SRS address of our domain,
        a hash that does not match, or an SRS0 older than VALIDITY_DAYS."""
        local, at, domain = address.rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain or local[:4].upper() not in ("SRS0", "SRS1"):
            return None
        try:
            original = self._srs.reverse(address)
        except srslib.Error:
            return None
        orig_local, _, orig_domain = original.rpartition("@")
        return original if orig_local and orig_domain else None


def load_secret(config: SRSConfig, data_dir: DataDir) -> bytes:
    """`[srs] secret`, or the first line of `<data_dir>/srs.key`, made (0600, 32 random
    bytes in base64) when it does not exist. Several processes may start at once: the
    file is written under a temporary name and linked into place, so the first one wins
    and the others read what it wrote."""
    if config.secret:
        return config.secret.encode()
    path = Path(data_dir.path) / SECRET_FILE
    if not path.exists():
        _create_secret(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise SRSError(f"{path}: cannot read the SRS secret: {e.strerror}") from None
    line = text.split(b"\n", 1)[0].strip()
    if not line:
        raise SRSError(f"{path}: empty SRS secret (remove the file to have a new one made, "
                       "which breaks bounces of mail already forwarded)")
    return line


def _create_secret(path: Path) -> None:
    # A name of this call's own: two threads of one process (mtad's loop and a delivery
    # thread) may make it at once, and a shared name let one unlink the other's file.
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    data = base64.b64encode(secrets.token_bytes(32)) + b"\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise SRSError(f"{path}: cannot write the SRS secret: {e.strerror}") from None
