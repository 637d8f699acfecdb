"""Run a systemd service unit the way systemd would, on a machine where systemd is not PID 1
(a container, this test machine): `systemctl` and `journalctl` for the install check.

    python tests/unit_runner.py [--units-dir DIR] [--state-dir DIR] COMMAND [UNIT...]

COMMAND is one of systemctl's: daemon-reload, enable [--now], disable, start, stop, restart,
reload, is-active, status; or `journalctl -u UNIT [-n N]`. Unit files are read from
--units-dir (default /etc/systemd/system, where `make install-system` puts them), with their
drop-ins (UNIT.d/*.conf; an empty assignment resets a list, as in systemd). So a doc's
`systemctl enable --now postroom` runs here as `python tests/unit_runner.py enable --now
postroom`, and a test changes a unit with a drop-in as a sysadmin would (`systemctl edit`).

What `start` does, as systemd does for a service (systemd.service(5), systemd.exec(5)):
- a manager process of its own per unit (detached; its pid in STATE/UNIT/manager.pid) runs
  ExecStartPre= (each must exit 0; `-` ignores a failure, `+` runs it as root), then
  ExecStart= as the main process: in a session of its own (the cgroup's stand-in: KillMode=
  acts on its process group), with User=/Group= and their groups, AmbientCapabilities=,
  CapabilityBoundingSet= and NoNewPrivileges= (through util-linux's setpriv), UMask=,
  LimitNOFILE=, StateDirectory= (created, owned by User=, StateDirectoryMode=),
  WorkingDirectory= (default /), stdin /dev/null, stdout and stderr to the unit's journal
  (STATE/UNIT/journal), and an environment of PATH, LANG, HOME, USER, LOGNAME, SHELL,
  INVOCATION_ID, NOTIFY_SOCKET, and with WatchdogSec= WATCHDOG_USEC and WATCHDOG_PID;
- Type=notify: the unit is active at READY=1 (before TimeoutStartSec=), from the main pid
  only (NotifyAccess=main, checked with SO_PASSCRED); STATUS= is kept for `status`;
- WatchdogSec=: from READY=1 on, a WATCHDOG=1 at least every WatchdogSec, or the main
  process gets SIGABRT ("Watchdog timeout"), SIGKILL TimeoutAbortSec= (default:
  TimeoutStopSec=) later, and counts as a failure;
- Restart=: on-failure, on-abnormal, on-watchdog, always (RestartSec= later), within
  StartLimitBurst= starts per StartLimitIntervalSec= (5 in 10 s), then failed;
- stop: KillSignal= (SIGTERM) to the main process (KillMode=mixed) or the group
  (control-group), SIGKILL to what is left of the group after TimeoutStopSec=;
- reload: ExecReload= with $MAINPID, as User= (a control process), waited for.

Not applied (they need a service manager's namespaces or seccomp; `systemd-analyze verify`
and `security --offline=true` check them in tests/test_units.py instead): ProtectSystem=,
ReadWritePaths=, ProtectHome=, PrivateTmp=, PrivateDevices=, the Protect*/Restrict* family,
SystemCallFilter=, MemoryDenyWriteExecute=. The journal says so at each start.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import resource
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

UNITS_DIR = Path("/etc/systemd/system")
STATE_DIR = Path("/run/unit_runner")
_UCRED = struct.Struct("3i")
NOT_APPLIED = ("ProtectSystem", "ReadWritePaths", "ProtectHome", "PrivateTmp", "PrivateDevices",
               "SystemCallFilter", "MemoryDenyWriteExecute", "RestrictAddressFamilies")
LISTS = {"ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost", "Environment",
         "ReadWritePaths", "SystemCallFilter", "AmbientCapabilities", "CapabilityBoundingSet", "StateDirectory",
         "Wants", "Requires", "After", "Before", "WantedBy", "Conflicts", "PartOf", "SupplementaryGroups"}


# -- unit files ---------------------------------------------------------------------------

def seconds(text: str, default: float) -> float:
    """systemd.time(7) spans as units use them: "30s", "5min", "1min 30s", "500ms", bare seconds."""
    text = text.strip()
    if not text:
        return default
    if text == "infinity":
        return float("inf")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, suffix in re.findall(r"([\d.]+)\s*([a-z]*)", text):
        total += float(number) * scale[suffix]
    return total


@dataclass
class Unit:
    name: str
    sections: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, units_dir: Path, name: str) -> Unit:
        if "." not in name:
            name += ".service"
        path = units_dir / name
        if not path.exists():
            raise SystemExit(f"Unit {name} not found.")
        unit = cls(name)
        unit._read(path.read_text())
        for dropin in sorted((units_dir / f"{name}.d").glob("*.conf")):
            unit._read(dropin.read_text())
        return unit

    def _read(self, text: str) -> None:
        section = ""
        for raw in text.replace("\\\n", " ").splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                self.sections.setdefault(section, {})
                continue
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            values = self.sections.setdefault(section, {}).setdefault(key, [])
            if not value:
                values.clear()  # an empty assignment resets the list
            elif key in LISTS:
                values.append(value)
            else:
                values[:] = [value]

    def get(self, key: str, default: str = "", section: str = "Service") -> str:
        values = self.sections.get(section, {}).get(key, [])
        return values[-1] if values else default

    def all(self, key: str, section: str = "Service") -> list[str]:
        return list(self.sections.get(section, {}).get(key, []))

    def words(self, key: str, section: str = "Service") -> list[str]:
        return [word for value in self.all(key, section) for word in value.split()]


# -- the manager ----------------------------------------------------------------------------

class Processes:
    """How the unit's commands run (the main process and control processes alike), and the
    unit's journal."""

    def __init__(self, unit: Unit, state: Path, main_pid: int = 0):
        self.unit = unit
        self.state = state
        self.journal = open(state / "journal", "ab", buffering=0)
        self.main_pid = main_pid

    def log(self, message: str) -> None:
        stamp = time.strftime("%b %d %H:%M:%S")
        self.journal.write(f"{stamp} unit_runner[{os.getpid()}]: {self.unit.name}: {message}\n".encode())

    def _user(self) -> tuple[pwd.struct_passwd | None, int | None]:
        user = self.unit.get("User")
        group = self.unit.get("Group")
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (entry.pw_gid if entry else None)
        return entry, gid

    def _argv(self, command: str, privileged: bool) -> list[str]:
        """The command line behind setpriv, which applies User=, capabilities, no_new_privs."""
        words = shlex.split(command.replace("$MAINPID", str(self.main_pid)).replace("${MAINPID}", str(self.main_pid)))
        setpriv = ["setpriv"]
        entry, gid = self._user()
        if entry is not None and not privileged:
            setpriv += [f"--reuid={entry.pw_uid}", f"--regid={gid}", "--init-groups"]
        if privileged:
            return words
        ambient = [c.lower().removeprefix("cap_") for c in self.unit.words("AmbientCapabilities")]
        if ambient:
            caps = ",".join("+" + c for c in ambient)
            setpriv += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
        bounding = [c.lower().removeprefix("cap_") for c in self.unit.words("CapabilityBoundingSet")]
        if bounding:
            setpriv += ["--bounding-set=-all," + ",".join("+" + c for c in bounding)]
        if self.unit.get("NoNewPrivileges") in ("yes", "true", "1"):
            setpriv.append("--no-new-privs")
        return setpriv + ["--", *words]

    def _environment(self, main: bool) -> dict[str, str]:
        entry, _ = self._user()
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "INVOCATION_ID": uuid.uuid4().hex}
        if entry is not None:
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name, SHELL=entry.pw_shell)
        for assignment in self.unit.all("Environment"):
            for word in shlex.split(assignment):
                key, _, value = word.partition("=")
                env[key] = value
        if main:
            env["NOTIFY_SOCKET"] = self.notify_path
            watchdog = seconds(self.unit.get("WatchdogSec"), 0.0)
            if watchdog:
                env["WATCHDOG_USEC"] = str(round(watchdog * 1_000_000))
        return env

    def _exec(self, command: str, main: bool) -> int:
        """Fork a process that runs `command` as the unit says; its pid."""
        privileged = command.lstrip("-@").startswith(("+", "!"))
        argv = self._argv(command.lstrip("-@+!"), privileged)
        env = self._environment(main)
        umask = int(self.unit.get("UMask", "0022"), 8)
        nofile = self.unit.get("LimitNOFILE")
        workdir = self.unit.get("WorkingDirectory", "/").lstrip("-")
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                if main and "WATCHDOG_USEC" in env:
                    env["WATCHDOG_PID"] = str(os.getpid())  # setpriv execs in place: the same pid
                os.umask(umask)
                if nofile:
                    try:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), int(nofile)))
                    except (ValueError, OSError):  # a container's own cap, below the unit's
                        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                        resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(nofile), hard), hard))
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(self.journal.fileno(), 1)
                os.dup2(self.journal.fileno(), 2)
                os.chdir(workdir)
                os.execvpe(argv[0], argv, env)
            except BaseException as e:
                os.write(2, f"unit_runner: {argv[0]}: {e}\n".encode())
            os._exit(203)  # systemd's EXIT_EXEC
        return pid

    def run_control(self, command: str) -> int:
        pid = self._exec(command, main=False)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


