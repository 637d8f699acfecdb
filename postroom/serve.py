"""`postroom serve`: prepare the data dir and TLS, start every available daemon, and run
until SIGTERM or SIGINT.

The daemons are a table: each service names its listeners in the config and how to start
it, or None while it is not built yet. Serve prints what listens where (and what is not
available), tells systemd READY=1 once every listener is bound, and on a signal stops the
services in reverse order and exits 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from conf import Config
from conf.logfmt import EventLogger, setup_logging
from conf.tls import ensure_certificate, server_context
from conf.values import ListenAddress
from postroom import __version__, daemons
from postroom.notify import notify
from storage import Accounts, DataDir, open_data_dir
from storage.messages import NO_QUOTA, Quota
from storage.store import Store


@dataclass(frozen=True)
class Context:
    """What a service is built from: config and shared collaborators."""

    config: Config
    data_dir: DataDir
    accounts: Accounts
    store: Store
    tls: ssl.SSLContext | None
    # Collaborators the services of one process share (the IMAP listeners on 143 and 993
    # share their \\Recent claims and store threads), built by the first to need them and
    # closed by serve after every service has stopped.
    shared: dict[str, Any] = field(default_factory=dict)


class Running(Protocol):
    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Service:
    name: str
    label: str
    listeners: Callable[[Config], tuple[ListenAddress, ...]]
    implicit_tls: bool
    start: Callable[[Context], Awaitable[Running]] | None
    issue: int | None  # where its work is tracked while `start` is None


SERVICES: tuple[Service, ...] = (
    Service("smtp", "SMTP (MX)", lambda c: c.smtp.listen, False, daemons.start_smtp, 4),
    Service("submission", "submission (STARTTLS)", lambda c: c.submission.listen, False, None, None),
    Service("submissions", "submissions (TLS)", lambda c: c.submission.listen_tls, True, None, None),
    Service("imap", "IMAP (STARTTLS)", lambda c: c.imap.listen, False, daemons.start_imap, 5),
    Service("imaps", "IMAPS", lambda c: c.imap.listen_tls, True, daemons.start_imaps, 5),
    Service("pop3", "POP3 (STLS)", lambda c: c.pop3.listen, False, daemons.start_pop3, 6),
    Service("pop3s", "POP3S", lambda c: c.pop3.listen_tls, True, daemons.start_pop3s, 6),
)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class ServeError(Exception):
    """A daemon could not start (a port in use, say); str() is one line for the sysadmin."""


def open_accounts(config: Config) -> tuple[DataDir, Accounts]:
    data_dir = open_data_dir(config.server.data_dir, config.storage.shards)
    accounts = Accounts(data_dir.accounts_path, recipient_delimiter=config.accounts.recipient_delimiter)
    return data_dir, accounts


def open_store(data_dir: DataDir, accounts: Accounts, config: Config | None = None) -> Store:
    def quota_of(account: str) -> Quota:
        user = accounts.get_user(account)
        return Quota(user.quota, user.message_quota) if user else NO_QUOTA

    if config is None:
        return Store(data_dir, quota_of=quota_of)
    return Store(data_dir, quota_of=quota_of, dedupe_window=float(config.storage.dedupe_window))


def return_big_buffers_to_the_system() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which 20 MB
    message buffers come from heap arenas that never shrink: fifty big messages would
    leave the daemon hundreds of MB larger. A fixed threshold keeps every buffer over 1 MiB
    in its own mapping, returned when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def serve(config: Config, only: set[str] | None = None, worker: bool = False) -> int:
    """Run the services of SERVICES (those named in `only`, if given) until a signal. A
    worker (`serve --smtp-worker`, started by the main process when [smtp] workers > 1)
    runs the MX listener only and says nothing to the terminal or to systemd."""
    return_big_buffers_to_the_system()
    setup_logging(config.server.log_level)
    log = EventLogger("postroom.serve")
    if ensure_certificate(config.tls, config.server.hostname):
        log.warning("tls.self_signed_created", cert=config.tls.cert, key=config.tls.key)
    tls = server_context(config.tls)
    data_dir, accounts = open_accounts(config)
    store = open_store(data_dir, accounts, config)
    store.recover()  # before any listener: no request waits for a crash's leftovers
    try:
        context = Context(config, data_dir, accounts, store, tls)
        if worker:
            return asyncio.run(_run_worker(context, log))
        return asyncio.run(_run(context, log, only))
    finally:
        store.close()
        accounts.close()


def _stop_on_signal() -> asyncio.Event:
    """Set when SIGTERM (systemd) or SIGINT (Ctrl-C) arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(context: Context, log: EventLogger, only: set[str] | None = None) -> int:
    stop = _stop_on_signal()

    config = context.config
    # The table is for the person at the terminal, printed as one block; the log lines are
    # for the journal.
    table = [f"Postroom {__version__} on {config.server.hostname}, data in {config.server.data_dir}"]
    running: list[Running] = []
    started: set[str] = set()
    for service in SERVICES:
        if only is not None and service.name not in only:
            continue
        addresses = service.listeners(config)
        where = ", ".join(map(str, addresses)) or "-"
        if not addresses:
            status = "off (no listen address)"
        elif service.implicit_tls and context.tls is None:
            status = "off (needs [tls] cert and key)"
        elif service.start is None:
            status = f"not yet available (issue {service.issue})" if service.issue else "not yet available"
        else:
            try:
                running.append(await service.start(context))
            except OSError as e:
                for other in reversed(running):
                    await other.stop()
                await daemons.close_shared(context)
                raise ServeError(f"{service.label}: {e.strerror or e}") from None
            status = "listening"
            started.add(service.name)
        table.append(f"  {service.label:<24} {where:<28} {status}")
        (log.info if status == "listening" else log.debug)("service", service=service.name, listen=where, status=status)
    if not running:
        table.append("No daemon is available yet: Postroom waits for a signal (Ctrl-C stops it).")
    print("\n".join(table), flush=True)

    workers = [_spawn_worker(config) for _ in range(config.smtp.workers - 1)] if "smtp" in started else []
    supervisor = asyncio.ensure_future(_supervise(workers, config, log)) if workers else None
    available = len(running)
    # Logged before READY=1, so whoever waits for READY finds the line already written.
    log.info("ready", services=available, smtp_workers=len(workers) + 1 if "smtp" in started else 0)
    notify(f"READY=1\nSTATUS={available} service(s) running")
    await stop.wait()
    notify("STOPPING=1")
    log.info("stopping")
    if supervisor is not None:
        supervisor.cancel()
    await _stop_workers(workers, log)
    for service in reversed(running):
        await service.stop()
    await daemons.close_shared(context)
    log.info("stopped")
    return 0


