"""DKIM signing of mail our users send (RFC 6376), with ed25519 beside RSA (RFC 8463), and
the DNS records a domain publishes for its mail.

Keys live under `<data_dir>/dkim/<domain>/<selector>.<rsa|ed25519>.key` (directories 0700,
files 0600, written whole and renamed into place). RSA keys are 2048-bit PKCS#1 PEM, as
opendkim-genkey writes them; ed25519 keys are PKCS#8 PEM, as `openssl genpkey` writes them;
so either can be handed to another signer. The domain is the lowercase A-label form.

A domain signs with at most one key per algorithm, the newest file of each: with both, a
message carries two signatures (rsa-sha256 on top, for verifiers that check only the
first, then ed25519-sha256). To rotate, make a key under a new selector, publish its record,
and remove the old file once the new record is in DNS (the new key signs as soon as it
exists). Each selector holds one algorithm: both under one name would need two key records
at one DNS name, which verifiers cannot tell apart.

Signatures use relaxed/relaxed canonicalization (RFC 6376 §3.4.2, §3.4.4), which survives the
header refolding and trailing-space changes of relays. They cover the header fields that say
who, what and when (SIGNED_FIELDS, each occurrence), and `From` once more than it occurs
(RFC 6376 §5.4.2): the extra, empty instance makes a second `From:` added in transit break
the signature. dkimpy does the cryptography and the header canonicalization, but it wants
the whole message in memory to hash its body; so the body hash is computed as the message
streams by (policy/dkim_body.py, the same relaxed canonicalization), and dkimpy is given the
header section alone with that hash put in its bh= (_PrecomputedBodyDKIM): memory while
signing is the header, whatever the size of the message.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from policy import dkimpy_speed
from policy.dkim_body import MessageDigest

dkimpy_speed.install()

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
# The header fields signed when present (RFC 6376 §5.4.1's list, trimmed to what a client
# writes and a relay must not change), plus every List-* field (RFC 2369, 2919, 8058).
SIGNED_FIELDS = frozenset({
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding",
})
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_DOMAIN = _SELECTOR  # LDH labels; the caller has turned a U-label into its A-label
_KEY_FILE = re.compile(r"^(?P<selector>.+)\.(?P<algorithm>rsa|ed25519)\.key$")
_TXT_CHUNK = 255  # one character-string of a TXT record (RFC 1035 §3.3.14)
_TTL = 3600


class DKIMKeyError(Exception):
    """A key cannot be made, found or used; str() is one line for the sysadmin."""


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    algorithm: str      # "rsa" or "ed25519"
    path: Path

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"


class DKIMSigner:
    """Signs messages with the keys under `keys_dir`. Keys are read when first used and
    again when their domain's directory changes, so a `dkim keygen` on a live server takes
    effect without a restart."""

    def __init__(self, keys_dir: Path):
        self._keys_dir = Path(keys_dir)
        self._cache: dict[str, tuple[int, list[tuple[Key, bytes]]]] = {}

    def sign(self, message: bytes, domain: str) -> bytes:
        """The DKIM-Signature field(s) to put on top of `message` (CRLF line ends), or b""
        when `domain` has no key. DKIMKeyError when a key file is unreadable."""
        digest = MessageDigest()
        digest.update(message)
        return self.sign_digest(digest, domain)

    def sign_digest(self, digest: MessageDigest, domain: str) -> bytes:
        """The DKIM-Signature field(s) for the message `digest` was fed (all of it), as
        `sign`; b"" also when its header section was too long to keep."""
        keys = self._keys(domain)
        header = digest.header
        if not keys or header is None:
            return b""
        body_hash = base64.b64encode(digest.body.digest())
        fields = signed_fields(header)
        out = []
        for key, private in keys:
            signer = _PrecomputedBodyDKIM(header + b"\r\n", body_hash, signature_algorithm=key.signature_algorithm,
                                          linesep=b"\r\n")
            try:
                out.append(signer.sign(key.selector.encode(), key.domain.encode(), private,
                                       canonicalize=(b"relaxed", b"relaxed"), include_headers=fields))
            except dkim.DKIMException as e:
                raise DKIMKeyError(f"{key.path}: cannot sign with this key: {e}") from None
        return b"".join(out)

    def _keys(self, domain: str) -> list[tuple[Key, bytes]]:
        domain = domain.lower()
        if not _DOMAIN.match(domain):
            return []
        directory = self._keys_dir / domain
        try:
            stamp = directory.stat().st_mtime_ns
        except FileNotFoundError:
            self._cache.pop(domain, None)
            return []
        cached = self._cache.get(domain)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        loaded = [(key, _dkimpy_private_key(key)) for key in newest_keys(self._keys_dir, domain)]
        loaded.sort(key=lambda pair: ALGORITHMS.index(pair[0].algorithm))  # rsa on top
        self._cache[domain] = (stamp, loaded)
        return loaded


class _PrecomputedBodyDKIM(dkim.DKIM):
    """dkimpy's signer given the header section and an empty body: the bh= it computed from
    that empty body is replaced by the real one before the header fields (bh= among them)
    are hashed and signed. Both algorithms hash the body with SHA-256 (RFC 6376 §3.3,
    RFC 8463 §3), so one hash serves both signatures. The l= tag is never used."""

    def __init__(self, header_section: bytes, body_hash: bytes, **kwargs):
        super().__init__(header_section, **kwargs)
        self._body_hash = body_hash

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk, standardize=False):
        fields = [(name, self._body_hash if name == b"bh" else value) for name, value in fields]
        return super().gen_header(fields, include_headers, canon_policy, header_name, pk, standardize)


def signed_fields(message: bytes) -> list[bytes]:
    """The h= list for `message`: each signed field as often as it occurs, then `from`
    once more (over-signing, RFC 6376 §5.4.2)."""
    names = []
    for line in _header_lines(message):
        if line[:1] in (b" ", b"\t"):
            continue  # a continuation line
        name = line.split(b":", 1)[0].strip().lower()
        if name in _SIGNED_BYTES or name.startswith(b"list-"):
            names.append(name)
    return names + [b"from"]


_SIGNED_BYTES = frozenset(name.encode() for name in SIGNED_FIELDS)


def _header_lines(message: bytes):
    start = 0
    while start < len(message):
        end = message.find(b"\n", start)
        line = message[start:] if end < 0 else message[start:end]
        if line in (b"", b"\r"):
            return
        yield line.rstrip(b"\r")
        if end < 0:
            return
        start = end + 1


def newest_keys(keys_dir: Path, domain: str) -> list[Key]:
    """The key each algorithm signs `domain` with: the newest file of that algorithm."""
    newest: dict[str, tuple[int, Key]] = {}
    for key in list_keys(keys_dir, domain):
        mtime = key.path.stat().st_mtime_ns
        if key.algorithm not in newest or mtime > newest[key.algorithm][0]:
            newest[key.algorithm] = (mtime, key)
    return [key for _, key in newest.values()]


def list_keys(keys_dir: Path, domain: str) -> list[Key]:
    """Every key file of `domain`, by selector."""
    directory = Path(keys_dir) / domain
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    keys = []
    for name in names:
        match = _KEY_FILE.match(name)
        if match and _SELECTOR.match(match["selector"]):
            keys.append(Key(domain, match["selector"], match["algorithm"], directory / name))
    return keys


def default_selector(algorithm: str, now: float) -> str:
    """`rsa202611`, `ed202611`: a date in the name leaves room for the next key."""
    month = time.strftime("%Y%m", time.gmtime(now))
    return f"{'rsa' if algorithm == 'rsa' else 'ed'}{month}"


def keygen(keys_dir: Path, domain: str, selector: str, algorithm: str, *, force: bool = False) -> str:
    """Write a new private key for `domain` under `selector` (0600, in 0700 directories) and
    return the TXT record text to publish at `<selector>._domainkey.<domain>`. Refuses (with
    DKIMKeyError) to replace an existing key unless `force`, and a selector that another
    algorithm's key already holds."""
    domain, selector = domain.lower(), selector.lower()
    if algorithm not in ALGORITHMS:
        raise DKIMKeyError(f"unknown algorithm {algorithm!r}: rsa or ed25519")
    if not _DOMAIN.match(domain):
        raise DKIMKeyError(f"invalid domain {domain!r}")
    if not _SELECTOR.match(selector):
        raise DKIMKeyError(f"invalid selector {selector!r}: letters, digits, '-' and '.' only")
    directory = Path(keys_dir) / domain
    path = directory / f"{selector}.{algorithm}.key"
    for other in ALGORITHMS:
        if other != algorithm and (directory / f"{selector}.{other}.key").exists():
            raise DKIMKeyError(f"selector {selector} of {domain} already has an {other} key: choose another "
                               "selector (one DNS record per selector)")
    if path.exists() and not force:
        raise DKIMKeyError(f"{path} exists: use --force to replace it (and publish the new record)")
    if algorithm == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    _make_private_dir(Path(keys_dir))
    _make_private_dir(directory)
    _write_private(path, pem)
    return txt_record(path)


