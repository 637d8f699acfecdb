"""Fixtures every Postroom test builds on.

- `data_dir`: a fresh, empty data dir.
- `write_config(**sections)`: a config file with free loopback ports for every listener and
  data under `data_dir`; keyword arguments override keys per section.
- `config_path`: that config with no overrides.
- `write_config_file(path, data_dir, **sections)`: the same, for fixtures of wider scope;
  `start_module_daemon(root)` starts a daemon on it, for a module's tests to share.
- `cli(*args, input=None)`: runs the installed `postroom --config <config_path> ...` as a
  sysadmin does, returning the CompletedProcess (text mode).
- `add_accounts(config_path, password, users, aliases)`: domains, users and aliases made in
  this process, for tests whose subject is not the CLI.
- `daemon`: `postroom serve` started the way a user starts it (the console script, under an
  sd_notify socket as systemd would), ready when it says READY=1; stopped with SIGTERM,
  which must end it cleanly (exit 0) within the test's teardown.
- A failed test's report carries the log of every daemon it started in its tmp_path (the
  `serve.err` files), so a failure in CI says what the server did.
- `client_tls_context(config)`: an SSL context that trusts the daemon's certificate, for the
  real clients (smtplib, imaplib, poplib, imapclient).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import argon2
import pytest

import conf
from conf.values import ListenAddress
from clamd_peer import clamd_server, silent_clamd  # noqa: F401 (fixtures for every test module)

BIN = Path(sys.executable).parent
POSTROOM = str(BIN / "postroom")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# Each listener in a test config; the key is "<section>.<key>".
LISTENERS = (
    "smtp.listen", "submission.listen", "submission.listen_tls",
    "imap.listen", "imap.listen_tls", "pop3.listen", "pop3.listen_tls",
)

# Tests run in several processes at once (pytest-xdist, see the Makefile). Each takes its
# ports from a range of its own, below the kernel's ephemeral range (32768 and up, where
# port 0 and client sockets take theirs): two processes never hand out the same port, and
# a port checked free here cannot be taken by anyone else before the daemon binds it.
# POSTROOM_TEST_PORTS moves the whole run's ranges (e.g. 20000), so that a second checkout's
# suite can run beside this one's without the two handing out the same ports.
PORT_RANGE_START, PORT_RANGE_SIZE = int(os.environ.get("POSTROOM_TEST_PORTS", "12000")), 2000
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_first_port = PORT_RANGE_START + PORT_RANGE_SIZE * (int(_worker[2:]) if _worker[2:].isdigit() else 0)
_next_port = _first_port
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, from this test process's own range; never
    handed out twice in one test run unless the range is used up (then the oldest again)."""
    global _next_port
    for _ in range(PORT_RANGE_SIZE):
        port, _next_port = _next_port, _first_port + (_next_port + 1 - _first_port) % PORT_RANGE_SIZE
        if port in _handed_out and len(_handed_out) < PORT_RANGE_SIZE:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_first_port}-{_first_port + PORT_RANGE_SIZE - 1}")


_refusing: list[socket.socket] = []


