"""`postroom serve`: a supervisor. It prepares the data dir and TLS, starts each daemon
that has something to listen on (mtad, imapd, pop3d) in a process of its own, and runs
until SIGTERM or SIGINT.

The children are forked from serve once it has imported their code, before its event loop
runs (postroom/supervisor.py): a start costs about what one process costs. It prints what
listens where (and what is not available) and tells systemd READY=1 once every child has
said READY=1 to it, that is once every listener is bound. A child that
cannot start (a port in use) stops the others, and serve exits 1 with the child's one
line. A child that dies later is started again (postroom/supervisor.py). On a signal
every child is told SIGTERM and given [server] stop_grace to finish; serve then exits 0.

Serve holds the data dir's serve.lock, each child its daemon's lock (postroom/datadir.py):
a second serve, or an mtad started beside this one, refuses to start.

With [cluster] etcd, the node agent (postroom/cluster_agent.py) is a supervised child too, started
first: it claims this node's shards, and the daemons' commits pass once it has.

With [metrics] listen, serve answers the Prometheus scrape for every child (postroom/metrics.py).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from conf import Config
from conf.logfmt import EventLogger, setup_logging
from conf.tls import ensure_certificate, server_context
from postroom import reload
from postroom.datadir import lock, lock_name, open_accounts
from postroom.notify import notify
from postroom.services import LISTENING, SERVICES, ServeError, daemons_to_start, status, table
from postroom.supervisor import Supervisor, command, first_of, stop_on_signal
from postroom.watchdog import keep_alive, take_interval

if TYPE_CHECKING:
    from postroom.metrics import Serving

START_TIMEOUT = 60.0  # a child not ready by then has hung: serve gives up and says which


def serve(config: Config) -> int:
    from postroom import daemon_process, daemons, metrics  # here: the admin commands never load a daemon

    setup_logging(config.server.log_level)
    log = EventLogger("postroom.serve")
    reload.ignore_until_ready()  # the children inherit it, until their own handler
    # Everything the children would otherwise race for is done once, here, first: the data
    # dir's creation and the dev certificate.
    data_dir, accounts = open_accounts(config)
    accounts.close()
    held = lock(data_dir.path, lock_name(config, "serve"), "postroom serve")  # until the process ends
    if ensure_certificate(config.tls, config.server.hostname):
        log.warning("tls.self_signed_created", cert=config.tls.cert, key=config.tls.key)
    server_context(config.tls)  # a bad certificate is one line from here, not one per child
    # Before any child exists: the port is bound (in use: one line, nothing started) and
    # every process will write its metrics where this one reads them.
    serving = metrics.for_serve(config)
    # systemd's watchdog: serve pings it from its loop and watches its children with the same timeout.
    supervisor = Supervisor(log, watchdog=take_interval())
    if serving is not None:
        supervisor.on_exit = functools.partial(metrics.process_died, serving.directory)
    started = daemons_to_start(config)
    for daemon in started:
        daemons.preload(daemon)
    if config.cluster.enabled:
        from postroom import cluster_agent as process

        supervisor.fork("cluster-agent", command(config.source, "serve", "--cluster-agent"),
                        functools.partial(process.main, "postroom", config.source),
                        close=(held, *(serving.listener.filenos() if serving is not None else ())))
    for daemon in started:
        supervisor.fork(daemon, command(config.source, "serve", "--daemon", daemon),
                        functools.partial(daemon_process.main, "postroom", config.source, daemon),
                        close=(held, *(serving.listener.filenos() if serving is not None else ())))
    try:
        return asyncio.run(_supervise(config, log, supervisor, started, serving))
    finally:
        if serving is not None:
            serving.close()


async def _supervise(config: Config, log: EventLogger, supervisor: Supervisor, started: list[str],
                     serving: Serving | None) -> int:
    stop = stop_on_signal()
    keep_alive(supervisor.watchdog.interval)
    supervisor.attach()
    reload.forward_on_signal(config.source, supervisor, log)  # SIGHUP: checked, then to every child
    if serving is not None:
        serving.listener.start()  # answers from now on, while the daemons start
        log.info("metrics_listening", listen=",".join(str(a) for a in config.metrics.listen))
    failed = await first_of(supervisor.wait_ready(START_TIMEOUT), stop)
    if failed is not None:
        reload.ignore_from_now()
        await supervisor.stop(config.server.stop_grace)
        raise ServeError(failed.failure)
    if not stop.is_set():
        print(table(config, SERVICES, log), flush=True)
        listening = sum(status(s, config) == LISTENING for s in SERVICES)
        # Logged before READY=1, so whoever waits for READY finds the line already written.
        log.info("ready", services=listening, daemons=",".join(started) or "-",
                 smtp_workers=config.smtp.workers if "mtad" in started else 0)
        notify(f"READY=1\nSTATUS={listening} service(s) running")
        await stop.wait()
    notify("STOPPING=1")
    reload.ignore_from_now()
    log.info("stopping")
    await supervisor.stop(config.server.stop_grace)
    log.info("stopped")
    return 0