def txt_record(path: Path) -> str:
    """The TXT record text of the key in `path`: `v=DKIM1; k=rsa; p=...` (RFC 6376 §3.6.1;
    for ed25519 the raw 32-byte public key, RFC 8463 §4.2)."""
    private = _load_private(path)
    if isinstance(private, rsa.RSAPrivateKey):
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def dns_records(domain: str, hostname: str, keys_dir: Path, *, ports: dict[str, int | None] | None = None,
                ttl: int = _TTL) -> list[str]:
    """Zone-file lines for `domain` whose mail server is `hostname`: MX, SPF, each DKIM key,
    DMARC at p=none (watch the reports before tightening), and the RFC 6186 SRV records
    that let mail clients find the server (`ports` maps a service to its port, None for
    one not offered, which RFC 6186 §4 publishes with the target ".")."""
    domain, hostname = domain.lower().rstrip("."), hostname.lower().rstrip(".")
    ports = {**DEFAULT_PORTS, **(ports or {})}
    rows = [
        (f"{domain}.", "MX", f"10 {hostname}."),
        (f"{domain}.", "TXT", zone_txt("v=spf1 mx -all")),  # RFC 7208: only the MX hosts send for it
    ]
    for key in list_keys(keys_dir, domain):
        rows.append((f"{key.selector}._domainkey.{domain}.", "TXT", zone_txt(txt_record(key.path))))
    # RFC 7489 §6.3: reports go to the postmaster, which every domain has (RFC 5321 §4.5.1).
    rows.append((f"_dmarc.{domain}.", "TXT", zone_txt(f"v=DMARC1; p=none; rua=mailto:postmaster@{domain}")))
    for service, port in ports.items():
        target = f"0 1 {port} {hostname}." if port else "0 0 0 ."
        rows.append((f"_{service}._tcp.{domain}.", "SRV", target))
    width = max(len(name) for name, _, _ in rows)
    return [f"{name:<{width}} {ttl} IN {kind:<3} {data}" for name, kind, data in rows]


