"""The service manager's watchdog (sd_watchdog_enabled(3), sd_notify(3) WATCHDOG=1), both sides.

The watched process's side (`take_interval`, `keep_alive`): when its manager sets
WATCHDOG_USEC (systemd under `WatchdogSec=`, or `postroom serve` for its children), the
process's event loop sends WATCHDOG=1 every half of it, as sd_watchdog_enabled(3) advises.
The ping is a callback of the loop itself, never a thread: a loop stalled by a runaway
command or a hung system call stops pinging, and the manager kills and restarts the process.
systemd's kill is SIGABRT (WatchdogSignal=): faulthandler then writes every thread's stack to
stderr (the journal), so the log says where the loop was stuck.

The manager's side (`ChildWatchdog`): under postroom.service systemd sees only `postroom
serve`, whose loop stays alive when a child's stalls. So serve does for its children what
systemd does for it: each child gets serve's own WATCHDOG_USEC, and one that said READY=1
and then stays silent longer than that is sent SIGABRT, then SIGKILL ABORT_GRACE later if
it is still there; the supervisor's restart (postroom/supervisor.py) does the rest. mtad
watches its extra SMTP workers the same way. As with systemd, the watch starts at READY=1:
before it, the start timeout applies. Without WATCHDOG_USEC (serve run by hand, a unit
without WatchdogSec=) nothing is watched; `WATCHDOG_USEC=30000000 postroom serve` turns the
children's watch on outside systemd.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
from collections.abc import Callable, Iterable
from typing import Protocol

from conf.logfmt import EventLogger
from postroom.notify import notify

MAX_ABORT_GRACE = 5.0  # seconds from SIGABRT (stacks dumped) to SIGKILL, at most
CHECKS_PER_INTERVAL = 4  # a silent child is found at most interval / 4 late


def take_interval(environ: os._Environ | dict[str, str] = os.environ) -> float | None:
    """The watchdog timeout the manager asked of this process, in seconds, or None. The
    variables are removed (sd_watchdog_enabled's unset_environment): they are this process's,
    not its children's, which get theirs from it. WATCHDOG_PID, when set, names the process
    meant; another one's (a parent's that leaked) is ignored."""
    usec = environ.pop("WATCHDOG_USEC", "")
    pid = environ.pop("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def keep_alive(interval: float | None) -> Callable[[], None]:
    """In the event loop: WATCHDOG=1 now and every interval / 2 from this loop's callbacks.
    Returns what stops it. With no interval, nothing is sent."""
    if interval is None:
        return lambda: None
    faulthandler.enable()  # SIGABRT from the manager: the stuck stack goes to the log
    loop = asyncio.get_running_loop()
    handle: asyncio.TimerHandle | None = None

    def ping() -> None:
        nonlocal handle
        notify("WATCHDOG=1", drop_when_full=True)
        handle = loop.call_later(interval / 2, ping)

    def stop() -> None:
        if handle is not None:
            handle.cancel()

    ping()
    return stop


class Watched(Protocol):
    """What ChildWatchdog needs of a supervisor's child (postroom.supervisor.Child)."""
    name: str
    pid: int
    running: bool


class ChildWatchdog:
    """A supervisor's watch over its children's WATCHDOG=1 (see the module's docstring)."""

    def __init__(self, log: EventLogger, interval: float | None):
        self.log = log
        self.interval = interval
        self._heard: dict[int, float] = {}  # pid -> when it last said READY=1 or WATCHDOG=1
        self._aborted: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._children: Callable[[], Iterable[Watched]] = lambda: ()

    def environment(self) -> dict[str, str]:
        """What a child's environment carries so that it pings (no WATCHDOG_PID: the pid is
        not known before the child exists, and the variable is optional)."""
        return {"WATCHDOG_USEC": str(round(self.interval * 1_000_000))} if self.interval else {}

    def attach(self, loop: asyncio.AbstractEventLoop, children: Callable[[], Iterable[Watched]]) -> None:
        self._loop, self._children = loop, children
        if self.interval:
            self._timer = loop.call_later(self.interval / CHECKS_PER_INTERVAL, self._check)

    def heard(self, child: Watched, line: str) -> None:
        """One line of a child's notification."""
        if self._loop is None or not self.interval:
            return
        if line in ("READY=1", "WATCHDOG=1"):
            self._heard[child.pid] = self._loop.time()
        elif line == "WATCHDOG=trigger":  # sd_notify(3): the child asks to be treated as timed out
            self._heard[child.pid] = float("-inf")

    def stop(self) -> None:
        """Stopping: children busy finishing their sessions are not stalled ones."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        running = {child.pid: child for child in self._children() if child.running}
        self._heard = {pid: t for pid, t in self._heard.items() if pid in running}
        self._aborted &= running.keys()
        for pid, last in self._heard.items():
            if now - last > self.interval and pid not in self._aborted:
                child = running[pid]
                silent = "trigger" if last == float("-inf") else round(now - last, 1)
                self.log.error("worker_watchdog", worker=child.name, worker_pid=pid, silent=silent,
                               timeout=self.interval)
                self._aborted.add(pid)
                os.kill(pid, signal.SIGABRT)
                self._loop.call_later(min(MAX_ABORT_GRACE, self.interval), self._kill, child, pid)
        self._timer = self._loop.call_later(self.interval / CHECKS_PER_INTERVAL, self._check)

    def _kill(self, child: Watched, pid: int) -> None:
        # The supervisor reaps its children in this loop: while `running` holds for this pid,
        # the pid is still that child's and cannot have been reused.
        if child.running and child.pid == pid:
            self.log.warning("worker_killed", worker=child.name, worker_pid=pid, reason="watchdog")
            os.kill(pid, signal.SIGKILL)