async def _run_worker(context: Context, log: EventLogger) -> int:
    stop = _stop_on_signal()
    running = await daemons.start_smtp(context)
    log.info("worker_ready", service="smtp", listen=",".join(map(str, context.config.smtp.listen)))
    await stop.wait()
    await running.stop()
    return 0


def _spawn_worker(config: Config) -> subprocess.Popen:
    """An extra MX process; it binds the same ports with SO_REUSEPORT."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # systemd hears the main process only
    command = [sys.executable, "-m", "postroom", "--config", str(config.source), "serve", "--smtp-worker"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)


WORKER_CHECK_EVERY = 1.0  # seconds
WORKER_RESTARTS = 5  # at most this many restarts of one worker slot per WORKER_RESTART_WINDOW
WORKER_RESTART_WINDOW = 60.0


async def _supervise(workers: list[subprocess.Popen], config: Config, log: EventLogger) -> None:
    """A worker that dies (a crash, the OOM killer, a stray kill) is started again, so the
    MX keeps its capacity. One that dies WORKER_RESTARTS times within a minute is left
    down, with an error in the log, rather than restarted in a loop."""
    restarts: list[list[float]] = [[] for _ in workers]
    given_up: set[int] = set()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(WORKER_CHECK_EVERY)
        for slot, process in enumerate(workers):
            code = process.poll()
            if code is None or slot in given_up:
                continue
            now = loop.time()
            restarts[slot] = [t for t in restarts[slot] if now - t < WORKER_RESTART_WINDOW]
            if len(restarts[slot]) >= WORKER_RESTARTS:
                given_up.add(slot)
                log.error("worker_left_down", pid=process.pid, code=code, restarts=len(restarts[slot]))
                continue
            workers[slot] = _spawn_worker(config)
            restarts[slot].append(now)
            log.warning("worker_restarted", old_pid=process.pid, code=code, pid=workers[slot].pid)


async def _stop_workers(workers: list[subprocess.Popen], log: EventLogger) -> None:
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in workers:
        try:
            await asyncio.get_running_loop().run_in_executor(None, process.wait, 30)
        except subprocess.TimeoutExpired:
            log.warning("worker_killed", pid=process.pid)
            process.kill()