class Manager(Processes):
    """One unit's life: start, watch, restart, stop. Runs in a process of its own."""

    def __init__(self, unit: Unit, state: Path):
        super().__init__(unit, state)
        self.pidfd = -1
        self.stopping = False
        self.starts: list[float] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_path = str(state / "notify")
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)
        self.sock.bind(self.notify_path)
        os.chmod(self.notify_path, 0o777)  # the service's user must be able to send
        signal.signal(signal.SIGTERM, self._on_term)

    def set_state(self, state: str, status: str | None = None) -> None:
        (self.state / "state").write_text(state + "\n")
        (self.state / "MainPID").write_text(f"{self.main_pid}\n")
        if status is not None:
            (self.state / "status").write_text(status + "\n")

    def _on_term(self, *_) -> None:
        self.stopping = True

    # One run of the service; returns "stopped", "failed" or "restart".
    def run_once(self) -> str:
        unit = self.unit
        skipped = [key for key in NOT_APPLIED if unit.all(key)]
        if skipped:
            self.log("not applied outside systemd: " + ", ".join(skipped))
        self.set_state("activating", "")
        self._state_directories()
        for command in unit.all("ExecStartPre"):
            code = self.run_control(command)
            if code != 0 and not command.startswith("-"):
                self.log(f"Control process exited, code=exited, status={code}")
                return "failed"
        self.spawn_main(unit.all("ExecStart")[-1])
        start_timeout = seconds(unit.get("TimeoutStartSec"), 90.0)
        watchdog = seconds(unit.get("WatchdogSec"), 0.0)
        notify = unit.get("Type", "simple") == "notify"
        deadline = time.monotonic() + start_timeout
        ready = not notify
        if ready:
            self.set_state("active")
        last_ping = time.monotonic()
        while True:
            now = time.monotonic()
            timeout = 0.5
            if not ready:
                timeout = min(timeout, max(0.0, deadline - now))
            elif watchdog:
                timeout = min(timeout, max(0.0, last_ping + watchdog - now))
            readable, _, _ = select.select([self.sock, self.pidfd], [], [], timeout)
            if self.stopping:
                self.stop_main()
                return "stopped"
            if self.pidfd in readable:
                code = self.reap()
                self.read_notifications()
                self.log(f"Main process exited, status={code}")
                return self.after_exit(code)
            if self.sock in readable:
                for line in self.read_notifications():
                    if line == "READY=1" and not ready:
                        ready = True
                        last_ping = time.monotonic()
                        self.set_state("active")
                        self.log("Started.")
                    elif line == "WATCHDOG=1":
                        last_ping = time.monotonic()
                    elif line == "STOPPING=1":
                        self.set_state("deactivating")
            now = time.monotonic()
            if not ready and now >= deadline:
                self.log(f"start operation timed out ({start_timeout:g}s). Terminating.")
                self.stop_main()
                return self.after_exit(None, failure=True)
            if ready and watchdog and now - last_ping > watchdog:
                self.log(f"Watchdog timeout (limit {watchdog:g}s)!")
                self.kill_main(signal.SIGABRT, seconds(unit.get("TimeoutAbortSec"),
                                                       seconds(unit.get("TimeoutStopSec"), 90.0)))
                return self.after_exit(None, failure=True, reason="on-watchdog")

    def after_exit(self, code: int | None, failure: bool = False, reason: str = "") -> str:
        self.main_pid = 0
        if self.stopping:
            return "stopped"
        restart = self.unit.get("Restart", "no")
        failed = failure or code != 0
        abnormal = code is None or (code is not None and code < 0) or reason == "on-watchdog"
        wanted = (restart == "always" or (restart == "on-failure" and failed)
                  or (restart == "on-abnormal" and abnormal) or (restart == "on-watchdog" and reason == "on-watchdog"))
        if not wanted:
            return "failed" if failed else "stopped"
        return "restart"

    def serve_forever(self) -> int:
        burst = int(self.unit.get("StartLimitBurst", "5", section="Unit") or 5)
        window = seconds(self.unit.get("StartLimitIntervalSec", "10s", section="Unit"), 10.0)
        while True:
            now = time.monotonic()
            self.starts = [t for t in self.starts if now - t < window] + [now]
            if len(self.starts) > burst:
                self.log("Start request repeated too quickly.")
                self.set_state("failed")
                return 1
            outcome = self.run_once()
            if outcome == "stopped":
                self.set_state("inactive")
                self.log("Stopped.")
                return 0
            if outcome == "failed" or self.stopping:
                self.set_state("failed")
                self.log("Failed.")
                return 1
            delay = seconds(self.unit.get("RestartSec"), 0.1)
            # systemd's "activating (auto-restart)": a start job waiting on this has failed.
            self.set_state("auto-restart", "")
            self.log(f"Scheduled restart job in {delay:g}s.")
            end = time.monotonic() + delay
            while time.monotonic() < end and not self.stopping:
                time.sleep(min(0.1, end - time.monotonic()))
            if self.stopping:
                self.set_state("inactive")
                return 0

    # -- processes --------------------------------------------------------------------------

    def _state_directories(self) -> None:
        entry, gid = self._user()
        mode = int(self.unit.get("StateDirectoryMode", "0755"), 8)
        for name in self.unit.words("StateDirectory"):
            path = Path("/var/lib") / name
            path.mkdir(parents=True, exist_ok=True)
            if entry is not None:
                os.chown(path, entry.pw_uid, gid if gid is not None else entry.pw_gid)
            os.chmod(path, mode)

    def spawn_main(self, command: str) -> None:
        self.main_pid = self._exec(command, main=True)
        self.pidfd = os.pidfd_open(self.main_pid)
        self.set_state("activating")

    def reap(self) -> int:
        os.close(self.pidfd)
        self.pidfd = -1
        return os.waitstatus_to_exitcode(os.waitpid(self.main_pid, 0)[1])

    def read_notifications(self) -> list[str]:
        lines = []
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return lines
            pid = next((_UCRED.unpack(c[:_UCRED.size])[0] for level, kind, c in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            if pid != self.main_pid or not self.main_pid:  # NotifyAccess=main
                continue
            for line in data.decode("utf-8", "replace").splitlines():
                if line.startswith("STATUS="):
                    (self.state / "status").write_text(line[7:] + "\n")
                lines.append(line)

    def kill_main(self, sig: int, timeout: float) -> int | None:
        """`sig` to the main process; SIGKILL to its whole group after `timeout`. Its exit code."""
        group = self.main_pid
        kill_mode = self.unit.get("KillMode", "control-group")
        try:
            if kill_mode == "control-group" and sig == signal.SIGTERM:
                os.killpg(group, sig)
            else:
                os.kill(self.main_pid, sig)
        except ProcessLookupError:
            pass
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        if not ready:
            self.log(f"Still running {timeout:g}s after {signal.Signals(sig).name}. Killing.")
        try:
            os.killpg(group, signal.SIGKILL)  # what is left of the group, as systemd's final SIGKILL
        except ProcessLookupError:
            pass
        code = self.reap()
        self.log(f"Main process exited, status={code}")
        return code

    def stop_main(self) -> None:
        if not self.main_pid:
            return
        self.set_state("deactivating")
        sig = getattr(signal, self.unit.get("KillSignal", "SIGTERM"))
        self.kill_main(sig, seconds(self.unit.get("TimeoutStopSec"), 90.0))
        self.main_pid = 0


# -- systemctl's side ------------------------------------------------------------------------

def unit_state(state_dir: Path, name: str) -> str:
    try:
        return (state_dir / name / "state").read_text().strip()
    except FileNotFoundError:
        return "inactive"


def manager_pid(state_dir: Path, name: str) -> int | None:
    try:
        pid = int((state_dir / name / "manager.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def members(units_dir: Path, name: str) -> list[str]:
    """A target's services (Wants=), or the unit itself."""
    if "." not in name:
        name += ".service"
    if name.endswith(".target"):
        return [w for w in Unit.load(units_dir, name).words("Wants", section="Unit")]
    return [name]


def start(units_dir: Path, state_dir: Path, name: str) -> int:
    unit = Unit.load(units_dir, name)
    if manager_pid(state_dir, unit.name) and unit_state(state_dir, unit.name) in ("active", "activating",
                                                                                  "auto-restart"):
        return 0 if wait_started(state_dir, unit) else 1
    state = state_dir / unit.name
    state.mkdir(parents=True, exist_ok=True)
    (state / "state").write_text("activating\n")
    manager = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--units-dir", str(units_dir),
                                "--state-dir", str(state_dir), "manage", unit.name],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    (state / "manager.pid").write_text(f"{manager.pid}\n")
    if wait_started(state_dir, unit):
        return 0
    print(f"Job for {unit.name} failed because the control process exited with error code.\n"
          f'See "journalctl -u {unit.name}" for details.', file=sys.stderr)
    return 1


def wait_started(state_dir: Path, unit: Unit) -> bool:
    deadline = time.monotonic() + seconds(unit.get("TimeoutStartSec"), 90.0) + 5
    while time.monotonic() < deadline:
        state = unit_state(state_dir, unit.name)
        if state == "active":
            return True
        if state in ("failed", "inactive", "auto-restart"):
            return False
        time.sleep(0.05)
    return False


def stop(units_dir: Path, state_dir: Path, name: str) -> int:
    unit = Unit.load(units_dir, name)
    pid = manager_pid(state_dir, unit.name)
    if pid is None:
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds(unit.get("TimeoutStopSec"), 90.0) + 10
    while time.monotonic() < deadline and manager_pid(state_dir, unit.name):
        time.sleep(0.05)
    return 0


def reload(units_dir: Path, state_dir: Path, name: str) -> int:
    unit = Unit.load(units_dir, name)
    if unit_state(state_dir, unit.name) != "active":
        print(f"Failed to reload {unit.name}: Unit {unit.name} is not active.", file=sys.stderr)
        return 1
    commands = unit.all("ExecReload")
    if not commands:
        print(f"Failed to reload {unit.name}: Job type reload is not applicable for unit {unit.name}.",
              file=sys.stderr)
        return 1
    state = state_dir / unit.name
    manager = Processes(unit, state, main_pid=int((state / "MainPID").read_text()))
    for command in commands:
        code = manager.run_control(command)
        if code != 0 and not command.startswith("-"):
            manager.log(f"Control process exited, code=exited, status={code}")
            print(f"Job for {unit.name} failed.", file=sys.stderr)
            return 1
    manager.log("Reloaded.")
    return 0


def journal(state_dir: Path, name: str, lines: int | None) -> int:
    if "." not in name:
        name += ".service"
    try:
        text = (state_dir / name / "journal").read_text(errors="replace")
    except FileNotFoundError:
        print("-- No entries --")
        return 0
    shown = text.splitlines()
    if lines is not None:
        shown = shown[-lines:]
    print("\n".join(shown))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="unit_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--units-dir", type=Path, default=UNITS_DIR)
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    parser.add_argument("--no-pager", action="store_true")
    parser.add_argument("command")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    units, state = args.units_dir, args.state_dir
    rest = [a for a in args.rest if a not in ("--no-pager", "--quiet", "-q")]
    command = args.command

    if command == "manage":
        unit = Unit.load(units, rest[0])
        manager = Manager(unit, state / unit.name)
        return manager.serve_forever()
    if command == "journalctl":
        j = argparse.ArgumentParser(prog="journalctl")
        j.add_argument("-u", "--unit", required=True)
        j.add_argument("-n", "--lines", type=int)
        j.add_argument("-b", "--boot", action="store_true")
        j.add_argument("--no-pager", action="store_true")
        options = j.parse_args(rest)
        return journal(state, options.unit, options.lines)
    if command == "daemon-reload":
        return 0
    now = "--now" in rest
    names = [name for name in rest if not name.startswith("-")]
    code = 0
    for name in names:
        for member in members(units, name):
            if command in ("enable", "disable"):
                marker = state / "enabled" / member
                marker.parent.mkdir(parents=True, exist_ok=True)
                if command == "enable":
                    marker.touch()
                    print(f"Created symlink (unit_runner: {marker}) for {member}.")
                else:
                    marker.unlink(missing_ok=True)
                if now:
                    code |= (start if command == "enable" else stop)(units, state, member)
            elif command == "start":
                code |= start(units, state, member)
            elif command == "stop":
                code |= stop(units, state, member)
            elif command == "restart":
                stop(units, state, member)
                code |= start(units, state, member)
            elif command == "reload":
                code |= reload(units, state, member)
            elif command == "is-active":
                active = unit_state(state, member).replace("auto-restart", "activating")
                print(active)
                code |= 0 if active == "active" else 3
            elif command == "status":
                active = unit_state(state, member).replace("auto-restart", "activating (auto-restart)")
                path = state / member
                main_pid = (path / "MainPID").read_text().strip() if (path / "MainPID").exists() else "-"
                status = (path / "status").read_text().strip() if (path / "status").exists() else ""
                print(f"● {member}\n     Active: {active}\n   Main PID: {main_pid}\n     Status: \"{status}\"\n")
                journal(state, member, 10)
                code |= 0 if active == "active" else 3
            else:
                print(f"unit_runner: unknown command {command}", file=sys.stderr)
                return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