def refusing_port() -> int:
    """A loopback port that refuses every connection for the rest of this test process: bound
    here and never listened on. A port merely checked free (free_port) can be taken meanwhile
    by any other listener (a daemon restarting, another run's suite), and a delivery meant to
    fail at once then waits for a greeting that never comes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEADDR: nobody binds beside it
    sock.bind(("127.0.0.1", free_port()))
    _refusing.append(sock)
    return sock.getsockname()[1]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_config(sections: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


SERVE_LOG_TAIL = 60_000  # characters of each daemon's log a failed test's report carries


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp_path, Path):
        for log in sorted(tmp_path.rglob("serve.err")):
            text = log.read_text(errors="replace")
            report.sections.append((f"{log.relative_to(tmp_path)} ({report.when})", text[-SERVE_LOG_TAIL:]))
    return report


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


def write_config_file(path: Path, data_dir: Path, **overrides: dict[str, object]) -> Path:
    """The test config at `path`, data under `data_dir`: what `write_config` writes, for a
    fixture of wider scope (a daemon a whole module shares)."""
    sections: dict[str, dict[str, object]] = {
        "server": {"hostname": "mail.example.test", "data_dir": str(data_dir), "log_level": "info"},
        "tls": {"cert": str(data_dir / "tls/cert.pem"), "key": str(data_dir / "tls/key.pem"), "self_signed": True},
        "storage": {"shards": 4},
        # Every test client comes from 127.0.0.1: the per-IP limit must allow a crowd.
        "smtp": {"max_connections_per_ip": 200},
        # The policy chain asks DNS (SPF, DKIM, DMARC): its tests turn it on with a zone
        # of their own (tests/dnszone.py); the rest do not depend on this machine's DNS.
        "policy": {"enabled": False},
        "accounts": dict(CHEAP_PASSWORDS),
    }
    for dotted in LISTENERS:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = [f"127.0.0.1:{free_port()}"]
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(keys)
    path.write_text(render_config(sections))
    return path


@pytest.fixture
def write_config(tmp_path: Path, data_dir: Path):
    def write(name: str = "postroom.toml", **overrides: dict[str, object]) -> Path:
        return write_config_file(tmp_path / name, data_dir, **overrides)

    return write


@pytest.fixture
def config_path(write_config) -> Path:
    return write_config()


@pytest.fixture
def cli(config_path: Path, tmp_path: Path):
    def run(*args: str, input: str | None = None, config: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTROOM, "--config", str(config or config_path), *args],
            input=input, capture_output=True, text=True, timeout=120, cwd=tmp_path,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    return run


class _HashOnce(argon2.PasswordHasher):
    """argon2id at a config's cost, each password hashed once per test process: at
    production cost a hash takes ~0.2 s of CPU, and a module's tests make hundreds of users
    with one password. What is stored is a real hash of that password (the daemon verifies
    it as any other); the users that share the password share its salt."""

    def __init__(self, time_cost: int, memory_cost: int, parallelism: int) -> None:
        super().__init__(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, type=argon2.Type.ID)
        self._hashes: dict[str | bytes, str] = {}

    def hash(self, password: str | bytes, **kwargs) -> str:
        if kwargs:
            return super().hash(password, **kwargs)
        if password not in self._hashes:
            self._hashes[password] = super().hash(password)
        return self._hashes[password]


_hash_once: dict[tuple[int, int, int], _HashOnce] = {}  # by (passes, KiB, lanes)

# Real argon2id at the smallest cost the algorithm allows (8 KiB, one pass): a hash or a
# check takes ~20 us instead of ~0.18 s of CPU and 64 MiB. Every test config asks for it
# ([accounts] password_*), so the daemons' logins cost that much; CHEAP_HASHER makes the
# same hashes for Accounts a test opens itself. What Accounts and the daemons do with a
# hash is the same whatever its cost; the production cost has tests of its own
# (test_accounts.py's full_cost_accounts, test_serve.py, test_cli.py).
CHEAP_PASSWORDS = {"password_memory": "8K", "password_passes": 1, "password_lanes": 1}
CHEAP_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.ID)


def add_accounts(config_path: Path, password: str = "", users: tuple[str, ...] | list[str] = (),
                 aliases: dict[str, list[str]] | None = None, domains: tuple[str, ...] = ("example.test",)) -> None:
    """Domains, users (all with `password`) and aliases, made through the accounts API in
    this process as `postroom domain|user|alias add` makes them: a `postroom` process costs
    a test ~0.5 s of CPU (interpreter, imports); the commands have their own tests
    (test_cli.py)."""
    from storage import Accounts, open_data_dir

    config = conf.load(config_path)
    data_dir = open_data_dir(config.server.data_dir, config.storage.shards)  # as postroom.datadir.open_accounts
    cost = (config.accounts.password_passes, config.accounts.password_memory // 1024, config.accounts.password_lanes)
    hasher = _hash_once.setdefault(cost, _HashOnce(*cost))  # the config's, as postroom.datadir.password_hasher
    accounts = Accounts(data_dir.accounts_path, recipient_delimiter=config.accounts.recipient_delimiter,
                        hasher=hasher)
    with accounts:
        for domain in domains:
            accounts.add_domain(domain)
        for user in users:
            accounts.add_user(user, password)
        for alias, targets in (aliases or {}).items():
            accounts.add_alias(alias, targets)


@dataclass
class Daemon:
    """A running `postroom serve`; `stdout()`/`stderr()` read what it printed so far."""

    process: subprocess.Popen
    config_path: Path
    config: conf.Config
    out_path: Path
    err_path: Path

    def stdout(self) -> str:
        return self.out_path.read_text()

    def child_pid(self, name: str) -> int:
        """The pid of serve's child process `name` ("mtad", "imapd", "pop3d"): what a test of
        a daemon's memory must measure, not the supervisor."""
        from procs import processes

        (pid,) = [pid for pid, p in processes().items() if p.parent == self.process.pid and p.name == name]
        return pid

    def stderr(self) -> str:
        return self.err_path.read_text()

    def listen(self, dotted: str) -> ListenAddress:
        """The first address of a listener, e.g. daemon.listen("imap.listen_tls")."""
        section, key = dotted.split(".")
        return getattr(getattr(self.config, section), key)[0]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                message = f"postroom serve ignored signal {sig} for {STOP_TIMEOUT}s:\n{self.stderr()}"
                raise AssertionError(message) from None
        return self.process.returncode


