"""The admin CLI as a sysadmin runs it: the installed `postroom` command on a real data dir.
Exit 0 on success, 1 with one line on a refused request, 2 on a usage error."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import POSTROOM

PASSWORD = "correct horse battery"


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [f"postroom: {message}"]
    assert "Traceback" not in result.stderr


@pytest.fixture
def with_domain(cli):
    ok(cli("domain", "add", "example.test"))
    return cli


def test_domain_round_trip(cli):
    assert ok(cli("domain", "add", "Example.TEST")) == "added domain example.test\n"
    assert ok(cli("domain", "add", "bücher.example")) == "added domain bücher.example (xn--bcher-kva.example)\n"
    assert ok(cli("domain", "list")) == "example.test\nbücher.example (xn--bcher-kva.example)\n"
    refused(cli("domain", "add", "example.test"), "domain example.test already exists")
    refused(cli("domain", "add", "bad..domain"), "invalid domain 'bad..domain': empty label")
    assert ok(cli("domain", "remove", "xn--bcher-kva.example")) == "removed domain xn--bcher-kva.example\n"
    assert ok(cli("domain", "list")) == "example.test\n"
    refused(cli("domain", "remove", "nowhere.test"), "no such domain: nowhere.test")


def test_user_round_trip(with_domain):
    cli = with_domain
    assert ok(cli("user", "add", "Alice@Example.test", "--password-stdin", "--quota", "2G", input=PASSWORD + "\n")) \
        == "added user alice@example.test (quota 2G)\n"
    ok(cli("user", "add", "bob@example.test", "--password-stdin", input=PASSWORD + "\r\n"))
    assert ok(cli("user", "list")).splitlines()[0].split("\t")[:2] == ["alice@example.test", "quota=2G"]
    listed = [line.split("\t")[0] for line in ok(cli("user", "list", "example.test")).splitlines()]
    assert listed == ["alice@example.test", "bob@example.test"]
    assert ok(cli("user", "quota", "bob@example.test", "0")) == "quota of bob@example.test set to unlimited\n"
    assert ok(cli("user", "quota", "bob@example.test", "--messages", "500")) \
        == "message quota of bob@example.test set to 500\n"
    listed = {line.split("\t")[0]: line for line in ok(cli("user", "list")).splitlines()}
    assert "quota=unlimited" in listed["bob@example.test"] and "messages=500" in listed["bob@example.test"]
    assert cli("user", "quota", "bob@example.test").returncode == 2  # neither SIZE nor --messages
    assert cli("user", "quota", "bob@example.test", "--messages", "many").returncode == 2
    assert ok(cli("user", "passwd", "BOB@example.test", "--password-stdin", input="another long one\n")) \
        == "password changed for BOB@example.test\n"
    assert ok(cli("user", "remove", "alice@example.test")) == "removed user alice@example.test\n"
    assert [line.split("\t")[0] for line in ok(cli("user", "list")).splitlines()] == ["bob@example.test"]


def test_user_errors_are_one_line(with_domain):
    cli = with_domain
    ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
    refused(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD),
            "user alice@example.test already exists")
    refused(cli("user", "add", "carol@nowhere.test", "--password-stdin", input=PASSWORD),
            "unknown domain nowhere.test: add it with 'postroom domain add'")
    refused(cli("user", "add", "no-at-sign", "--password-stdin", input=PASSWORD),
            "'no-at-sign' is not an address (no '@')")
    refused(cli("user", "add", "carol@example.test", "--password-stdin", input="short\n"),
            "password too short: at least 8 characters")
    refused(cli("user", "add", "carol@example.test", "--password-stdin", input=""), "no password on standard input")
    refused(cli("user", "remove", "nobody@example.test"), "no such user: nobody@example.test")
    refused(cli("user", "passwd", "nobody@example.test", "--password-stdin", input=PASSWORD),
            "no such user: nobody@example.test")
    refused(cli("user", "list", "nowhere.test"), "unknown domain nowhere.test: add it with 'postroom domain add'")


def test_the_password_set_by_the_cli_authenticates(with_domain, data_dir):
    ok(with_domain("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD + "\n"))
    from storage import Accounts, open_data_dir

    with Accounts(open_data_dir(data_dir, 4).accounts_path) as accounts:
        assert accounts.authenticate("alice@example.test", PASSWORD) is not None
        assert accounts.authenticate("alice@example.test", PASSWORD + "\n") is None


def test_alias_round_trip(with_domain):
    cli = with_domain
    ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
    assert ok(cli("alias", "add", "sales@example.test", "alice@example.test,ext@remote.test")) \
        == "alias sales@example.test -> alice@example.test, ext@remote.test\n"
    assert ok(cli("alias", "add", "sales@example.test", "two@remote.test")) \
        == "alias sales@example.test -> alice@example.test, ext@remote.test, two@remote.test\n"
    ok(cli("alias", "add", "@example.test", "alice@example.test"))
    assert ok(cli("alias", "list")) == (
        "@example.test\talice@example.test\n"
        "sales@example.test\talice@example.test,ext@remote.test,two@remote.test\n"
    )
    assert ok(cli("alias", "remove", "sales@example.test", "ext@remote.test,two@remote.test")) \
        == "alias sales@example.test -> alice@example.test\n"
    assert ok(cli("alias", "remove", "@example.test")) == "removed alias @example.test\n"
    refused(cli("alias", "remove", "@example.test"), "no such alias: @example.test")
    refused(cli("alias", "add", "alice@example.test", "ext@remote.test"),
            "alice@example.test is a user; an address is a user or an alias, not both")


def test_removing_a_user_warns_about_aliases_that_name_it(with_domain):
    cli = with_domain
    ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
    ok(cli("alias", "add", "sales@example.test", "alice@example.test"))
    result = cli("user", "remove", "alice@example.test")
    assert result.returncode == 0
    assert result.stderr == "postroom: warning: alias sales@example.test still forwards to alice@example.test\n"


def test_domain_with_users_needs_force(with_domain):
    cli = with_domain
    ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
    refused(cli("domain", "remove", "example.test"),
            "domain example.test still has 1 user(s) and 0 alias(es); remove them first or use --force")
    assert ok(cli("domain", "remove", "example.test", "--force")) \
        == "removed domain example.test with 1 user(s) and 0 alias(es)\n"
    assert ok(cli("user", "list")) == ""


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["user"], ["user", "add"], ["domain", "add", "a", "b"],
                                  ["user", "add", "x@example.test", "--bogus"]])
def test_usage_errors_exit_2(cli, args):
    result = cli(*args)
    assert result.returncode == 2
    assert "usage: postroom" in result.stderr


def test_bad_quota_is_a_usage_error(with_domain):
    result = with_domain("user", "add", "alice@example.test", "--password-stdin", "--quota", "lots", input=PASSWORD)
    assert result.returncode == 2
    assert result.stderr.startswith("postroom: --quota: expected a size")


def test_no_password_without_a_terminal_is_a_usage_error(with_domain):
    result = with_domain("user", "add", "alice@example.test")
    assert result.returncode == 2
    assert result.stderr == "postroom: no password given: use --password-stdin, or run in a terminal to be asked\n"


def test_shard_change_is_refused(cli, write_config, data_dir):
    ok(cli("domain", "list"))
    changed = write_config("changed.toml", storage={"shards": 8})
    refused(cli("domain", "list", config=changed),
            f"{data_dir} was initialised with 4 shards but [storage] shards = 8; set shards = 4 "
            "(re-sharding is not automatic)")


def test_version():
    result = subprocess.run([POSTROOM, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("postroom ")


def test_undecodable_bytes_are_one_line_errors(with_domain, config_path, tmp_path):
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    bad_address = subprocess.run(
        [POSTROOM.encode(), b"--config", bytes(config_path),
         b"user", b"add", b"\xff@example.test", b"--password-stdin"],
        input=PASSWORD.encode(), capture_output=True, timeout=60, env=env, cwd=tmp_path)
    assert bad_address.returncode == 1
    assert bad_address.stderr.count(b"\n") == 1 and b"not UTF-8" in bad_address.stderr
    bad_password = subprocess.run(
        [POSTROOM, "--config", str(config_path), "user", "add", "alice@example.test", "--password-stdin"],
        input=b"pa\xffssword123\n", capture_output=True, timeout=60, env=env, cwd=tmp_path)
    assert bad_password.returncode == 1
    assert bad_password.stderr == b"postroom: the password on standard input is not UTF-8\n"


def test_a_closed_pipe_is_not_a_traceback(with_domain, config_path, data_dir, tmp_path):
    from storage import Accounts, open_data_dir

    # Long names (~150 bytes a line), so that ~165 KB of output, well over a pipe buffer
    # (64 KiB), takes 1,100 domains: each is a commit of its own (8,000 short ones took 25 s).
    padding = "a" * 63 + "." + "b" * 63
    with Accounts(open_data_dir(data_dir, 4).accounts_path) as accounts:
        for i in range(1100):
            accounts.add_domain(f"domain-{i:05d}.{padding}.example")
    pipeline = subprocess.run(f"{POSTROOM} --config {config_path} domain list | head -1",
                              shell=True, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert pipeline.stdout == f"domain-00000.{padding}.example\n"
    assert pipeline.stderr == ""


def test_an_unusable_data_dir_is_one_line(cli, data_dir):
    data_dir.mkdir()
    (data_dir / "layout.json").write_text('{"format": 1, "shards": 4}')
    (data_dir / "accounts.lmdb").write_text("not a database")
    result = cli("domain", "list")
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(data_dir) in result.stderr


def test_an_uncreatable_certificate_path_is_one_line(write_config, cli):
    path = write_config(tls={"cert": "/dev/null/cert.pem", "key": "/dev/null/key.pem", "self_signed": True})
    result = cli("serve", config=path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "postroom: /dev/null/cert.pem: cannot write the self-signed certificate (/dev/null: File exists)"]


def test_admin_changes_are_audited_without_secrets(with_domain, data_dir):
    cli = with_domain
    ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
    ok(cli("user", "passwd", "alice@example.test", "--password-stdin", input="another long one"))
    ok(cli("alias", "add", "sales@example.test", "alice@example.test"))
    log = (data_dir / "audit.log").read_text().splitlines()
    events = [next(f for f in line.split() if f.startswith("event=")) for line in log]
    assert events == ["event=domain.added", "event=user.added", "event=user.password_changed", "event=alias.added"]
    assert "user=alice@example.test" in log[1]
    assert PASSWORD not in "\n".join(log) and "another long one" not in "\n".join(log)
    assert stat.S_IMODE((data_dir / "audit.log").stat().st_mode) == 0o600


def test_works_as_the_owner_of_the_data_dir_not_as_root(write_config):
    """The daemon runs as an unprivileged user (systemd's User=postroom). Whatever the CLI
    creates must be usable by that user: run by root on a data dir owned by someone else, it
    works as that owner; run by the owner, it needs no privilege at all."""
    nobody = 65534
    base = Path(tempfile.mkdtemp(prefix="postroom-owner-"))
    try:
        os.chmod(base, 0o755)
        data_dir = base / "var"
        data_dir.mkdir(mode=0o750)
        config = write_config("owned.toml", server={"data_dir": str(data_dir)})
        shutil.copy(config, base / "postroom.toml")
        config = base / "postroom.toml"
        os.chmod(config, 0o644)
        if os.geteuid() == 0:
            os.chown(data_dir, nobody, nobody)
            run = [POSTROOM, "--config", str(config)]
        else:  # already unprivileged: the same checks hold for our own uid
            nobody = os.geteuid()
            run = [POSTROOM, "--config", str(config)]
        def cli(*args, input=None):
            return subprocess.run([*run, *args], input=input, capture_output=True, text=True, timeout=120, cwd=base)
        ok(cli("domain", "add", "example.test"))
        ok(cli("user", "add", "alice@example.test", "--password-stdin", input=PASSWORD))
        for path in [data_dir / "accounts.lmdb", *(data_dir / "accounts.lmdb").iterdir(), data_dir / "audit.log"]:
            assert path.stat().st_uid == nobody, path
        assert stat.S_IMODE((data_dir / "accounts.lmdb").stat().st_mode) == 0o700
        assert stat.S_IMODE((data_dir / "accounts.lmdb" / "data.mdb").stat().st_mode) == 0o600
        if os.geteuid() == 0:
            # And the unprivileged owner itself, with no capability to bypass file modes:
            as_owner = subprocess.run(
                ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                 POSTROOM, "--config", str(config), "user", "list"],
                capture_output=True, text=True, timeout=120, cwd=base)
            assert as_owner.returncode == 0, as_owner.stderr
            assert as_owner.stdout.startswith("alice@example.test\t")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_store_check_repair_and_rebuild_from_the_cli(with_domain, data_dir):
    from storage import open_data_dir
    from storage.store import Store

    cli = with_domain
    with Store(open_data_dir(data_dir, 4)) as store:
        for i in range(3):
            store.deliver(["alice@example.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())
        inbox = store.mailbox("alice@example.test", "INBOX")
        (first,) = store.shard("alice@example.test").mailbox_dir("alice@example.test", inbox.id).glob("cur/*,U=1,*")
    assert ok(cli("store", "check")) == "0 problem(s)\n"
    first.unlink()
    result = cli("store", "check", "Alice@Example.test")
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith("alice@example.test INBOX: file-missing: UID 1 ")
    assert result.stdout.splitlines()[-1] == "1 problem(s): run 'postroom store check --repair'"
    assert ok(cli("store", "check", "--repair")).endswith("1 problem(s) found and repaired\n")
    assert ok(cli("store", "check")) == "0 problem(s)\n"
    assert ok(cli("store", "rebuild", "alice@example.test")) == \
        "alice@example.test: 6 mailbox(es), 2 message(s) indexed\n"
    refused(cli("store", "rebuild", "not-an-address"), "'not-an-address' is not an address (no '@')")
