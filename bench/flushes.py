"""Flushes per delivered message, counted: `bench/flushes.py [-m 300] [-c 1]`.

Starts a throwaway `postroom serve` (bench/policy_chain.py's: `[smtp] workers = 2`, chain
off), attaches strace to every process of it, sends M messages of 5,000 bytes with Postfix's
smtp-source at concurrency C (a new connection per message), and prints, per message, the
calls that flush: fsync, fdatasync, syncfs, msync, and the writes LMDB makes through its
O_DSYNC file descriptor for the meta page (counted as the pwrite64 calls into the first two
pages of an index.lmdb/data.mdb through a descriptor opened with O_DSYNC: each is a flush
too; since the write-ahead log, storage/wal.py, LMDB writes its meta page through its plain
descriptor, which is no flush). Issue 17's first item, "one flush
per commit on the critical path", shows here: at C=1 a commit holds one message.

strace slows every call down, so the rate it prints is not a throughput figure: see
bench/smtp_in.py --compare-postfix for those.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_chain import RECIPIENT, SENDER, start_server  # noqa: E402

FLUSHES = ("fsync", "fdatasync", "syncfs", "msync")
_META_WRITE = re.compile(r"pwrite64\((\d+)<[^>]*index\.lmdb/data\.mdb>, .*, \d+, (\d+)\) = \d+$")
O_DSYNC = 0o10000
_TARGET = re.compile(r"^\S*\s*\w+\(\d+<[^>]*/([^/>]+)>")
_CALL = re.compile(r"^\s*(?:\[pid\s+\d+\]\s+)?(?:\d+\s+)?(\w+)\(")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return found


def _dsync(tid: str, fd: str, known: dict = {}) -> bool:  # noqa: B006 - a cache across calls
    """Whether thread `tid`'s descriptor `fd` was opened with O_DSYNC (while it still runs)."""
    if (tid, fd) not in known:
        try:
            flags = next(line for line in Path(f"/proc/{tid}/fdinfo/{fd}").read_text().splitlines()
                         if line.startswith("flags:"))
            known[tid, fd] = bool(int(flags.split()[1], 8) & O_DSYNC)
        except (OSError, StopIteration):
            known[tid, fd] = True  # gone: counted, as before
    return known[tid, fd]


def count(trace: Path) -> dict[str, int]:
    counts = dict.fromkeys((*FLUSHES, "lmdb meta write"), 0)
    for name in os.listdir(trace):
        with open(trace / name, errors="replace") as f:
            for line in f:
                call = _CALL.match(line)
                if call and call.group(1) in FLUSHES:
                    counts[call.group(1)] += 1
                    target = _TARGET.search(line)
                    if call.group(1) == "fdatasync" and target:
                        what = {"wal.log": "  of the log", "data.mdb": "  of LMDB's pages"}.get(target.group(1))
                        if what:
                            counts[what] = counts.get(what, 0) + 1
                elif "pwrite64(" in line:
                    meta = _META_WRITE.search(line.rstrip())
                    # LMDB's two meta pages, through a descriptor that flushes each write
                    if meta and int(meta.group(2)) < 2 * 4096 and _dsync(name.rsplit(".", 1)[-1], meta.group(1)):
                        counts["lmdb meta write"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--messages", type=int, default=300)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("strace") is None or shutil.which("smtp-source") is None:
        raise SystemExit("needs strace and Postfix's smtp-source: `make bench-peers` installs them")
    work = Path(tempfile.mkdtemp(prefix="flushes-"))
    process = None
    tracer = None
    try:
        (work / "server").mkdir()
        process, port = start_server(work / "server", 2, None)
        warm = ["smtp-source", "-m", "50", "-l", "5000", "-s", "5", "-f", SENDER, "-t", RECIPIENT,
                "-M", "bench.example.org", f"127.0.0.1:{port}"]
        subprocess.run(warm, check=True, capture_output=True, timeout=120)
        time.sleep(2)  # the warm-up's checkpoints done
        trace = work / "trace"
        trace.mkdir()
        pids = descendants(process.pid)
        tracer = subprocess.Popen(["strace", "-f", "-y", "-ff", "-o", str(trace / "t"),
                                   "-e", "trace=fsync,fdatasync,syncfs,msync,pwrite64",
                                   *[a for pid in pids for a in ("-p", str(pid))]],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached
        started = time.monotonic()
        subprocess.run([*warm[:2], str(args.messages), "-l", "5000", "-s", str(args.concurrency), *warm[7:]],
                       check=True, capture_output=True, timeout=600)
        elapsed = time.monotonic() - started
        time.sleep(2.5)  # the checkpoints that follow belong to these messages too
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        tracer = None
        counts = count(trace)
    finally:
        if tracer is not None:
            tracer.kill()
        if process is not None:
            process.terminate()
            process.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    total = sum(n for name, n in counts.items() if not name.startswith(" "))
    print(f"{args.messages} messages at C={args.concurrency} in {elapsed:.1f} s (under strace)")
    for name, n in counts.items():
        print(f"  {name:16} {n:6}  {n / args.messages:.2f} per message")
    print(f"  {'all flushes':16} {total:6}  {total / args.messages:.2f} per message")


if __name__ == "__main__":
    main()