def start_daemon(config_path: Path, workdir: Path) -> Daemon:
    """Start `postroom serve` and return once it has notified READY=1."""
    sock_dir = tempfile.mkdtemp(prefix="notify-")  # AF_UNIX paths are short; tmp_path may not be
    notify_path = os.path.join(sock_dir, "notify.sock")
    try:
        return _start_and_wait(config_path, workdir, notify_path)
    finally:
        # Its socket is closed by now: what serve says later (STOPPING=1) goes nowhere.
        shutil.rmtree(sock_dir, ignore_errors=True)


def _start_and_wait(config_path: Path, workdir: Path, notify_path: str) -> Daemon:
    out_path, err_path = workdir / "serve.out", workdir / "serve.err"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(notify_path)
        notify_sock.settimeout(0.2)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                [POSTROOM, "--config", str(config_path), "serve"],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir,
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
        daemon = Daemon(process, config_path, conf.load(config_path), out_path, err_path)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"postroom serve exited {process.returncode} before READY:\n{daemon.stderr()}")
            try:
                message = notify_sock.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in message.splitlines():
                return daemon
        daemon.stop(signal.SIGKILL)
        raise AssertionError(f"postroom serve not ready within {READY_TIMEOUT}s:\n{daemon.stderr()}")


class SharedDaemon:
    """A module's daemon as one test sees it: the daemon's attributes, and `stderr()` is
    what it logged since the test began. Subclasses give the test users of its own."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self._log_start = len(daemon.stderr())

    def __getattr__(self, name: str):
        return getattr(self.daemon, name)

    def stderr(self) -> str:
        return self.daemon.stderr()[self._log_start:]


def start_module_daemon(root: Path, **overrides: dict[str, object]) -> Daemon:
    """`postroom serve` on a config of `write_config_file` under `root`, for a daemon a
    module's tests share. Another test suite on this machine (another checkout) hands out
    the same ports: a port it took between our check and the bind would fail every test of
    the module, so a start that finds its port in use is tried again on new ports."""
    for attempt in range(3):
        path = write_config_file(root / "postroom.toml", root / "var", **overrides)
        try:
            return start_daemon(path, root)
        except AssertionError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise


@pytest.fixture
def daemon(config_path: Path, tmp_path: Path):
    running = start_daemon(config_path, tmp_path)
    yield running
    code = running.stop()
    assert code == 0, f"postroom serve exited {code} on SIGTERM:\n{running.stderr()}"


def write_mbsyncrc(path: Path, server: Daemon, user: str, password: str, local: Path) -> Path:
    """An mbsync (isync) config at `path` syncing `user`'s INBOX over IMAPS with the
    daemon, both ways, into the Maildir `local`: the channel is called `sync`."""
    address = server.listen("imap.listen_tls")
    path.write_text(f"""
IMAPAccount test
Host localhost
Port {address.port}
User {user}
Pass "{password}"
SSLType IMAPS
CertificateFile {server.config.tls.cert}

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns INBOX
Create Both
Expunge Both
SyncState *
""")
    return path


def client_tls_context(config: conf.Config) -> ssl.SSLContext:
    """Trust exactly the daemon's (self-signed) certificate, with hostname checks on."""
    context = ssl.create_default_context(cafile=str(config.tls.cert))
    return context
