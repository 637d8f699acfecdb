"""One daemon in this process: mtad, imapd or pop3d (the `mtad`, `imapd` and `pop3d`
commands under systemd, and the children of `postroom serve`), or one of mtad's extra MX
workers.

It opens the store, takes its daemon's lock on the data dir (postroom/datadir.py), starts
the daemon's services (postroom/daemons.py), says READY=1 to its manager once every listener
is bound (systemd, or `postroom serve` over the same sd_notify protocol), and on SIGTERM or
SIGINT stops: listeners at once, connections within [server] stop_grace; then it exits 0.
Under a supervisor it prints nothing: the supervisor prints the table and any start failure.

mtad's extra workers: with [smtp] workers = N the mtad process serves the MX and submission
ports itself and starts N - 1 workers (`postroom serve --smtp-worker`) that bind them too
(SO_REUSEPORT; the kernel spreads the connections; the login throttle is shared through its
file, policy/logins.py), restarts them when they die and stops them when it
stops. That is the one place workers come from, whether mtad runs under `postroom serve` or
alone (postroom-mtad.service); workers take no lock (their mtad holds it).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import conf
from conf import Config
from conf.logfmt import EventLogger, setup_logging
from conf.tls import TLSSetupError, ensure_certificate, server_context
from postroom import daemons, metrics, reload, supervisor
from postroom.daemons import Context
from postroom.datadir import DataDirInUseError, become_data_dir_owner, lock, lock_name, open_accounts, open_store
from postroom.notify import notify
from postroom.services import LISTENING, ServeError, of_daemon, status, table
from postroom.supervisor import Child, Supervisor, command, first_of, stop_on_signal
from postroom.watchdog import keep_alive, take_interval
from storage import DataDir, DataDirError

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
PR_SET_NAME = 15  # <linux/prctl.h>
WORKER_START_TIMEOUT = 60.0
EXIT_MARGIN = 1.0  # of a stop's budget, kept for the children's SIGKILL to land and this process to exit
WRITER_KILL_MARGIN = 1.0  # the writer is killed this long before the workers' deadline
WRITER_STOP_AFTER = 1.0  # beyond stop_grace, when sessions cut off have let go of the commits they waited for


class Running(Protocol):
    async def stop(self) -> None: ...


STARTERS: dict[str, Callable[[Context], Awaitable[Running]]] = {
    "smtp": daemons.start_smtp,
    "submission": daemons.start_submission,
    "submissions": daemons.start_submissions,
    "imap": daemons.start_imap,
    "imaps": daemons.start_imaps,
    "pop3": daemons.start_pop3,
    "pop3s": daemons.start_pop3s,
}


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


def main(prog: str, config_path: Path, daemon: str, worker: bool = False) -> int:
    """The process's whole life as `daemon`: alone (systemd, a person) or as a child of a
    supervisor. Returns the exit status of a failed start, which is one line: on stderr, and
    as the sd_notify STATUS, which is how a supervisor hears it (it prints it; the child
    does not). After a run that ended in a stop, ends the process."""
    supervised = supervisor.supervised()
    reload.ignore_until_ready()
    try:
        config = conf.load(config_path)
        become_data_dir_owner(config.server.data_dir)
        supervisor.become_child()
        code = run(config, daemon, worker=worker, supervised=supervised)
    except (conf.ConfigError, TLSSetupError, DataDirError, DataDirInUseError, ServeError) as e:
        notify(f"STATUS={e}")
        if not supervised:
            print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    # Stopped: every connection is closed and the store with it. The interpreter's own
    # teardown would only add a tenth of a second to every stop (and every restart).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def name_this_process(name: str) -> None:
    """The name ps, top and pgrep show (the kernel's comm, 15 bytes): the children of
    serve share its command line when they are forked from it."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def event_loop_factory(daemon: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `daemon` runs on; None: asyncio's own.

    mtad runs on uvloop (libuv's loop and transports, in C): at one connection a message,
    where accepting, reading, writing and the idle timer are a large part of the work, it
    spends about 15% less CPU a message. imapd and pop3d stay on asyncio's loop, under
    Twisted's asyncioreactor: no figure says uvloop would pay there."""
    if daemon == "mtad":
        import uvloop  # here: imapd and pop3d never load it

        return uvloop.new_event_loop
    return None


def run(config: Config, daemon: str, *, worker: bool = False, supervised: bool = False) -> int:
    """Run `daemon` ("mtad", "imapd", "pop3d") until a signal; `worker`: one of mtad's extra
    MX processes. ServeError (and the data dir's errors) when it cannot start."""
    return_big_buffers_to_the_system()
    name_this_process("mtad-worker" if worker else daemon)
    setup_logging(config.server.log_level)
    log = EventLogger(f"postroom.{daemon}")
    metrics.for_daemon(config, supervised=supervised, worker=worker)  # before anything counts
    if not supervised and ensure_certificate(config.tls, config.server.hostname):
        log.warning("tls.self_signed_created", cert=config.tls.cert, key=config.tls.key)
    tls = server_context(config.tls)
    data_dir, accounts = open_accounts(config)
    try:
        if not worker:
            # Under serve, a daemon of the previous serve (killed with -9) may still be
            # finishing its sessions: wait for it as long as its own stop may take.
            wait = float(config.server.stop_grace) + supervisor.STOP_MARGIN if supervised else 0.0
            lock(data_dir.path, lock_name(config, daemon), daemon, wait=wait, log=log)  # held until the process ends
        # reads_wait=False: a read on an event loop must not wait for a commit in flight
        store = open_store(data_dir, accounts, config, reads_wait=False)
        store.recover()  # before any listener: no request waits for a crash's leftovers
        try:
            context = daemons.build_context(config, data_dir, accounts, store, tls)
            with asyncio.Runner(loop_factory=event_loop_factory(daemon)) as runner:
                return runner.run(_run(context, log, daemon, worker, supervised, data_dir))
        finally:
            store.close()
    finally:
        accounts.close()


async def _run(context: Context, log: EventLogger, daemon: str, worker: bool, supervised: bool,
               data_dir: DataDir) -> int:
    stop = stop_on_signal()
    watchdog = take_interval()  # systemd's or serve's; mtad's workers get the same
    keep_alive(watchdog)
    config = context.config
    # mtad's workers take every SMTP listener (MX and submission) with it: SO_REUSEPORT.
    services = [s for s in of_daemon(daemon) if status(s, config) == LISTENING]
    # [smtp] writer: before any listener, so that the first message finds it; stopped after
    # every session of every mtad process has ended (mtad/writer.py).
    writer = None
    if daemon == "mtad" and not worker and services and config.smtp.writer:
        if config.cluster.enabled:
            raise ServeError("[smtp] writer: not in a cluster (the writer does not follow the node's shards)")
        writer, failed = await _start_children(config, log, watchdog, stop, "mtad-writer", "--smtp-writer", 1)
        if failed is not None:
            await writer.stop(config.server.stop_grace)
            raise ServeError(failed.failure)
    running: list[Running] = []
    for service in services:
        try:
            running.append(await STARTERS[service.name](context))
        except OSError as e:
            for other in reversed(running):
                await other.stop()
            if writer is not None:
                await writer.stop(config.server.stop_grace)
            await context.shared.close()
            raise ServeError(f"{service.label}: {e.strerror or e}") from None

    workers = None
    if daemon == "mtad" and not worker and running and config.smtp.workers > 1:
        workers, failed = await _start_children(config, log, watchdog, stop, "mtad-worker", "--smtp-worker",
                                                config.smtp.workers - 1)
        if failed is not None:
            await _stop(context, running, workers, writer=writer)
            raise ServeError(failed.failure)

    # SIGHUP: config and certificates read again for new sessions (postroom/reload.py).
    reload.Reloader(daemon, context, running, workers, log).install()
    if not supervised and not worker:
        print(table(config, of_daemon(daemon), log), flush=True)
    takeover = None
    if config.metrics.listen and not supervised and not worker:
        # Alone (a systemd unit): one daemon of the data dir answers the scrape (postroom/metrics.py).
        queue = context.shared.outbound.queue if daemon == "mtad" else None
        takeover = metrics.Takeover(config, data_dir, context.store, queue, log)
        takeover.start()
    follower = context.shared.follower
    # A cluster's: the shards this node releases let go of here, and their sessions ended.
    following = asyncio.ensure_future(follower.run()) if follower is not None else None
    extra = {"smtp_workers": config.smtp.workers} if workers else {}
    log.info("ready", daemon=daemon, services=len(running), **extra)
    notify(f"READY=1\nSTATUS={len(running)} service(s) running")
    await stop.wait()
    notify("STOPPING=1")
    reload.ignore_from_now()
    log.info("stopping", daemon=daemon)
    if takeover is not None:
        takeover.close()
    await _stop(context, running, workers, following, writer)
    log.info("stopped", daemon=daemon)
    return 0


async def _start_children(config: Config, log: EventLogger, watchdog: float | None, stop: asyncio.Event,
                          name: str, flag: str, count: int) -> tuple[Supervisor, Child | None]:
    """`count` children `postroom serve <flag>` under a supervisor of their own (mtad's MX
    workers; its writer, which stops later), started and awaited until READY=1: (the
    supervisor, the first that failed to start, or None)."""
    children = Supervisor(log, watchdog=watchdog)
    if config.metrics.listen:  # a child gone stops counting (its open connections, its flushes)
        children.on_exit = functools.partial(metrics.process_died, metrics.directory(config))
    children.attach()
    for _ in range(count):
        children.start(name, command(config.source, "serve", flag))
    return children, await first_of(children.wait_ready(WORKER_START_TIMEOUT), stop)


async def _stop(context: Context, running: list[Running], workers: Supervisor | None,
                following: asyncio.Future | None = None, writer: Supervisor | None = None) -> None:
    grace = context.config.server.stop_grace
    # serve (or systemd) kills this process grace + STOP_MARGIN after its SIGTERM: its
    # children stop within that (the writer, stopped last, within what is left of it), so
    # that a stuck child is killed here, and said so, rather than this process killed and
    # the child left behind.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(grace) + supervisor.STOP_MARGIN - EXIT_MARGIN

    async def services() -> None:
        # All at once: each service's stop may take the grace period, and together they
        # must end within it (serve kills this process at grace + STOP_MARGIN); a listener
        # stopped after another would also take new connections meanwhile.
        await asyncio.gather(*(service.stop() for service in reversed(running)))
        # The follower looked on while the sessions ended (cluster/follow.py: the shards
        # this node hands over are let go of within a second, not at the end of the stop);
        # its last look ends before the store closes.
        if following is not None:
            context.shared.follower.stop()
            await asyncio.gather(following, return_exceptions=True)
        await context.shared.close()

    # The workers stop as this process does, each within stop_grace.
    stopping = asyncio.gather(services(), workers.stop(grace, kill_after=deadline - loop.time()) if workers
                              else asyncio.sleep(0))
    if writer is None:
        await stopping
        return
    # The writer stops once every session of every mtad process has ended: its commits
    # are all answered. A commit it never answers (a stuck disk under it) would hold the
    # sessions' stop, which waits for deliveries under way, for ever: past the grace
    # period, the writer is told to stop too, and killed at the deadline, which fails that
    # commit (WriterGone) and lets the stop end.
    await asyncio.wait([stopping], timeout=float(grace) + WRITER_STOP_AFTER)
    # Killed a margin before the workers are, so that their sessions hear WriterGone's
    # 451 4.3.0, not a dropped connection.
    await writer.stop(grace, kill_after=max(0.0, deadline - WRITER_KILL_MARGIN - loop.time()))
    await stopping
