"""The watchdog (postroom/watchdog.py): WATCHDOG=1 comes from the event loop and stops when
the loop stalls; `postroom serve` under postroom.service (run by tests/unit_runner.py as
systemd would, WatchdogSec=1s) pings its manager, and restarts a child that stops pinging
it; a serve that stops pinging is restarted by its manager; the unit's ExecReload reaches
every daemon."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import BIN, write_config_file
from procs import processes

from postroom.watchdog import keep_alive, take_interval

ROOT = Path(__file__).resolve().parent.parent
RUNNER = [sys.executable, str(ROOT / "tests/unit_runner.py")]
WAIT = 20.0  # seconds any one awaited event may take on a busy machine


# -- the process's side, in this process ---------------------------------------------------

def test_take_interval_reads_and_removes_the_variables():
    environ = {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    assert take_interval(environ) == 2.5
    assert environ == {"PATH": "/bin"}  # not passed on to children
    assert take_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert take_interval({"WATCHDOG_USEC": "0"}) is None
    assert take_interval({}) is None


def test_pings_come_from_the_loop_and_stop_while_it_stalls():
    """Pings every interval / 2 while the loop runs; none while a callback holds it. The
    manager's side is a thread here, stamping each datagram as it arrives."""
    pings: list[float] = []
    with tempfile.TemporaryDirectory(prefix="wd-") as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        path = os.path.join(tmp, "notify")
        manager.bind(path)
        manager.settimeout(0.05)
        done = threading.Event()

        def receive() -> None:
            while not done.is_set():
                try:
                    if manager.recv(64) == b"WATCHDOG=1":
                        pings.append(time.monotonic())
                except socket.timeout:
                    pass

        receiver = threading.Thread(target=receive)
        receiver.start()
        marks = {}

        async def run() -> None:
            stop = keep_alive(0.1)  # a ping now and every 0.05 s
            await asyncio.sleep(0.3)
            marks["stalled"] = time.monotonic()
            time.sleep(0.4)  # the stall: nothing on this loop runs
            marks["resumed"] = time.monotonic()
            await asyncio.sleep(0.3)
            stop()

        os.environ["NOTIFY_SOCKET"] = path
        try:
            asyncio.run(run())
        finally:
            del os.environ["NOTIFY_SOCKET"]
            done.set()
            receiver.join()
    before = [t for t in pings if t < marks["stalled"]]
    during = [t for t in pings if marks["stalled"] + 0.01 < t < marks["resumed"]]
    after = [t for t in pings if t >= marks["resumed"]]
    assert len(before) >= 4 and len(after) >= 4, (before, after)
    assert during == []


# -- postroom.service under the unit runner -------------------------------------------------

class Service:
    """postroom.service from systemd/, with a drop-in that points it at this test's config,
    run by tests/unit_runner.py."""

    def __init__(self, root: Path):
        self.root = root
        self.units = root / "units"
        self.state = root / "state"
        self.units.mkdir()
        for unit in (ROOT / "systemd").iterdir():
            (self.units / unit.name).write_text(unit.read_text())
        config = write_config_file(root / "postroom.toml", root / "var")
        dropin = self.units / "postroom.service.d"
        dropin.mkdir()
        # As root, not as the postroom user a test machine may not have; the rest as in the unit.
        (dropin / "test.conf").write_text(f"""[Service]
User=
Group=
StateDirectory=
ExecStartPre=
ExecStartPre={BIN}/postroom --config {config} config check
ExecStart=
ExecStart={BIN}/postroom --config {config} serve
WatchdogSec=1s
TimeoutAbortSec=1s
RestartSec=100ms
""")
        self.journal_path = self.state / "postroom.service" / "journal"

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*RUNNER, "--units-dir", str(self.units), "--state-dir", str(self.state), *args],
                              capture_output=True, text=True, timeout=60)

    def journal(self) -> str:
        return self.journal_path.read_text(errors="replace")

    def main_pid(self) -> int:
        pid = int((self.state / "postroom.service" / "MainPID").read_text())
        # 0 when the unit is not running: os.kill(0, ...) would signal this test's own group.
        assert pid > 0, f"postroom.service is not running:\n{self.journal()}"
        return pid

    def wait_for(self, pattern: str, after: int = 0) -> re.Match:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            found = re.compile(pattern, re.MULTILINE).search(self.journal(), after)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the journal within {WAIT}s:\n{self.journal()[after:]}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("units"))
    started = service.systemctl("start", "postroom")
    assert started.returncode == 0, started.stderr + service.journal()
    yield service
    stopped = service.systemctl("stop", "postroom")
    assert stopped.returncode == 0
    assert service.systemctl("is-active", "postroom").stdout.strip() == "inactive"


def child(parent: int, name: str) -> int:
    (pid,) = [pid for pid, p in processes().items() if p.parent == parent and p.name == name]
    return pid


def greets(port: int) -> bool:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
                return s.recv(64).startswith(b"* OK")
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_serve_restarts_a_child_that_stops_pinging(service):
    serve = service.main_pid()
    imapd = child(serve, "imapd")
    config = service.root / "postroom.toml"
    port = int(re.search(r'\[imap\]\nlisten = \["127.0.0.1:(\d+)"\]', config.read_text())[1])
    mark = len(service.journal())
    os.kill(imapd, signal.SIGSTOP)  # as a loop stuck in one command: no more WATCHDOG=1
    try:
        service.wait_for(rf"event=worker_watchdog worker=imapd worker_pid={imapd} silent=[\d.]+ timeout=1.0", mark)
        service.wait_for(rf"event=worker_restarted worker=imapd old_pid={imapd} code=-9 worker_pid=\d+", mark)
    finally:
        if imapd in processes():
            os.kill(imapd, signal.SIGCONT)
    assert greets(port)  # the new imapd serves, once it is ready
    assert child(serve, "imapd") != imapd
    assert service.main_pid() == serve  # serve itself kept pinging its manager: not restarted
    assert "Watchdog timeout" not in service.journal()[mark:]


def test_manager_restarts_a_serve_that_stops_pinging(service):
    serve = service.main_pid()
    mark = len(service.journal())
    os.kill(serve, signal.SIGSTOP)
    service.wait_for(r"postroom.service: Watchdog timeout \(limit 1s\)!", mark)
    started = service.wait_for(r"postroom.service: Started\.", mark)
    assert service.main_pid() != serve
    assert service.systemctl("is-active", "postroom").stdout.strip() == "active"
    assert "event=ready" in service.journal()[mark:started.start()]


def test_reload_through_the_unit_keeps_serve_and_reaches_every_daemon(service):
    """ExecReload=/bin/kill -HUP $MAINPID, as `systemctl reload postroom` runs it."""
    serve = service.main_pid()
    mark = len(service.journal())
    reloaded = service.systemctl("reload", "postroom")
    assert reloaded.returncode == 0, reloaded.stderr
    service.wait_for(r"event=reload.forwarded daemons=mtad,imapd,pop3d", mark)
    for daemon in ("mtad", "imapd", "pop3d"):
        service.wait_for(rf"event=reload.done daemon={daemon} ", mark)
    assert service.main_pid() == serve
    assert service.systemctl("is-active", "postroom").stdout.strip() == "active"
