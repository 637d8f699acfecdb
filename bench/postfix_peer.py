"""A throwaway Debian Postfix on loopback, for the benchmarks that measure against it.

`start_postfix(work, main_cf)`: its own config directory, queue and data directory under
`work` (nothing of /etc/postfix is read but master.cf, copied with its port 25 listener
replaced by a loopback high port), started with `postfix -c DIR start`; `stop_postfix`
stops that instance only (its master's pid, from its own queue directory) and waits until it
has gone. bench/smtp_out.py relays through one; bench/compare_postfix.py makes one an MX
delivering into a virtual Maildir.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from ports import free_port, wait_for_port

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def postfix_available() -> bool:
    return shutil.which("postfix") is not None


def start_postfix(work: Path, main_cf: str, *, master_cf: str = "",
                  wrapper: list[str] = ()) -> tuple[Path, int]:
    """A private Postfix instance whose main.cf is the common part below plus `main_cf`,
    its master.cf Debian's plus `master_cf`, started through the command prefix `wrapper`
    (bench/postfix_checks.py: a mount namespace); (its config directory, its SMTP port)."""
    directory = work / "postfix"
    work.chmod(0o755)  # mkdtemp makes it 0700: Postfix's daemons run as the postfix user
    for sub in ("etc", "queue", "data"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    shutil.chown(directory / "data", "postfix", "postfix")  # the master's lock and caches (it runs as postfix)
    port = free_port()
    etc = directory / "etc"
    (etc / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {directory / 'queue'}
data_directory = {directory / 'data'}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file_prefixes = {directory}
maillog_file = {directory / 'postfix.log'}
default_process_limit = 100
""" + main_cf)
    # Debian's master.cf, but for its port 25 listener: ours listens on `port` (no chroot:
    # the chroot would need copies of /etc files in the queue directory).
    master = Path("/etc/postfix/master.cf").read_text()
    master, found = re.subn(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{port} inet n - n - - smtpd", master)
    if not found:
        master += f"127.0.0.1:{port} inet n - n - - smtpd\n"
    (etc / "master.cf").write_text(master + master_cf)
    subprocess.run(["postfix", "-c", str(etc), "check"], check=False)
    subprocess.run([*wrapper, "postfix", "-c", str(etc), "start"], check=True)
    try:
        wait_for_port(port, None, READY_TIMEOUT)
    except BaseException:
        stop_postfix(etc)  # started, but not listening: not left running
        raise
    return etc, port


def stop_postfix(etc: Path) -> None:
    """Stop the instance configured in `etc` and wait (bounded) until its master is gone."""
    pid_file = etc.parent / "queue" / "pid" / "master.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    subprocess.run(["postfix", "-c", str(etc), "stop"], check=False, capture_output=True)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
