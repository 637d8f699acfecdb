"""mtad's writer process ([smtp] writer = true; mtad/writer.py says why and what it does).

Started by mtad (`postroom serve --smtp-writer`), as its MX workers are: before its
listeners, so that the first message finds it, restarted when it dies, and stopped after
every session of every mtad process has ended, so that a stop still finishes the
deliveries under way (RFC 5321 §3.8, mtad/agent.py). It takes no lock (its mtad holds the
data dir's), opens the store, listens on the data dir's writer socket and says READY=1.
On SIGTERM (or SIGINT) it stops taking connections and serves those open until mtad hangs
up (after its last session) or [server] stop_grace has passed, then closes the store. A
writer whose commit never ends (a stuck disk) is killed by mtad within mtad's own stop
budget (postroom/daemon_process.py), which fails that commit with a 451.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import conf
from conf.logfmt import EventLogger, setup_logging
from mtad import writer
from postroom import metrics, supervisor
from postroom.daemon_process import event_loop_factory, name_this_process, return_big_buffers_to_the_system
from postroom.daemons import DELIVERY_THREADS, Threads
from postroom.datadir import become_data_dir_owner, open_accounts, open_store
from postroom.notify import notify
from postroom.watchdog import keep_alive, take_interval

STOP_MARGIN = 5.0  # beyond [server] stop_grace, for mtad's sessions to end and hang up


def main(prog: str, config_path: Path) -> int:
    try:
        config = conf.load(config_path)
        become_data_dir_owner(config.server.data_dir)
        supervisor.become_child()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing here to read again
        return_big_buffers_to_the_system()
        name_this_process("mtad-writer")
        setup_logging(config.server.log_level)
        # Its mtad's metrics directory, as a worker's: postroom_fsync_seconds and the rest count.
        metrics.for_daemon(config, supervised=True, worker=True)
        log = EventLogger("postroom.writer")
        data_dir, accounts = open_accounts(config)
    except (conf.ConfigError, OSError) as e:
        notify(f"STATUS={e}")
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    try:
        store = open_store(data_dir, accounts, config, reads_wait=False)
        try:
            store.recover()
            with asyncio.Runner(loop_factory=event_loop_factory("mtad")) as runner:
                code = runner.run(_run(store, writer.socket_path(data_dir.path), log,
                                       float(config.server.stop_grace) + STOP_MARGIN))
        finally:
            store.close()
    finally:
        accounts.close()
    # As a daemon's (postroom/daemon_process.py): the interpreter's teardown adds nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _run(store, path: Path, log: EventLogger, stop_wait: float) -> int:
    from mtad.routing import commit_small

    stop = supervisor.stop_on_signal()
    keep_alive(take_interval())
    threads = Threads("deliver", DELIVERY_THREADS)
    service = writer.WriterServer(store, lambda store, delivery: commit_small(store, delivery, threads))
    try:
        server = await writer.listen(service, path)
    except OSError as e:
        notify(f"STATUS=writer socket {path}: {e.strerror or e}")
        return 1
    log.info("ready", daemon="mtad-writer", socket=str(path))
    notify("READY=1\nSTATUS=writing")
    await stop.wait()
    notify("STOPPING=1")
    server.close()  # no new connection; those open go on until mtad hangs up
    try:
        await asyncio.wait_for(service.drained(), stop_wait)
    except asyncio.TimeoutError:
        log.error("writer_stop_cut_off", connections=len(service.connections), commits=len(service.in_flight))
    for connection in list(service.connections):
        connection.transport.close()
    await threads.close()
    log.info("stopped", daemon="mtad-writer")
    return 0
