"""The accounts database through its public API: domains (IDN), users, aliases, catch-all,
sub-addressing, recipient resolution and authentication, against a real LMDB data dir."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import pytest

from conftest import CHEAP_HASHER
from storage import (
    AccountError,
    Accounts,
    AliasLoopError,
    AddressError,
    DataDirError,
    DomainNotEmptyError,
    ExistsError,
    NotFoundError,
    NotLocalError,
    PasswordPolicyError,
    UnknownAddressError,
    UnknownDomainError,
    open_data_dir,
    parse_address,
)

PASSWORD = "correct horse battery"


@pytest.fixture
def accounts(data_dir):
    """Accounts with example.test, hashing at the cheapest argon2id cost: what a hash
    costs is the subject of the `full_cost_accounts` tests only."""
    dd = open_data_dir(data_dir, 4)
    with Accounts(dd.accounts_path, hasher=CHEAP_HASHER) as db:
        db.add_domain("example.test")
        yield db


@pytest.fixture
def full_cost_accounts(data_dir):
    """Accounts with example.test and the hasher production uses (argon2-cffi's defaults)."""
    dd = open_data_dir(data_dir, 4)
    with Accounts(dd.accounts_path) as db:
        db.add_domain("example.test")
        yield db


def test_domains_are_case_insensitive_and_idna_normalized(accounts):
    assert accounts.is_local_domain("EXAMPLE.Test")
    domain = accounts.add_domain("Bücher.Example")
    assert domain.name == "xn--bcher-kva.example"
    assert domain.display == "bücher.example"
    for spelling in ("bücher.example", "BÜCHER.example", "xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE"):
        assert accounts.is_local_domain(spelling)
        with pytest.raises(ExistsError):
            accounts.add_domain(spelling)
    assert [d.name for d in accounts.domains()] == ["example.test", "xn--bcher-kva.example"]


@pytest.mark.parametrize("bad", ["", "example..test", ".example.test", "example.test.", "-bad.test", "127.0.0.1",
                                 "exa mple.test", "[127.0.0.1]", "a" * 64 + ".test", "xn--zz.test", "under_score.test"])
def test_bad_domains_are_refused(accounts, bad):
    with pytest.raises(AddressError):
        accounts.add_domain(bad)


def test_users_compare_case_insensitively_in_both_parts(accounts):
    accounts.add_user("Alice@Example.TEST", PASSWORD, quota=1024)
    user = accounts.get_user("ALICE@example.test")
    assert str(user.address) == "alice@example.test"
    assert user.quota == 1024
    with pytest.raises(ExistsError):
        accounts.add_user("aLiCe@EXAMPLE.test", PASSWORD)


def test_idn_user_is_found_by_either_domain_form(accounts):
    accounts.add_domain("bücher.example")
    accounts.add_user("jörg@BÜCHER.example", PASSWORD)
    assert accounts.get_user("JÖRG@xn--bcher-kva.example") is not None
    assert accounts.authenticate("jörg@xn--bcher-kva.example", PASSWORD) is not None
    assert [u.address.display for u in accounts.users("bücher.example")] == ["jörg@bücher.example"]


def test_user_needs_a_local_domain_and_a_sane_address(accounts):
    with pytest.raises(UnknownDomainError):
        accounts.add_user("bob@elsewhere.test", PASSWORD)
    for bad in ("bob", "bob@@example.test", '"bob smith"@example.test', "bob..x@example.test",
                "bob%remote@example.test", "a" * 65 + "@example.test", "bob!x@example.test"):
        with pytest.raises(AddressError):
            accounts.add_user(bad, PASSWORD)


def test_password_policy(accounts):
    with pytest.raises(PasswordPolicyError):
        accounts.add_user("bob@example.test", "short")
    with pytest.raises(PasswordPolicyError):
        accounts.add_user("bob@example.test", "x" * 1025)
    with pytest.raises(PasswordPolicyError):
        accounts.add_user("bob@example.test", "line\nbreak!")
    assert accounts.get_user("bob@example.test") is None


def test_passwords_are_stored_as_argon2id(full_cost_accounts, data_dir):
    full_cost_accounts.add_user("alice@example.test", PASSWORD)
    raw = (data_dir / "accounts.lmdb" / "data.mdb").read_bytes()
    assert b"$argon2id$v=19$m=65536,t=3,p=4$" in raw  # RFC 9106's second recommended option
    assert PASSWORD.encode() not in raw


def test_authenticate(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    assert str(accounts.authenticate("alice@example.test", PASSWORD).address) == "alice@example.test"
    assert accounts.authenticate("ALICE@Example.Test", PASSWORD) is not None
    assert accounts.authenticate("alice@example.test", PASSWORD.upper()) is None
    assert accounts.authenticate("alice@example.test", "") is None
    assert accounts.authenticate("alice@example.test", PASSWORD + "x" * 2000) is None
    assert accounts.authenticate("nobody@example.test", PASSWORD) is None
    assert accounts.authenticate("alice@elsewhere.test", PASSWORD) is None
    assert accounts.authenticate("not an address", PASSWORD) is None
    # Sub-addressing routes mail; it is not another login name.
    assert accounts.authenticate("alice+news@example.test", PASSWORD) is None


def test_a_hash_of_another_cost_is_made_again_at_the_next_login(data_dir):
    """[accounts] password_* changed: a stored hash is checked at the cost it was made
    with, and stored again at the hasher's once the password proved right."""
    import argon2

    other = argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1, type=argon2.Type.ID)
    path = open_data_dir(data_dir, 4).accounts_path
    with Accounts(path, hasher=CHEAP_HASHER) as accounts:
        accounts.add_domain("example.test")
        accounts.add_user("alice@example.test", PASSWORD)
    raw = (data_dir / "accounts.lmdb" / "data.mdb").read_bytes
    assert b"$argon2id$v=19$m=8,t=1,p=1$" in raw()
    with Accounts(path, hasher=other) as accounts:
        assert accounts.authenticate("alice@example.test", "wrong password") is None
        assert b"$argon2id$v=19$m=8,t=1,p=1$" in raw()  # a wrong password changes nothing
        assert accounts.authenticate("alice@example.test", PASSWORD) is not None
        assert accounts.authenticate("alice@example.test", PASSWORD) is not None
    assert b"$argon2id$v=19$m=16,t=2,p=1$" in raw()  # (the old record's page may stay in the file)
    with Accounts(path, hasher=CHEAP_HASHER) as accounts:  # and back: the new hash is the user's
        assert accounts.authenticate("alice@example.test", PASSWORD) is not None


def test_set_password_and_quota(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.set_password("alice@example.test", "a brand new secret")
    assert accounts.authenticate("alice@example.test", PASSWORD) is None
    assert accounts.authenticate("alice@example.test", "a brand new secret") is not None
    accounts.set_quota("Alice@example.test", 5 * 1024**3)
    assert accounts.get_user("alice@example.test").quota == 5 * 1024**3
    accounts.set_quota("alice@example.test", message_quota=1000)  # the storage quota stays
    user = accounts.get_user("alice@example.test")
    assert (user.quota, user.message_quota) == (5 * 1024**3, 1000)
    assert accounts.authenticate("alice@example.test", "a brand new secret").message_quota == 1000
    with pytest.raises(NotFoundError):
        accounts.set_password("nobody@example.test", "whatever123")


def test_unknown_user_costs_as_much_as_a_wrong_password(full_cost_accounts):
    """Response time must not tell an attacker which addresses exist. The gap this guards
    against is two orders of magnitude (a dictionary miss against an argon2 hash), so the
    bounds are wide on purpose."""
    accounts = full_cost_accounts
    accounts.add_user("alice@example.test", PASSWORD)

    def seconds(address: str) -> float:
        # The CPU time it costs (argon2's is what an attacker would time), not the wall
        # time: on a shared machine a burst of other work lands on one call or another.
        start = time.process_time()
        assert accounts.authenticate(address, "wrong password") is None
        return time.process_time() - start

    # Interleaved, so that anything else slowing this process slows all three alike.
    addresses = ("alice@example.test", "nobody@example.test", "nobody@elsewhere.test")
    rounds = [[seconds(address) for address in addresses] for _ in range(5)]
    wrong_password, unknown_user, unknown_domain = (statistics.median(column) for column in zip(*rounds, strict=True))
    assert 0.5 * wrong_password < unknown_user < 2 * wrong_password
    assert 0.5 * wrong_password < unknown_domain < 2 * wrong_password


def test_resolve_a_user_with_and_without_a_tag(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    for address in ("alice@example.test", "ALICE@EXAMPLE.TEST", "alice+news@example.test", "Alice+a+b@example.test"):
        resolution = accounts.resolve(address)
        assert [str(a) for a in resolution.local] == ["alice@example.test"]
        assert resolution.remote == () and resolution.unknown == ()


def test_sub_addressing_can_be_turned_off(data_dir):
    dd = open_data_dir(data_dir, 4)
    with Accounts(dd.accounts_path, recipient_delimiter="") as db:
        db.add_domain("example.test")
        db.add_user("alice@example.test", PASSWORD)
        with pytest.raises(UnknownAddressError):
            db.resolve("alice+news@example.test")
    with Accounts(dd.accounts_path, recipient_delimiter="-") as db:
        assert [str(a) for a in db.resolve("alice-news@example.test").local] == ["alice@example.test"]


def test_an_exact_user_wins_over_the_tag(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("alice+list@example.test", PASSWORD)
    assert [str(a) for a in accounts.resolve("alice+list@example.test").local] == ["alice+list@example.test"]


def test_resolve_refuses_strangers_and_other_domains(accounts):
    with pytest.raises(UnknownAddressError):
        accounts.resolve("nobody@example.test")
    with pytest.raises(NotLocalError):
        accounts.resolve("alice@elsewhere.test")
    with pytest.raises(AddressError):
        accounts.resolve('"alice@elsewhere.test"@example.test')


def test_alias_with_several_targets_local_and_remote(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("bob@example.test", PASSWORD)
    targets = ["alice@example.test", "BOB@example.test", "John.Smith@Remote.TEST"]
    alias = accounts.add_alias("Sales@Example.test", targets)
    # Local addresses fold case; a remote local part is the remote host's business (RFC 5321 §2.4).
    assert alias.targets == ("alice@example.test", "bob@example.test", "John.Smith@remote.test")
    resolution = accounts.resolve("sales+q3@example.test")
    assert [str(a) for a in resolution.local] == ["alice@example.test", "bob@example.test"]
    assert resolution.remote == ("John.Smith@remote.test",)
    with pytest.raises(NotFoundError):
        accounts.remove_alias("sales@example.test", ["john.smith@remote.test"])


def test_aliases_nest_deduplicate_and_survive_loops(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_alias("team@example.test", ["alice@example.test"])
    accounts.add_alias("all@example.test", ["team@example.test", "alice+all@example.test"])
    assert [str(a) for a in accounts.resolve("all@example.test").local] == ["alice@example.test"]
    accounts.add_alias("ping@example.test", ["alice@example.test"])
    accounts.add_alias("pong@example.test", ["ping@example.test"])
    accounts.add_alias("ping@example.test", ["pong@example.test"])  # now a loop
    assert [str(a) for a in accounts.resolve("pong@example.test").local] == ["alice@example.test"]
    # Once the loop reaches nobody, resolving it is an error, never an empty answer that
    # would let mail be accepted and go nowhere.
    accounts.remove_alias("ping@example.test", ["alice@example.test"])
    with pytest.raises(AliasLoopError):
        accounts.resolve("ping@example.test")


def test_an_alias_of_vanished_users_is_unknown_not_empty(accounts):
    accounts.add_user("bob@example.test", PASSWORD)
    accounts.add_alias("sales@example.test", ["bob@example.test"])
    accounts.remove_user("bob@example.test")
    with pytest.raises(UnknownAddressError, match="no longer exist"):
        accounts.resolve("sales@example.test")


def test_a_catch_all_cannot_forward_to_its_own_domain(accounts):
    with pytest.raises(AccountError, match="cannot forward to itself"):
        accounts.add_alias("@example.test", ["@EXAMPLE.test"])


def test_removing_a_domain_removes_aliases_pointing_into_it(accounts):
    accounts.add_domain("old.test")
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("carol@old.test", PASSWORD)
    accounts.add_alias("@old.test", ["@example.test"])
    accounts.add_alias("team@old.test", ["carol@old.test", "alice@example.test"])
    with pytest.raises(DomainNotEmptyError, match="2 alias\\(es\\) elsewhere point into it"):
        accounts.remove_domain("example.test")
    accounts.remove_domain("example.test", force=True)
    # Nothing at old.test may now forward to the no-longer-local example.test.
    assert [(a.display, a.targets) for a in accounts.aliases()] == [("team@old.test", ("carol@old.test",))]
    with pytest.raises(UnknownAddressError):
        accounts.resolve("random@old.test")


def test_undecodable_input_is_an_address_error_not_a_crash(accounts):
    bad = b"\xff@example.test".decode("utf-8", "surrogateescape")
    with pytest.raises(AddressError):
        accounts.add_user(bad, PASSWORD)
    with pytest.raises(AddressError):
        accounts.resolve(bad)
    assert accounts.authenticate(bad, PASSWORD) is None
    accounts.add_user("alice@example.test", PASSWORD)
    assert accounts.authenticate("alice@example.test", b"pa\xffss".decode("utf-8", "surrogateescape")) is None
    with pytest.raises(PasswordPolicyError, match="not valid UTF-8"):
        accounts.set_password("alice@example.test", b"pa\xffssword".decode("utf-8", "surrogateescape"))


def test_alias_targets_in_local_domains_must_exist(accounts):
    with pytest.raises(UnknownAddressError):
        accounts.add_alias("sales@example.test", ["nobody@example.test"])
    with pytest.raises(UnknownDomainError):
        accounts.add_alias("sales@elsewhere.test", ["ext@remote.test"])
    with pytest.raises(AccountError):
        accounts.add_alias("sales@example.test", ["sales@example.test"])


def test_a_removed_target_shows_as_unknown(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("bob@example.test", PASSWORD)
    accounts.add_alias("sales@example.test", ["alice@example.test", "bob@example.test"])
    still_named_by = accounts.remove_user("bob@example.test")
    assert [a.display for a in still_named_by] == ["sales@example.test"]
    resolution = accounts.resolve("sales@example.test")
    assert [str(a) for a in resolution.local] == ["alice@example.test"]
    assert resolution.unknown == ("bob@example.test",)


def test_user_and_alias_cannot_share_an_address(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    with pytest.raises(ExistsError):
        accounts.add_alias("alice@example.test", ["ext@remote.test"])
    accounts.add_alias("sales@example.test", ["alice@example.test"])
    with pytest.raises(ExistsError):
        accounts.add_user("sales@example.test", PASSWORD)


def test_catch_all_takes_only_what_nobody_else_takes(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("postmaster@example.test", PASSWORD)
    accounts.add_alias("@example.test", ["postmaster@example.test"])
    assert [str(a) for a in accounts.resolve("alice@example.test").local] == ["alice@example.test"]
    assert [str(a) for a in accounts.resolve("random@example.test").local] == ["postmaster@example.test"]
    assert [str(a) for a in accounts.resolve("alice+x@example.test").local] == ["alice@example.test"]


def test_domain_alias_keeps_the_local_part(accounts):
    accounts.add_domain("old.test")
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_alias("@old.test", ["@example.test"])
    assert [str(a) for a in accounts.resolve("Alice@old.test").local] == ["alice@example.test"]
    with pytest.raises(AddressError):
        accounts.add_alias("someone@old.test", ["@example.test"])


def test_remove_alias_targets_then_alias(accounts):
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_alias("sales@example.test", ["alice@example.test", "ext@remote.test"])
    left = accounts.remove_alias("sales@example.test", ["ext@REMOTE.test"])
    assert left.targets == ("alice@example.test",)
    assert accounts.remove_alias("sales@example.test", ["alice@example.test"]) is None
    with pytest.raises(NotFoundError):
        accounts.remove_alias("sales@example.test")


def test_remove_domain_refuses_when_not_empty_unless_forced(accounts):
    accounts.add_domain("other.test")
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_user("zed@other.test", PASSWORD)
    accounts.add_alias("@example.test", ["alice@example.test"])
    with pytest.raises(DomainNotEmptyError):
        accounts.remove_domain("example.test")
    assert accounts.remove_domain("EXAMPLE.test", force=True) == (1, 1)
    assert not accounts.is_local_domain("example.test")
    assert [str(u.address) for u in accounts.users()] == ["zed@other.test"]
    assert accounts.aliases() == []
    with pytest.raises(NotFoundError):
        accounts.remove_domain("example.test")


def test_state_survives_a_process_restart(data_dir):
    """One process writes and exits; a new one reads the same state from disk."""
    writer = f"""
import sys
from storage import Accounts, open_data_dir
dd = open_data_dir(sys.argv[1], 4)
with Accounts(dd.accounts_path) as db:
    db.add_domain("example.test")
    db.add_user("alice@example.test", {PASSWORD!r}, quota=42)
    db.add_alias("sales@example.test", ["alice@example.test"])
"""
    subprocess.run([sys.executable, "-c", writer, str(data_dir)], check=True, timeout=60)
    with Accounts(open_data_dir(data_dir, 4).accounts_path) as db:
        assert db.get_user("alice@example.test").quota == 42
        assert db.authenticate("alice@example.test", PASSWORD) is not None
        assert [str(a) for a in db.resolve("sales@example.test").local] == ["alice@example.test"]


def test_a_reader_sees_another_process_commit(accounts, data_dir):
    """A daemon keeps its Accounts open; what the CLI adds meanwhile is visible at once."""
    script = f"""
import sys
from storage import Accounts, open_data_dir
with Accounts(open_data_dir(sys.argv[1], 4).accounts_path) as db:
    db.add_user("late@example.test", {PASSWORD!r})
"""
    assert accounts.get_user("late@example.test") is None
    subprocess.run([sys.executable, "-c", script, str(data_dir)], check=True, timeout=60)
    assert accounts.get_user("late@example.test") is not None


def test_remembered_answers_follow_another_process_commits(accounts, data_dir):
    """get_user() and resolve() are remembered between commits (each RCPT asks both): a
    quota or an alias the CLI changes meanwhile is still what the next question gets."""
    accounts.add_user("alice@example.test", PASSWORD)
    accounts.add_alias("team@example.test", ["alice@example.test"])
    assert accounts.get_user("alice@example.test").quota == 0
    assert [str(a) for a in accounts.resolve("team@example.test").local] == ["alice@example.test"]
    script = f"""
import sys
from storage import Accounts, open_data_dir
with Accounts(open_data_dir(sys.argv[1], 4).accounts_path) as db:
    db.add_user("bob@example.test", {PASSWORD!r})
    db.set_quota("alice@example.test", 1000)
    db.add_alias("team@example.test", ["bob@example.test"])
"""
    subprocess.run([sys.executable, "-c", script, str(data_dir)], check=True, timeout=60)
    assert accounts.get_user("alice@example.test").quota == 1000
    assert sorted(str(a) for a in accounts.resolve("team@example.test").local) == [
        "alice@example.test", "bob@example.test"]


def test_remembered_answers_are_never_older_than_the_last_commit(data_dir):
    """A reader in one thread while another commits (the cluster's mirror does, in the
    process that reads): once a commit is done, the next question sees it, however the
    reads and the commit interleaved."""
    accounts = Accounts(open_data_dir(data_dir, 4).accounts_path, hasher=CHEAP_HASHER)
    accounts.add_domain("example.test")
    stop = threading.Event()

    def ask(address: str) -> None:
        while not stop.is_set():
            accounts.get_user(address)

    for i in range(60):
        address = f"user{i}@example.test"
        stop.clear()
        reader = threading.Thread(target=ask, args=(address,))
        reader.start()
        time.sleep(0.002)
        accounts.add_user(address, PASSWORD)
        stop.set()
        reader.join(5)
        assert accounts.get_user(address) is not None, f"round {i}: a stale 'no such user' kept"
    accounts.close()


def test_shard_count_is_fixed_at_initialisation(data_dir):
    open_data_dir(data_dir, 4)
    with pytest.raises(DataDirError, match="initialised with 4 shards"):
        open_data_dir(data_dir, 8)
    assert open_data_dir(data_dir, 4).shards == 4


def test_parse_address_limits():
    assert str(parse_address("A.B-c+d@Example.Test")) == "a.b-c+d@example.test"
    assert parse_address("ümlaut@bücher.example").display == "ümlaut@bücher.example"
    with pytest.raises(AddressError):
        parse_address("x" * 65 + "@example.test")
    with pytest.raises(AddressError):
        parse_address("x@" + ".".join(["a" * 63] * 5))
    # The limit counts octets of the stored (lowercased) form.
    with pytest.raises(AddressError):
        parse_address("İ" * 32 + "@example.test")


def test_concurrent_writers_in_several_processes(data_dir):
    """LMDB serializes writers across processes: nothing one process adds is lost."""
    open_data_dir(data_dir, 4)
    with Accounts(open_data_dir(data_dir, 4).accounts_path) as db:
        db.add_domain("example.test")
    script = """
import sys
import argon2
from storage import Accounts, open_data_dir
fast = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
with Accounts(open_data_dir(sys.argv[1], 4).accounts_path, hasher=fast) as db:
    for i in range(25):
        db.add_user(f"u{sys.argv[2]}-{i}@example.test", "long enough password")
        db.add_alias("all@example.test", [f"u{sys.argv[2]}-{i}@example.test"])
"""
    workers = [subprocess.Popen([sys.executable, "-c", script, str(data_dir), str(n)]) for n in range(4)]
    assert [w.wait(120) for w in workers] == [0, 0, 0, 0]
    with Accounts(open_data_dir(data_dir, 4).accounts_path) as db:
        assert len(db.users()) == 100
        assert len(db.resolve("all@example.test").local) == 100
