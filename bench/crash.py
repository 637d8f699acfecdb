"""The long crash test: N messages (40,000 by default) from C senders that resend whatever
was not answered 250 (same Message-ID), while `postroom serve` is killed every 1-2 s; then
every mailbox counted (tests/crashload.py, which the suite's short run uses too).

    .venv/bin/python bench/crash.py [-n 40000] [-c 20] [--how kill|term|group|mixed] [--keep DIR] [--writer]

--how kill: SIGKILL to serve alone (its children must die with it); term: SIGTERM; group:
SIGKILL to the whole process group with `[smtp] workers = 2`; mixed: the three in turn, a
third of the messages each. --writer: `[smtp] writer = true`, the writer process (mtad/writer.py)
dying with the rest. Prints the counts; exits 1 if anything was lost, stored twice or left
unclean. Works in a fresh data dir under /tmp (removed unless --keep).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crashload import Phase, prepare, run  # noqa: E402
from ports import free_port  # noqa: E402 - bench/, beside this script

LISTENERS = ("submission.listen", "submission.listen_tls", "imap.listen", "imap.listen_tls", "pop3.listen",
             "pop3.listen_tls")



def write_config(path: Path, data_dir: Path, smtp_port: int, workers: int, writer: bool = False) -> Path:
    sections = {
        "server": ['hostname = "mail.crash.test"', f'data_dir = "{data_dir}"', 'log_level = "warning"'],
        "tls": [f'cert = "{data_dir}/tls/cert.pem"', f'key = "{data_dir}/tls/key.pem"', "self_signed = true"],
        "storage": ["shards = 4"],
        "smtp": [f'listen = ["127.0.0.1:{smtp_port}"]', "max_connections_per_ip = 500", f"workers = {workers}",
                 f"writer = {'true' if writer else 'false'}"],
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, []).append(f'{key} = ["127.0.0.1:{free_port()}"]')
    path.write_text("".join(f"[{name}]\n" + "\n".join(lines) + "\n\n" for name, lines in sections.items()))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=40_000)
    parser.add_argument("-c", "--clients", type=int, default=20)
    parser.add_argument("--how", choices=("kill", "term", "group", "mixed"), default="kill")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--writer", action="store_true", help="[smtp] writer = true (mtad/writer.py)")
    args = parser.parse_args()

    workdir = args.keep or Path(tempfile.mkdtemp(prefix="postroom-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "var"
    port = free_port()
    configs = {w: write_config(workdir / f"crash-{w}.toml", data_dir, port, w, args.writer) for w in (1, 2)}
    prepare(data_dir, configs[1])
    forever = 10**9  # phases end when the messages are all sent
    if args.how == "mixed":
        third = args.messages // 3
        phases = [Phase("kill", forever), Phase("term", forever), Phase("group", forever, workers=2)]
        budgets = [third, 2 * third, args.messages]
    else:
        phases = [Phase(args.how, forever, workers=2 if args.how == "group" else 1)]
        budgets = [args.messages]
    started = time.monotonic()
    outcome = run(configs, phases, workdir, host="127.0.0.1", port=port, clients=args.clients,
                  total=args.messages, budgets=budgets, drain_seconds=120,
                  say=lambda text: print(f"[{time.monotonic() - started:6.0f} s] {text}", flush=True))
    elapsed = time.monotonic() - started
    print(f"{args.how}: {outcome.summary()}; {elapsed:.0f} s")
    for name in ("lost", "duplicated_acknowledged", "duplicated", "refused", "orphans", "check_problems"):
        items = getattr(outcome, name)
        if items:
            print(f"  {name}: {items[:20]}{' ...' if len(items) > 20 else ''}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = (outcome.lost or outcome.duplicated_acknowledged or outcome.duplicated or outcome.refused
           or outcome.orphans or outcome.check_problems or outcome.unfinished)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
