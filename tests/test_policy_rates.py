"""policy/rates.py (token buckets) and policy/greylist.py, on a fake clock, in memory and
in LMDB; shared across processes through the LMDB file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conf.schema import GreylistConfig
from policy import greylist as greylist_module
from policy import rates as rates_module
from policy.greylist import Greylist, network
from policy.rates import RateLimiter


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "lmdb"])
def where(request, tmp_path: Path) -> Path | None:
    return None if request.param == "memory" else tmp_path / "table.lmdb"


def run_python(code: str, *args: str) -> str:
    """Run `code` in another process (another LMDB environment on the same file)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- rates ---------------------------------------------------------------------------

def test_a_bucket_bursts_to_its_limit_then_refills_at_its_rate(where):
    clock = Clock()
    rates = RateLimiter(where, clock=clock)
    assert [rates.take("conn:192.0.2.1", 60, 5) for _ in range(6)] == [True] * 5 + [False]
    clock.now += 11.9  # 5 a minute: a token every 12 s
    assert rates.take("conn:192.0.2.1", 60, 5) is False
    clock.now += 0.1
    assert rates.take("conn:192.0.2.1", 60, 5) is True
    assert rates.take("conn:192.0.2.1", 60, 5) is False
    clock.now += 3600  # a long pause refills to the limit, not beyond
    assert [rates.take("conn:192.0.2.1", 60, 5) for _ in range(6)] == [True] * 5 + [False]
    rates.close()


def test_buckets_are_apart_by_key_and_by_period(where):
    rates = RateLimiter(where, clock=Clock())
    assert rates.take("user:alice", 3600, 1) is True
    assert rates.take("user:alice", 3600, 1) is False
    assert rates.take("user:alice", 86400, 1) is True  # the day's bucket is another
    assert rates.take("user:bob", 3600, 1) is True
    rates.close()


def test_a_refused_take_spends_nothing(where):
    clock = Clock()
    rates = RateLimiter(where, clock=clock)
    assert rates.take("rcpt:192.0.2.1", 60, 10, count=7) is True
    assert rates.take("rcpt:192.0.2.1", 60, 10, count=5) is False  # 3 left
    assert rates.take("rcpt:192.0.2.1", 60, 10, count=3) is True
    assert rates.take("rcpt:192.0.2.1", 60, 10, count=11) is False
    clock.now += 3600
    assert rates.take("rcpt:192.0.2.1", 60, 10, count=11) is False  # more than a bucket holds
    rates.close()


def test_a_zero_limit_is_no_limit(where):
    rates = RateLimiter(where, clock=Clock())
    assert all(rates.take("msg:192.0.2.1", 60, 0) for _ in range(1000))
    rates.close()


def test_float_dust_is_not_a_missing_token(where):
    # 11 a minute: 60/11 s later the refill sums to 0.9999999999999999 of a token (on a
    # clock at 0, where the 60/11 s is exact).
    clock = Clock(0.0)
    rates = RateLimiter(where, clock=clock)
    assert [rates.take("k", 60, 11) for _ in range(12)] == [True] * 11 + [False]
    clock.now += 60 / 11
    assert rates.take("k", 60, 11) is True
    rates.close()


def test_a_clock_stepping_back_refills_nothing(where):
    clock = Clock()
    rates = RateLimiter(where, clock=clock)
    assert rates.take("k", 60, 1) is True
    clock.now -= 3600
    assert rates.take("k", 60, 1) is False
    rates.close()


def test_another_process_spends_from_the_same_bucket(tmp_path: Path):
    path = tmp_path / "rates.lmdb"
    clock = Clock()
    rates = RateLimiter(path, clock=clock)
    assert [rates.take("conn:192.0.2.7", 60, 3) for _ in range(2)] == [True, True]
    out = run_python("""
        import sys
        from pathlib import Path
        from policy.rates import RateLimiter
        rates = RateLimiter(Path(sys.argv[1]), clock=lambda: float(sys.argv[2]))
        print([rates.take("conn:192.0.2.7", 60, 3) for _ in range(2)])
    """, str(path), repr(clock.now))
    assert out.strip() == "[True, False]"  # one token was left, the other process took it
    assert rates.take("conn:192.0.2.7", 60, 3) is False
    clock.now += 20  # a token every 20 s
    assert rates.take("conn:192.0.2.7", 60, 3) is True
    rates.close()