# RFC 6186 §3 services, with the ports of RFC 6409 (submission), RFC 8314 (submissions,
# imaps, pop3s) and RFC 3501 (imap).
DEFAULT_PORTS: dict[str, int | None] = {
    "submission": 587, "submissions": 465, "imap": 143, "imaps": 993, "pop3s": 995,
}


def zone_txt(text: str) -> str:
    """`text` as quoted character-strings of at most 255 bytes each (one TXT record)."""
    data = text.encode("ascii")
    parts = [data[i:i + _TXT_CHUNK].decode() for i in range(0, len(data), _TXT_CHUNK)] or [""]
    return " ".join(f'"{part}"' for part in parts)


def _dkimpy_private_key(key: Key) -> bytes:
    """The private key as dkimpy takes it: PEM for RSA, the base64 seed for ed25519."""
    private = _load_private(key.path)
    if key.algorithm == "rsa":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise DKIMKeyError(f"{key.path}: not an RSA key")
        return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise DKIMKeyError(f"{key.path}: not an ed25519 key")
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    return base64.b64encode(seed)


def _load_private(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise DKIMKeyError(f"{path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise DKIMKeyError(f"{path}: not a PEM private key: {e}") from None


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)  # also when it existed, or was made under a wider umask


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` as 0600, whole or not at all: a temporary file, fsynced, then
    renamed over the old key (a crash leaves the old key or the new, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
