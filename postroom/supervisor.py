"""Daemons as child processes: `postroom serve` runs mtad, imapd and pop3d so, each in its
own process, and mtad its extra MX workers ([smtp] workers). A stall in one (a CPU-heavy
IMAP command) then never delays another.

Both sides of the contract between a supervisor and its children live here:
- A child is started in one of two ways. `fork`, before the supervisor's event loop runs
  and once it has imported the daemons' code (`postroom serve` at start): the child has it
  all loaded, and a start costs what one process costs, not one import per child. `start`
  at any time: this interpreter run with -P (`command`), for restarts and mtad's workers.
  -P: sys.path never holds the current directory, which `python -m` would put first
  (started in /etc, /etc/postroom would shadow the postroom package); a forked child has
  its supervisor's sys.path, which a console script starts without it.
- Its environment names the supervisor (SUPERVISOR_ENV, its pid) and gives it the
  supervisor's sd_notify socket as NOTIFY_SOCKET: a child says READY=1 once its listeners
  are bound exactly as it would to systemd (postroom/notify.py), and before exiting on a
  start failure it says STATUS=<one line>, which the supervisor reports. The supervisor
  knows each sender by its pid (SO_PASSCRED), so no stray datagram counts.
- The child's first act (`become_child`) asks the kernel for SIGTERM when its parent dies
  (prctl PR_SET_PDEATHSIG), then checks that its parent is still the supervisor, which may
  have died before the prctl: children never outlive the supervisor, even after SIGKILL.
  SIGTERM, not SIGKILL: an orphan still finishes the deliveries it has begun (a graceful
  stop, bounded by [server] stop_grace) and closes its listeners at once.
- A child that dies after start-up is started again RESTART_DELAY later. One that died more
  than RESTARTS times within RESTART_WINDOW is in a crash loop: it is still started again,
  each time twice as late, up to MAX_RESTART_DELAY, with an error in the log each time. Never
  left down: serve would look healthy to systemd while port 25 refused every connection
  (found by an attack that killed mtad six times in a minute).
- `stop` sends SIGTERM to every child and waits for them ([server] stop_grace plus
  STOP_MARGIN); one still there then is killed.

Children are spawned from the main thread only: PR_SET_PDEATHSIG fires when the thread
that forked the child ends, not the process.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from conf.logfmt import EventLogger
from postroom.watchdog import ChildWatchdog

SUPERVISOR_ENV = "POSTROOM_SUPERVISOR"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
RESTARTS = 5  # restarts of one child within RESTART_WINDOW before the next ones back off
RESTART_WINDOW = 60.0
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
STOP_MARGIN = 5.0  # seconds beyond stop_grace before a child that has not stopped is killed
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def command(config_path: Path | None, *args: str) -> list[str]:
    """How a child is started: `postroom --config FILE ARGS` on this interpreter, -P."""
    config = ["--config", os.path.abspath(config_path)] if config_path is not None else []
    return [sys.executable, "-P", "-m", "postroom", *config, *args]


@dataclass(eq=False)
class Child:
    name: str
    argv: list[str]  # how it is started again
    pid: int = 0
    process: subprocess.Popen | None = None  # when started by `start`
    # Resolves to None once the child said READY=1, or to its exit status if it died first.
    ready: asyncio.Future | None = None
    status: str = ""  # the last STATUS= it sent
    restarts: list[float] = field(default_factory=list)
    running: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def failure(self) -> str:
        """Why it did not start, in one line."""
        code = self.ready.result() if self.ready is not None and self.ready.done() else None
        return self.status or f"{self.name} exited with status {code} before it was ready"


class Supervisor:
    """Children, their readiness, their restarts. Made before the event loop runs (to
    `fork`) or in it; `attach` once in the loop, before anything else. `watchdog`: the
    WATCHDOG_USEC each child gets, in seconds (postroom/watchdog.py); None: not watched."""

    def __init__(self, log: EventLogger, watchdog: float | None = None):
        self.log = log
        self.watchdog = ChildWatchdog(log, watchdog)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.children: list[Child] = []
        self.stopping = False
        # Called with the pid of each child that ended (postroom/metrics.py marks it dead).
        self.on_exit: Callable[[int], None] | None = None
        self._started = False  # past start-up: a death means a restart, not a failure
        self._by_pid: dict[int, Child] = {}
        name = f"postroom-{os.getpid()}-{secrets.token_hex(6)}"
        self._notify_address = "@" + name  # the abstract namespace: nothing to clean up
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind("\0" + name)

    def fork(self, name: str, argv: list[str], run: Callable[[], int], close: tuple[int, ...] = ()) -> Child:
        """A child that runs `run()` in a copy of this process and exits with its status;
        `argv` starts it again if it dies. Only before the event loop runs, in a process
        without threads: a forked child must not inherit a loop or a lock held by a thread."""
        assert self.loop is None and asyncio._get_running_loop() is None, "fork before the event loop runs"
        assert threading.active_count() == 1, "fork in a process without threads"
        environment = self._child_environment()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self._socket.close()
                for fd in close:
                    os.close(fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.close(devnull)
                os.environ.update(environment)
                code = run()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child = Child(name, argv, pid=pid, running=True)
        self.children.append(child)
        self._by_pid[pid] = child
        return child

    def attach(self) -> None:
        """In the event loop: hear the children's notifications and their exits."""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self._socket.fileno(), self._read_notifications)
        for child in self.children:
            child.ready = self.loop.create_future()
            self._watch(child)
        self.watchdog.attach(self.loop, lambda: self.children)
        self._read_notifications()  # what forked children said before the loop ran

    def start(self, name: str, argv: list[str]) -> Child:
        """A child started as `argv` (see `command`), in the event loop."""
        child = Child(name, argv)
        self.children.append(child)
        self._spawn(child)
        return child

    async def wait_ready(self, timeout: float | None = None) -> Child | None:
        """Until every child said READY=1: None; or the first that died before (see
        Child.failure). From then on a child that dies is restarted."""
        pending = {child.ready: child for child in self.children}
        deadline = None if timeout is None else self.loop.time() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - self.loop.time())
            done, _ = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                child = next(iter(pending.values()))
                child.status = child.status or f"{child.name} did not start within {timeout:.0f}s"
                return child
            for future in done:
                child = pending.pop(future)
                if future.result() is not None:
                    return child
        self._started = True
        return None

    async def stop(self, grace: float, kill_after: float | None = None) -> None:
        """SIGTERM to every child; SIGKILL to those still there after grace + STOP_MARGIN,
        or after `kill_after` seconds when given (what is left of a stop's own budget)."""
        self.stopping = True
        self.watchdog.stop()
        live = [c for c in self.children if c.running]
        for child in live:
            os.kill(child.pid, signal.SIGTERM)
        if live:
            _, late = await asyncio.wait([asyncio.ensure_future(c.gone.wait()) for c in live],
                                         timeout=grace + STOP_MARGIN if kill_after is None else kill_after)
            for task in late:
                task.cancel()
            for child in live:
                if child.running:
                    self.log.warning("worker_killed", worker=child.name, worker_pid=child.pid)
                    os.kill(child.pid, signal.SIGKILL)
            await asyncio.wait([asyncio.ensure_future(c.gone.wait()) for c in live], timeout=STOP_MARGIN)
        self.loop.remove_reader(self._socket.fileno())
        self._socket.close()

    # -- children -------------------------------------------------------------------------

    def _child_environment(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self._notify_address, SUPERVISOR_ENV: str(os.getpid()), **self.watchdog.environment()}

    def _spawn(self, child: Child) -> None:
        env = {**os.environ, **self._child_environment()}
        child.process = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL)
        child.pid, child.status, child.running = child.process.pid, "", True
        child.ready = self.loop.create_future()
        self._by_pid[child.pid] = child
        self._watch(child)

    def _watch(self, child: Child) -> None:
        child.gone.clear()
        # A pidfd is readable once the process has exited: no SIGCHLD handler, no thread.
        pidfd = os.pidfd_open(child.pid)
        self.loop.add_reader(pidfd, self._exited, child, child.pid, pidfd)

    def _exited(self, child: Child, pid: int, pidfd: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        # It has exited: this only reaps it.
        code = child.process.wait() if child.process is not None else os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        self._read_notifications()  # a STATUS= sent just before the exit
        del self._by_pid[pid]
        child.running = False
        if self.on_exit is not None:
            self.on_exit(pid)
        died_starting = not child.ready.done()
        if died_starting:
            child.ready.set_result(code)
        child.gone.set()
        if self.stopping and code not in (0, -signal.SIGKILL):  # SIGKILL: worker_killed said it
            # It did not end as a stop ends it (a signal after its loop, a failure on the way
            # out): what it held may not have been closed cleanly.
            self.log.warning("worker_stopped_abnormally", worker=child.name, worker_pid=pid, code=code)
        if self.stopping or not self._started:
            return
        if died_starting:  # at start-up wait_ready reports it; now the log is the only place
            self.log.error("worker_start_failed", worker=child.name, worker_pid=pid, code=code, reason=child.status)
        now = self.loop.time()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW]
        delay = RESTART_DELAY
        if len(child.restarts) >= RESTARTS:
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (len(child.restarts) - RESTARTS + 1))
            self.log.error("worker_crash_loop", worker=child.name, worker_pid=pid, code=code,
                           restarts=len(child.restarts), retry_in=delay)
        child.restarts.append(now)
        self.loop.call_later(delay, self._restart, child, pid, code)

    def _restart(self, child: Child, old_pid: int, code: int) -> None:
        if self.stopping:
            return
        self._spawn(child)
        self.log.warning("worker_restarted", worker=child.name, old_pid=old_pid, code=code, worker_pid=child.pid)

    def _read_notifications(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._socket.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # closed
            pid = next((_UCRED.unpack(cdata[:_UCRED.size])[0] for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            child = self._by_pid.get(pid)
            if child is None:
                continue  # not one of ours
            for line in data.decode("utf-8", "replace").splitlines():
                self.watchdog.heard(child, line)
                if line == "READY=1" and not child.ready.done():
                    child.ready.set_result(None)
                elif line.startswith("STATUS="):
                    child.status = line[len("STATUS="):]


def stop_on_signal() -> asyncio.Event:
    """Set when SIGTERM (systemd, the supervisor, the supervisor's death) or SIGINT (Ctrl-C) arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def first_of(work: Awaitable, stop: asyncio.Event):
    """`work`'s result, or None when `stop` is set first (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


# -- the child's side -----------------------------------------------------------------------

def supervised() -> bool:
    """Whether a supervisor started this process (rather than systemd or a person)."""
    return SUPERVISOR_ENV in os.environ


def become_child() -> None:
    """Die with the supervisor: SIGTERM when it ends, however it ends. Called once the
    process has its final credentials (a change of user clears the request). Exits at once
    if the supervisor is already gone."""
    parent = os.environ.pop(SUPERVISOR_ENV, None)  # our own children get theirs from us
    if parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The supervisor may have died between our start and the prctl: its SIGTERM was never
    # asked for, and our parent is now some reaper.
    if os.getppid() != int(parent):
        raise SystemExit(1)
