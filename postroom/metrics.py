"""[metrics] listen: which process answers the Prometheus scrape, its HTTP listener, and
what a scrape reads besides the daemons' own counters (wire/metrics.py).

Every process of a data dir writes its metrics to `<data dir>/metrics/` (prometheus-client's
multiprocess mode). The process that answers [metrics] listen sums those files and adds
what it reads from the data dir at the scrape: the outbound queue's messages by state (in a
cluster, of every shard queue on disk; a daemon alone counts the queues of the shards its
node holds, which it has open), and each shard's messages and bytes (in a cluster, of the
shards the node holds; serve opens them for the scrape and closes them after it, so that
it never keeps a released shard's volume from being detached: cluster/pins.py).

Who answers:
- Under `postroom serve`, serve itself: it owns the directory (emptied at its start, the
  previous run's values gone), binds [metrics] listen before it forks the daemons (a port
  in use stops the start with one line, as for any listener), and marks each child that
  dies, so its open-connection gauge stops counting while its counters stay.
- With mtad, imapd and pop3d as separate units, the one that holds `<data dir>/metrics.lock`:
  the first to start takes it; the others try again every TAKEOVER seconds, so when the
  holder stops, another answers within that time. Each removes, at its start, the files of
  processes that no longer run. mtad's [smtp] workers only write.
With [metrics] listen empty, nothing is written: the values stay in each process's memory.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from pathlib import Path

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from conf import Config
from conf.logfmt import EventLogger
from postroom.services import ServeError
from storage import DEFERRED, DataDir, QueueSet, Store, open_data_dir
from wire import metrics
from wire.metrics import process_died  # noqa: F401 - what serve's and mtad's supervisors call for a child gone

TAKEOVER = 1.0  # seconds between a standalone daemon's tries for metrics.lock (each one flock call)


def directory(config: Config) -> Path:
    return config.server.data_dir / "metrics"


class DataDirCollector:
    """What a scrape reads from the data dir itself: gauges, read when asked. The queue
    and the store are opened at the first scrape, in the serving process (a daemon passes
    its own store and queue: an LMDB environment must not be opened twice in one process,
    closing one copy would drop the other's locks). A cluster node's serve passes
    `open_store` (postroom/datadir.py's, pinned, the shards its node holds only): the
    shards it opens are closed after each scrape, as the shard queues are, so that a
    volume released between two scrapes is free to detach at once."""

    def __init__(self, data_dir: DataDir, store: Store | None = None, queue: QueueSet | None = None,
                 open_queues: Callable[[], QueueSet] | None = None, open_store: Callable[[], Store] | None = None):
        self._data_dir = data_dir
        self._open_queues = open_queues or (lambda: QueueSet(data_dir))
        self._new_store = open_store or (lambda: Store(data_dir))
        self._store, self._queue = store, queue
        self._own_store, self._own_queue = store is None, queue is None
        self._shards_per_scrape = store is None and open_store is not None
        self._lock = threading.Lock()  # two scrapes at once open each once

    def collect(self):
        with self._lock:
            yield from self._collect()

    def _collect(self):
        queue = GaugeMetricFamily("postroom_queue_messages",
                                  "Messages in the outbound queue, by state: queued (not tried yet), deferred "
                                  "(tried, to be tried again), held (`postroom queue hold`)", labels=["state"])
        counts = {"queued": 0, "deferred": 0, "held": 0}
        recipients = {"queued": 0, "deferred": 0}
        queues = self._open_queue()
        queues.refresh()  # a cluster's shard queues come and go
        try:
            listed = queues.list()
        finally:
            if self._own_queue and queues.sharded:
                # A cluster's shard queues are not held open between scrapes: a volume
                # released meanwhile must be free to detach.
                queues.close()
                self._queue = None
        for message in listed:
            pending = message.pending
            if not pending:
                continue
            tried = any(r.state == DEFERRED for r in pending)
            counts["held" if message.held else "deferred" if tried else "queued"] += 1
            for r in pending:
                recipients[r.state] += 1
        for state, count in counts.items():
            queue.add_metric([state], count)
        yield queue
        per_recipient = GaugeMetricFamily("postroom_queue_recipients",
                                          "Recipients waiting in the outbound queue, by state", labels=["state"])
        for state, count in recipients.items():
            per_recipient.add_metric([state], count)
        yield per_recipient
        size = GaugeMetricFamily("postroom_store_bytes", "Bytes of mail in each shard of the store (what quotas "
                                 "count)", labels=["shard"])
        messages = GaugeMetricFamily("postroom_store_messages", "Messages in each shard of the store",
                                     labels=["shard"])
        store = self._open_store()
        try:
            usage_by_shard = store.usage_by_shard()
        finally:
            if self._shards_per_scrape:
                for number in store.open_shards():
                    store.close_shard(number)
        for number, usage in sorted(usage_by_shard.items()):
            size.add_metric([str(number)], usage.used)
            messages.add_metric([str(number)], usage.messages)
        yield size
        yield messages

    def _open_queue(self) -> QueueSet:
        if self._queue is None:
            self._queue = self._open_queues()
        return self._queue

    def _open_store(self) -> Store:
        if self._store is None:
            self._store = self._new_store()
        return self._store

    def close(self) -> None:
        if self._own_queue and self._queue is not None:
            self._queue.close()
        if self._own_store and self._store is not None:
            self._store.close()


class Serving:
    """The listener and what it reads; `close` when the process stops."""

    def __init__(self, config: Config, data_dir: DataDir, store: Store | None = None, queue: QueueSet | None = None):
        from postroom.datadir import open_queues, open_store

        self.directory = directory(config)
        # serve's own store, in a cluster: as a daemon's, the shards its node holds only.
        own_store = functools.partial(open_store, data_dir, None, config) \
            if config.cluster.enabled else None
        self.collector = DataDirCollector(data_dir, store, queue, functools.partial(open_queues, config, data_dir),
                                          own_store)
        try:
            self.listener = MetricsListener(((a.host, a.port) for a in config.metrics.listen),
                                                    registry_for(self.directory, self.collector))
        except OSError as e:
            where = ", ".join(str(a) for a in config.metrics.listen)
            raise ServeError(f"metrics on {where}: {e.strerror or e}") from None

    def close(self) -> None:
        self.listener.close()
        self.collector.close()


# -- under `postroom serve` ---------------------------------------------------------------------

def for_serve(config: Config) -> Serving | None:
    """In serve, before it forks the daemons: the directory made empty and chosen for every
    process, the listener bound (not yet answering: `start` it once the children are
    forked, and have them close `filenos()`). None with [metrics] off."""
    if not config.metrics.listen:
        metrics.enable(None)
        return None
    where = directory(config)
    metrics.enable(where)
    metrics.remove_dead(where, everything=True)
    return Serving(config, open_data_dir(config.server.data_dir, config.storage.shards))


# -- a daemon alone (systemd units) -------------------------------------------------------------

def for_daemon(config: Config, *, supervised: bool, worker: bool) -> None:
    """In a daemon process, before it counts anything: under serve (or as mtad's worker)
    the directory comes with the environment it was started with; alone, the daemon
    chooses it and removes the files of processes gone."""
    if supervised or worker:
        return
    if not config.metrics.listen:
        metrics.enable(None)
        return
    where = directory(config)
    metrics.enable(where)
    metrics.remove_dead(where)


class Takeover:
    """A daemon alone: answers [metrics] listen while it holds metrics.lock, tries for it
    every TAKEOVER seconds while another daemon does."""

    def __init__(self, config: Config, data_dir: DataDir, store: Store, queue: QueueSet | None, log: EventLogger):
        self._config, self._data_dir, self._store, self._queue, self._log = config, data_dir, store, queue, log
        self._fd = os.open(data_dir.path / "metrics.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.serving: Serving | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """In the event loop: take the lock now if it is free, else try again later."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._timer = asyncio.get_running_loop().call_later(TAKEOVER, self.start)
            return
        try:
            self.serving = Serving(self._config, self._data_dir, self._store, self._queue)
        except ServeError as e:
            # A port in use (by something else than a daemon of ours): the mail goes on.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._log.error("metrics_failed", reason=str(e))
            self._timer = asyncio.get_running_loop().call_later(TAKEOVER, self.start)
            return
        self.serving.listener.start()
        self._log.info("metrics_listening", listen=",".join(str(a) for a in self._config.metrics.listen))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.serving is not None:
            self.serving.close()
        os.close(self._fd)  # the lock goes with it: another daemon takes over


# -- the HTTP listener -------------------------------------------------------------------------

CLIENTS = 8  # connections answered at once; more are closed at once
CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its request, or to read a piece of the answer


class _Quiet(WSGIRequestHandler):
    def setup(self):
        # The socket's timeout. Without one, a connection that sends nothing held its thread
        # for ever: 300 idle connections were 300 threads in serve, and more could come.
        self.timeout = CLIENT_TIMEOUT
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        """A scrape every 15 s is not an event worth a log line."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up a stop
    block_on_close = False  # nor does server_close wait for one
    request_queue_size = 64  # listen(2)'s backlog: 5 by default, and a flood's SYNs drop a scrape's

    def __init__(self, *args, **kwargs):
        # The endpoint shares serve's process (and the machine) with the mail: at most
        # CLIENTS threads answer, a client beyond them is closed unanswered. Prometheus
        # scrapes one connection at a time; a flood costs the scrapes, never the mail.
        self._slots = threading.BoundedSemaphore(CLIENTS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # A client that timed out or went away: socketserver's default prints a traceback
        # to stderr (the journal), one per connection, whoever opens them.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def server_bind(self):
        # http.server's own looks up the address's name (getfqdn): start-up never waits on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()


class MetricsListener:
    """[metrics] listen: HTTP on each address, GET /metrics (any path, as prometheus-client
    answers) gives the Prometheus text format of `registry`. Bound when made (a port in use
    is an OSError here); served from a thread once `start` is called."""

    def __init__(self, addresses: Iterable[tuple[str, int]], registry: CollectorRegistry):
        app = make_wsgi_app(registry)
        self.servers: list[WSGIServer] = []
        try:
            for host, port in addresses:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                server_class = type("MetricsServer", (_Server,), {"address_family": family})
                self.servers.append(make_server(host, port, app, server_class, handler_class=_Quiet))
        except BaseException:
            self.close()
            raise
        self._threads: list[threading.Thread] = []

    def filenos(self) -> tuple[int, ...]:
        return tuple(server.socket.fileno() for server in self.servers)

    def start(self) -> None:
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        for server in self.servers:
            if getattr(self, "_threads", None):  # serve_forever runs: shutdown() waits for it
                server.shutdown()
            server.server_close()
        self.servers = []


def registry_for(directory: str | os.PathLike, *collectors) -> CollectorRegistry:
    """What a scrape reads: every process's files in `directory`, and `collectors` (values
    read at the scrape, such as the queue and the store sizes)."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=os.fspath(directory))
    for collector in collectors:
        registry.register(collector)
    return registry
