"""`postroom store import` fed hostile or broken sources (issue 16, session 9's attack):
a Maildir the user could write to (symbolic links out of it, FIFOs, devices, a folder that
contains itself), a dovecot-uidlist with absurd or duplicate UIDs, a fake IMAP server that
lies. The command is run as the sysadmin runs it; what came in is read from the store.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import POSTROOM, add_accounts, write_config_file
from storage import open_data_dir
from storage.store import Store

PASSWORD = "correct horse battery staple"
USER = "u@example.test"


@pytest.fixture
def target(tmp_path):
    config = write_config_file(tmp_path / "postroom.toml", tmp_path / "var")
    add_accounts(config, PASSWORD, users=[USER])

    def run(source: Path | str, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([POSTROOM, "--config", str(config), "store", "import", USER, str(source)],
                              input=input, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              stdin=None if input is not None else subprocess.DEVNULL)

    run.data_dir = tmp_path / "var"
    return run


def bodies(data_dir: Path, mailbox: str = "INBOX") -> dict[int, bytes]:
    """{uid: bytes} of a mailbox of USER, read from the store after the import."""
    with Store(open_data_dir(data_dir, 4)) as store:
        return {info.uid: store.read_message(info) for info in store.fetch(USER, mailbox, ((1, 2**32 - 1),))}


def maildir(root: Path, messages: dict[str, bytes]) -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, raw in messages.items():
        (root / "cur" / name).write_bytes(raw)
    return root


def test_a_maildir_imports_no_file_through_a_link_nor_a_fifo_nor_a_device(target, tmp_path):
    """Before: the link's target (any file root can read) came in as mail, the FIFO hung the
    import for ever, /dev/zero would have filled the disk, and ".Loop -> ." nested the
    Maildir in itself until a traceback (ELOOP)."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret-hash:19000::::::\n")
    source = maildir(tmp_path / "Maildir", {"1.host:2,S": b"Subject: mine\n\nreal mail\n"})
    (source / "cur" / "2.host:2,S").symlink_to(secret)
    os.mkfifo(source / "new" / "3.host")
    (source / "new" / "4.host").symlink_to("/dev/zero")
    (source / ".Loop").symlink_to(".")
    outside = maildir(tmp_path / "elsewhere", {"5.host:2,": b"Subject: not the user's\n\nx\n"})
    (source / ".Linked").symlink_to(outside)

    done = target(source, timeout=20)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1  # messages failed: a script notices
    assert "INBOX: 1 imported, 0 already in, 3 failed" in done.stdout, done.stdout
    assert "maildir:2.host: cannot read it: a symbolic link, not followed" in done.stderr
    assert "maildir:3.host: cannot read it: not a regular file" in done.stderr
    assert "maildir:4.host: cannot read it: a symbolic link, not followed" in done.stderr
    assert "Loop" not in done.stdout and "Linked" not in done.stdout
    got = bodies(target.data_dir)
    assert list(got.values()) == [b"Subject: mine\r\n\r\nreal mail\r\n"]


def test_a_maildir_whose_cur_is_a_link_elsewhere_is_refused_in_one_line(target, tmp_path):
    elsewhere = maildir(tmp_path / "elsewhere", {"5.host:2,": b"Subject: not the user's\n\nx\n"})
    source = maildir(tmp_path / "Maildir", {})
    (source / "cur").rmdir()
    (source / "cur").symlink_to(elsewhere / "cur")
    done = target(source)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"postroom: {source}/cur: a symbolic link, not followed" in done.stderr
    assert bodies(target.data_dir) == {}


def test_a_uid_given_twice_in_the_uidlist_loses_no_message(target, tmp_path):
    """Before: the second file with UID 7 counted as "already in" and was never imported."""
    source = maildir(tmp_path / "Maildir", {f"100{i}.host:2,S": f"Subject: m{i}\n\nbody {i}\n".encode()
                                            for i in range(1, 4)})
    (source / "dovecot-uidlist").write_text("3 V1234 N20\n7 :1001.host\n7 :1002.host\n8 :1003.host\n")
    done = target(source)
    assert done.returncode == 0, done.stderr
    assert "INBOX: 3 imported, 0 already in" in done.stdout, done.stdout
    got = bodies(target.data_dir)
    assert got[7] == b"Subject: m1\r\n\r\nbody 1\r\n" and got[8] == b"Subject: m3\r\n\r\nbody 3\r\n"
    assert b"Subject: m2\r\n\r\nbody 2\r\n" in got.values() and max(got) >= 20  # a new UID, above the source's


@pytest.mark.parametrize("uidlist", [
    "3 V1234 N4294967295\n5 :1001.host\n99999999999 :1002.host\n",  # UIDNEXT at the top, a UID past 32 bits
    "3 V1234 N20\n5 :1001.host\n4294967296 :1002.host\n",  # a UID past 32 bits
    "3 V1234\n5 :1001.host\n6 :1002.host\n",  # no UIDNEXT at all
])
def test_absurd_uids_in_the_uidlist_are_not_kept_and_new_mail_still_fits(target, tmp_path, uidlist):
    """Before: a struct.error traceback (a UID past 32 bits), or a mailbox whose UIDNEXT
    left no UID for new mail; without UIDNEXT, UIDs were numbered from 1 under the source's
    UIDVALIDITY (a client's cache would show another message under a UID it knows)."""
    source = maildir(tmp_path / "Maildir", {f"100{i}.host:2,S": f"Subject: m{i}\n\nbody {i}\n".encode()
                                            for i in range(1, 3)})
    (source / "dovecot-uidlist").write_text(uidlist)
    done = target(source)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "INBOX: 2 imported" in done.stdout, done.stdout
    with Store(open_data_dir(target.data_dir, 4)) as store:
        inbox = store.mailbox(USER, "INBOX")
        _, uids, _ = store.uids(USER, "INBOX")
        if inbox.id == 1234:  # the source's UIDVALIDITY: then its UIDs are its own and below 2**31
            assert "UIDNEXT" not in uidlist or "N20" in uidlist
            assert 5 in uids and all(uid < 2**31 for uid in uids)
        store.append(USER, "INBOX", b"Subject: new\r\n\r\nnew mail\r\n")
        _, after, _ = store.uids(USER, "INBOX")
    assert len(after) == 3 and max(after) < 2**31
    if "N20" not in uidlist:
        assert "not the source's 1234" in done.stdout, done.stdout
