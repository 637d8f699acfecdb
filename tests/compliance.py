"""IMAP conformance with a peer's suite: Dovecot's imaptest (MIT) and its scripted tests,
against a `postroom serve` of our own on free loopback ports. `make compliance` runs it.

    .venv/bin/python tests/compliance.py IMAPTEST_DIR [--keep]

IMAPTEST_DIR holds bin/imaptest and tests/ (../shared/peers/build-imaptest.sh makes them).
Prints imaptest's report of every failed group and its summary line. Exits 1 when a group
fails that tests/compliance-known-failures.txt does not list, when a listed group passes
(take it off the list: it only shrinks), or when the summary cannot be read.

imaptest silently passes a group whose `capabilities:` line names a capability the server
does not offer (it counts it as skipped), and one that needs a second user (`$user2`) when
none is given. The goal is that every group runs: the groups that could not run are printed
and fail the run, found both from the groups' own `capabilities:` lines against the
server's post-login CAPABILITY and from imaptest's count of skipped groups.
"""

from __future__ import annotations

import argparse
import imaplib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import LISTENERS, add_accounts, free_port, render_config, start_daemon  # noqa: E402

USER, PASSWORD = "imaptest@example.test", "imaptest password 1"
USER2 = "imaptest2@example.test"  # `$user2` of the groups with two users (urlauth2), same password
# Corrections to the peer's groups, applied to a copy, each printed when applied (and
# skipped once the group has the header line itself). urlauth2 FETCHes 1:2 from a mailbox
# to which it appends nothing (no `messages:` line, so imaptest appends 0): it cannot pass
# on any server, and never ran on Dovecot either, for want of a second user (`user2=`).
HEADER_FIXES = {"urlauth2": "messages: 2"}
MAILBOX = "imaptest"  # imaptest's test mailbox: the first user's is made by imaptest, the second's here
TIMEOUT = 600
KNOWN = Path(__file__).resolve().parent / "compliance-known-failures.txt"
_FAILED_GROUP = re.compile(r"^\*\*\* Test (\S+) ", re.MULTILINE)
_SUMMARY = re.compile(r"(\d+) test groups: (\d+) failed, (\d+) skipped due to missing capabilities")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imaptest_dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the server's directory (its log) afterwards")
    args = parser.parse_args()
    imaptest, tests = args.imaptest_dir / "bin/imaptest", args.imaptest_dir / "tests"
    if not imaptest.exists() or not tests.is_dir():
        print(f"compliance: no imaptest in {args.imaptest_dir} (make compliance builds it)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="postroom-compliance-"))
    tests = fixed_groups(tests, work / "tests")
    groups = required_capabilities(tests)
    data_dir = work / "var"
    sections: dict[str, dict] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir), "log_level": "info"},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
        "storage": {"shards": 4},
        "imap": {"plaintext_auth": True, "max_connections_per_ip": 200},
        "policy": {"enabled": False},
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    config = work / "postroom.toml"
    config.write_text(render_config(sections))
    add_accounts(config, PASSWORD, users=[USER, USER2], domains=["example.test"])
    daemon = start_daemon(config, work)
    try:
        port = daemon.listen("imap.listen").port
        offered = server_capabilities(port)
        prepare_second_user(port)
        run = subprocess.run([str(imaptest), "host=127.0.0.1", f"port={port}", f"user={USER}", f"user2={USER2}",
                              f"pass={PASSWORD}", f"test={tests}"], capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        daemon.stop()
    output = run.stdout + run.stderr
    (work / "imaptest.out").write_text(output)
    summary = _SUMMARY.search(output)
    failed_groups = [line for line in output.splitlines() if line.startswith("*** Test ")]
    print(output if summary is None else "\n".join(failed_groups + [summary.group(0)] +
                                                   [line for line in output.splitlines() if "base protocol" in line]))
    if args.keep:
        print(f"server directory kept: {work} (imaptest.out, serve.err)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if summary is None:
        print("compliance: imaptest printed no summary", file=sys.stderr)
        return 1
    unrun = not_run(groups, offered)
    for group, missing in unrun.items():
        print(f"compliance: group {group} did not run: the server does not offer {' '.join(missing)}",
              file=sys.stderr)
    skipped = int(summary.group(3))
    if skipped and not unrun:
        print(f"compliance: imaptest skipped {skipped} groups (a second user missing?)", file=sys.stderr)
    verdict = judge(set(_FAILED_GROUP.findall(output)), known_failures())
    return 1 if unrun or skipped else verdict


def server_capabilities(port: int) -> set[str]:
    """The post-login CAPABILITY, as imaptest sees it (upper case)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as client:
        client.login(USER, PASSWORD)
        status, data = client.capability()
        if status != "OK":
            raise RuntimeError(f"CAPABILITY answered {status}")
        return {word.upper() for word in data[0].decode("ascii").split()}


def fixed_groups(tests: Path, copy: Path) -> Path:
    """A copy of the groups with HEADER_FIXES applied."""
    shutil.copytree(tests, copy)
    for group, line in HEADER_FIXES.items():
        path = copy / group
        if not path.exists():
            continue
        text = path.read_text()
        key = line.split(":", 1)[0]
        header = text.split("\n\n", 1)[0]
        if not any(h.split(":", 1)[0].strip().lower() == key for h in header.splitlines()):
            path.write_text(line + "\n" + text)
            print(f"compliance: {group}: added `{line}` to its header (HEADER_FIXES)")
    return copy


def prepare_second_user(port: int) -> None:
    """The second user's mailbox of the test's name: imaptest SELECTs it with every client
    and creates it with the first only (test-exec.c)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as client:
        client.login(USER2, PASSWORD)
        status, data = client.create(MAILBOX)
        if status != "OK":
            raise RuntimeError(f"CREATE {MAILBOX} for {USER2} answered {status} {data}")


def required_capabilities(tests: Path) -> dict[str, list[str]]:
    """Each group's `capabilities:` line (its header, before the first blank line)."""
    groups = {}
    for path in sorted(tests.iterdir()):
        if path.suffix == ".mbox" or not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            if key.strip().lower() == "capabilities":
                groups[path.name] = value.split()
        groups.setdefault(path.name, [])
    return groups


def not_run(groups: dict[str, list[str]], offered: set[str]) -> dict[str, list[str]]:
    """The groups imaptest skips, with the capabilities they want and the server lacks."""
    unrun = {}
    for group, wanted in groups.items():
        missing = [cap for cap in wanted if cap.upper() not in offered]
        if missing:
            unrun[group] = missing
    return unrun


def known_failures() -> set[str]:
    lines = (line.split("#", 1)[0].split() for line in KNOWN.read_text().splitlines())
    return {words[0] for words in lines if words}


def judge(failed: set[str], known: set[str]) -> int:
    new, fixed = sorted(failed - known), sorted(known - failed)
    if new:
        print(f"compliance: groups failing that did not before: {', '.join(new)}", file=sys.stderr)
    if fixed:
        print(f"compliance: groups passing now: {', '.join(fixed)}: take them off {KNOWN.name}", file=sys.stderr)
    if not new and not fixed:
        print(f"compliance: no new failure; {len(failed)} known ({KNOWN.name}, issue 15)")
    return 1 if new or fixed else 0


if __name__ == "__main__":
    sys.exit(main())