def test_processes_taking_at_once_spend_exactly_the_limit(tmp_path: Path):
    # Three processes race for 3000 tokens, 2000 tries each, starting together: one write
    # transaction per take, so exactly 3000 succeed.
    path = tmp_path / "rates.lmdb"
    RateLimiter(path).close()  # made before the race
    code = """
        import sys, time
        from pathlib import Path
        from policy.rates import RateLimiter
        rates = RateLimiter(Path(sys.argv[1]), clock=lambda: 1.0e9)
        start = float(sys.argv[2])
        while time.time() < start:
            time.sleep(0.001)
        print(sum(rates.take("race", 86400, 3000) for _ in range(2000)))
    """
    start = time.time() + 0.5
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path), repr(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    taken = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(taken) == 3000, taken


def test_the_shared_table_is_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(rates_module, "MAX_TRACKED", 100)
    clock = Clock()
    rates = RateLimiter(tmp_path / "rates.lmdb", clock=clock)
    trims = 0
    for i in range(300):
        clock.now += 1
        assert rates.take(f"conn:10.0.{i // 256}.{i % 256}", 3600, 2)
        if rates.wants_trim:  # as the chain does, in a thread: take() runs on the loop
            rates.trim()
            trims += 1
    assert trims >= 2
    entries = rates._table._env.stat()["entries"]
    assert 90 <= entries <= 100, entries
    # The newest buckets survived the trims: the last address has spent its token.
    assert rates.take("conn:10.0.1.43", 3600, 2) is True
    assert rates.take("conn:10.0.1.43", 3600, 2) is False
    rates.close()


def test_the_memory_table_is_bounded(monkeypatch):
    monkeypatch.setattr(rates_module, "MAX_TRACKED", 100)
    rates = RateLimiter(None, clock=Clock())
    for i in range(300):
        rates.take(f"k{i}", 3600, 2)
    assert len(rates._table._buckets) == 100


# --- greylist ------------------------------------------------------------------------

CONFIG = GreylistConfig(enabled=True, delay=300, retry_window=2 * 86400, expire=35 * 86400)


def test_first_try_waits_a_retry_too_soon_waits_the_rest_then_passes(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 300
    clock.now += 120
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == pytest.approx(180)
    clock.now += 179
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == pytest.approx(1)  # not reset
    clock.now += 1
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    clock.now += 1
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    # Another recipient, another sender: other triplets, each its first try.
    assert grey.check("192.0.2.10", "a@example.net", "c@example.test") == 300
    assert grey.check("192.0.2.10", "z@example.net", "b@example.test") == 300
    grey.close()


def test_a_retry_after_the_window_is_a_new_first_try(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 300
    clock.now += 2 * 86400 + 1
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 300
    clock.now += 300
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    grey.close()


def test_a_passed_triplet_expires_after_its_last_message(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    grey.check("192.0.2.10", "a@example.net", "b@example.test")
    clock.now += 300
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    clock.now += 30 * 86400  # a message within expire extends it
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    clock.now += 30 * 86400
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 0
    clock.now += 35 * 86400 + 1
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 300
    grey.close()


def test_the_triplet_takes_the_ipv4_slash_24_and_lowercased_addresses(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    assert grey.check("192.0.2.10", "A@Example.NET", "b@example.test") == 300
    clock.now += 300
    assert grey.check("192.0.2.200", "a@example.net", "B@EXAMPLE.TEST") == 0  # same /24
    assert grey.check("::ffff:192.0.2.99", "a@example.net", "b@example.test") == 0  # mapped
    assert grey.check("192.0.3.10", "a@example.net", "b@example.test") == 300  # another /24
    grey.close()


def test_the_triplet_takes_the_ipv6_slash_64(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    assert grey.check("2001:db8:1:2::10", "a@example.net", "b@example.test") == 300
    clock.now += 300
    assert grey.check("2001:db8:1:2:ffff:ffff:ffff:1", "a@example.net", "b@example.test") == 0
    assert grey.check("2001:db8:1:3::10", "a@example.net", "b@example.test") == 300
    grey.close()


def test_network():
    assert network("192.0.2.77") == "192.0.2.0/24"
    assert network("2001:DB8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network("::ffff:198.51.100.9") == "198.51.100.0/24"


def test_the_null_sender_and_long_addresses_are_triplets_too(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    long_local = "x" * 64
    long_sender = f"{long_local}@{'a' * 60}.{'b' * 60}.{'c' * 60}.{'d' * 60}.example"  # ~310 bytes
    long_rcpt = f"{long_local}@{'e' * 60}.{'f' * 60}.{'g' * 60}.{'h' * 60}.example"
    assert grey.check("192.0.2.1", long_sender, long_rcpt) == 300  # more than LMDB's 511-byte key
    assert grey.check("192.0.2.1", "", "b@example.test") == 300
    clock.now += 300
    assert grey.check("192.0.2.1", long_sender, long_rcpt) == 0
    assert grey.check("192.0.2.1", "", "b@example.test") == 0
    grey.close()


def test_known_domains(where):
    clock = Clock()
    grey = Greylist(where, CONFIG, clock=clock)
    assert grey.known_domain("example.net") is False
    grey.remember_domain("Example.NET.")
    assert grey.known_domain("example.net") is True
    assert grey.known_domain("other.example") is False
    clock.now += 35 * 86400
    assert grey.known_domain("EXAMPLE.net") is True
    grey.remember_domain("example.net")  # remembered again: another expire from now
    clock.now += 35 * 86400
    assert grey.known_domain("example.net") is True
    clock.now += 1
    assert grey.known_domain("example.net") is False
    grey.close()


def test_no_delay_passes_at_once(where):
    grey = Greylist(where, GreylistConfig(enabled=True, delay=0), clock=Clock())
    assert grey.check("192.0.2.1", "a@example.net", "b@example.test") == 0
    grey.close()


def test_another_process_sees_the_first_try(tmp_path: Path):
    path = tmp_path / "greylist.lmdb"
    clock = Clock()
    grey = Greylist(path, CONFIG, clock=clock)
    assert grey.check("192.0.2.10", "a@example.net", "b@example.test") == 300
    grey.remember_domain("example.org")
    out = run_python("""
        import sys
        from pathlib import Path
        from conf.schema import GreylistConfig
        from policy.greylist import Greylist
        grey = Greylist(Path(sys.argv[1]), GreylistConfig(enabled=True), clock=lambda: float(sys.argv[2]))
        print(grey.check("192.0.2.11", "a@example.net", "b@example.test"), grey.known_domain("example.org"))
    """, str(path), repr(clock.now + 301))
    assert out.split() == ["0.0", "True"]
    grey.close()


def test_the_greylist_is_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(greylist_module, "MAX_TRACKED", 100)
    clock = Clock()
    grey = Greylist(tmp_path / "greylist.lmdb", CONFIG, clock=clock)
    for i in range(300):
        clock.now += 1
        assert grey.check(f"10.{i // 256}.{i % 256}.1", "a@example.net", "b@example.test") == 300
    entries = grey._table._env.stat()["entries"]
    assert 90 <= entries <= 100, entries
    clock.now += 300
    assert grey.check("10.1.43.1", "a@example.net", "b@example.test") == 0  # the newest: kept
    assert grey.check("10.0.0.1", "a@example.net", "b@example.test") == 300  # oldest: dropped
    grey.close()


@pytest.mark.parametrize("shared", [True, False])
def test_a_flood_of_first_tries_never_flushes_what_was_earned(tmp_path: Path, monkeypatch, shared):
    """Passed triplets and known domains stay while first tries come and go (an attack
    flushed the whole table in minutes with made-up recipients)."""
    monkeypatch.setattr(greylist_module, "MAX_TRACKED", 100)
    clock = Clock()
    grey = Greylist(tmp_path / "greylist.lmdb" if shared else None, CONFIG, clock=clock)
    assert grey.check("192.0.2.1", "good@example.net", "b@example.test") == 300
    clock.now += 301
    assert grey.check("192.0.2.1", "good@example.net", "b@example.test") == 0  # passed
    grey.remember_domain("example.net")
    for i in range(1000):
        clock.now += 1
        grey.check(f"10.{i // 256}.{i % 256}.1", f"spam{i}@example.org", "b@example.test")
    assert grey.check("192.0.2.1", "good@example.net", "b@example.test") == 0
    assert grey.known_domain("example.net")
    grey.close()
