"""SRS (mtad/srs.py): the addresses libsrs2 and postsrsd make, checked against the scheme
recomputed here from its definition (HMAC-SHA1 over the lowercased fields, base64, four
characters; the day number mod 1024 in base32), and the secret's life on disk."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conf.schema import SRSConfig
from mtad.srs import SRS, SRSError, load_secret
from storage import DataDir

SECRET = b"a secret the tests share"
DAY = 86400.0
NOW = 1_796_000_000.0  # 2026-11-30
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stamp(t: float) -> str:
    day = int(t // DAY) % 1024
    return BASE32[day >> 5] + BASE32[day & 31]


def srs_hash(secret: bytes, *fields: str) -> str:
    digest = hmac.new(secret, "".join(fields).lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()[:4]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def srs(clock):
    return SRS(SECRET, "fwd.example.test", clock=clock)


def test_srs0_is_the_libsrs2_address_and_reverses(srs):
    forwarded = srs.forward("Alice.Smith@Example.ORG")
    tt = stamp(NOW)
    assert forwarded == f"SRS0={srs_hash(SECRET, tt, 'Example.ORG', 'Alice.Smith')}={tt}=Example.ORG=Alice.Smith" \
                        "@fwd.example.test"
    assert srs.reverse(forwarded) == "Alice.Smith@Example.ORG"


def test_srs1_for_an_srs0_sender_goes_back_to_the_first_hop(srs, clock):
    first_hop = SRS(b"another forwarder's secret", "first.example", clock=clock)
    srs0 = first_hop.forward("alice@example.org")
    opaque = srs0.split("@")[0][len("SRS0"):]  # "=HHHH=TT=example.org=alice"
    srs1 = srs.forward(srs0)
    assert srs1 == f"SRS1={srs_hash(SECRET, 'first.example', opaque)}=first.example={opaque}@fwd.example.test"
    assert srs.reverse(srs1) == srs0
    assert first_hop.reverse(srs.reverse(srs1)) == "alice@example.org"
    # A third forwarder keeps the first hop and replaces the hash with its own.
    third = SRS(b"third", "third.example", clock=clock)
    srs1_again = third.forward(srs1)
    assert srs1_again == f"SRS1={srs_hash(b'third', 'first.example', opaque)}=first.example={opaque}@third.example"
    assert third.reverse(srs1_again) == srs0


def test_what_is_not_rewritten(srs):
    assert srs.forward("") == ""  # a bounce stays a bounce
    assert srs.forward("bob@fwd.example.test") == "bob@fwd.example.test"
    assert srs.forward("bob@FWD.example.test") == "bob@FWD.example.test"
    assert srs.forward("postmaster") == "postmaster"


@pytest.mark.parametrize("address", [
    "alice@example.org",                                   # not SRS
    "SRS0=abcd=AB=example.org=alice@elsewhere.example",    # SRS, not our domain
    "SRS0=bogus@fwd.example.test",                         # SRS0 without its fields
    "SRS2=abcd=AB=example.org=alice@fwd.example.test",
    "",
])
def test_reverse_refuses_what_is_not_ours(srs, address):
    assert srs.reverse(address) is None


def test_bad_hash_and_other_secret(srs, clock):
    forwarded = srs.forward("alice@example.org")
    h = forwarded[5:9]
    wrong = "".join("B" if c != "B" else "C" for c in h)
    assert srs.reverse(forwarded.replace(h, wrong, 1)) is None
    # Changing any hashed field breaks it too: the domain, the user, the day.
    assert srs.reverse(forwarded.replace("=example.org=", "=example.com=")) is None
    assert srs.reverse(forwarded.replace("=alice@", "=mallory@")) is None
    assert SRS(b"not the secret", "fwd.example.test", clock=clock).reverse(forwarded) is None


def test_case_does_not_matter(srs):
    forwarded = srs.forward("alice@example.org")
    assert forwarded[5:9].lower() != forwarded[5:9].upper(), "a hash without letters proves nothing; change SECRET"
    assert srs.reverse(forwarded.lower()) == "alice@example.org"
    assert srs.reverse(forwarded.upper()) == "ALICE@EXAMPLE.ORG"


def test_srs0_expires_after_21_days(srs, clock):
    clock.now = NOW - NOW % DAY + 10  # just after midnight: the day boundaries are exact
    forwarded = srs.forward("alice@example.org")
    clock.now += 20 * DAY + DAY - 20  # the last second of the 21st day
    assert srs.reverse(forwarded) == "alice@example.org"
    clock.now += 20
    assert srs.reverse(forwarded) is None
    # The stamp wraps every 1024 days: one from 1024 days ago must not come back to life
    # unless it is the same day number (the scheme's own limit), and one from the future is refused.
    clock.now = NOW - NOW % DAY + 10
    tomorrow = SRS(SECRET, "fwd.example.test", clock=Clock(clock.now + DAY)).forward("alice@example.org")
    assert srs.reverse(tomorrow) is None


def test_load_secret(tmp_path):
    data_dir = DataDir(tmp_path, 1)
    assert load_secret(SRSConfig(secret="configured"), data_dir) == b"configured"
    assert not (tmp_path / "srs.key").exists()
    first = load_secret(SRSConfig(), data_dir)
    path = tmp_path / "srs.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(first)) == 32
    assert load_secret(SRSConfig(), data_dir) == first  # kept, never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["srs.key"]  # no temporary file left
    # postsrsd's format: the first line signs.
    path.write_bytes(b"postsrsd-secret\nan older one\n")
    assert load_secret(SRSConfig(), data_dir) == b"postsrsd-secret"
    path.write_bytes(b"\n")
    with pytest.raises(SRSError, match="empty SRS secret"):
        load_secret(SRSConfig(), data_dir)
    with pytest.raises(SRSError):
        SRS(b"", "fwd.example.test")


def test_threads_of_one_process_make_the_secret_at_once(tmp_path):
    """mtad's loop and its queue runner's thread both load it at start: one secret for all,
    never "cannot write the SRS secret" (a temporary name shared by the threads was
    unlinked under one of them, and that session answered 421)."""
    for round_number in range(20):
        data_dir = DataDir(tmp_path / str(round_number), 1)
        (tmp_path / str(round_number)).mkdir()
        start = threading.Barrier(8)

        def load(data_dir=data_dir, start=start) -> bytes:
            start.wait()
            return load_secret(SRSConfig(), data_dir)

        with ThreadPoolExecutor(8) as pool:
            secrets = set(pool.map(lambda _: load(), range(8)))
        assert len(secrets) == 1
        assert [p.name for p in (tmp_path / str(round_number)).iterdir()] == ["srs.key"]


# postsrsd's own test vectors (its tests/blackbox/socketmap.py: secret "tops3cr3t", SRS
# domain example.com, 2020-01-01 00:01:00 UTC): the same addresses, byte for byte, means a
# bounce of mail forwarded by either can be decoded by the other with a shared srs.key.
POSTSRSD_FORWARD = [
    ("test@otherdomain.com", "SRS0=vmyz=2W=otherdomain.com=test@example.com"),
    ("SRS0=opaque+string@otherdomain.com", "SRS1=chaI=otherdomain.com==opaque+string@example.com"),
    ("SRS1=X=thirddomain.com==opaque+string@otherdomain.com", "SRS1=JIBX=thirddomain.com==opaque+string@example.com"),
    ("SRS0=XjO9=2V=otherdomain.com=test@example.com", "SRS0=XjO9=2V=otherdomain.com=test@example.com"),  # ours
]
POSTSRSD_REVERSE = [
    ("SRS0=XjO9=2V=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("SRS1=JIBX=thirddomain.com==opaque+string@example.com", "SRS0=opaque+string@thirddomain.com"),
    ("srs0=xjo9=2v=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM", "TEST@OTHERDOMAIN.COM"),
    ("SRS0=FAKE=2V=otherdomain.com=test@example.com", None),
    ("SRS0=te87=T7=otherdomain.com=test@example.com", None),  # out of date
    ("SRS0=XjO9=2V=otherdomain.com@example.com", None),       # no user
    ("test@example.com", None),
]


@pytest.mark.parametrize("sender, expected", POSTSRSD_FORWARD)
def test_postsrsd_forward_vectors(sender, expected):
    assert SRS(b"tops3cr3t", "example.com", clock=Clock(1577836860)).forward(sender) == expected


@pytest.mark.parametrize("address, expected", POSTSRSD_REVERSE)
def test_postsrsd_reverse_vectors(address, expected):
    assert SRS(b"tops3cr3t", "example.com", clock=Clock(1577836860)).reverse(address) == expected
