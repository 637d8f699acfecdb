"""Prometheus metrics: what every daemon process counts, and the HTTP listener that serves
them ([metrics] listen, docs/metrics.md).

The metrics are prometheus-client's, in its multiprocess mode: each process (mtad, its
[smtp] workers, imapd, pop3d) writes its values to small mmapped files of its own in one
directory under the data dir, and the one process that serves [metrics] listen sums them
at each scrape (MultiProcessCollector). Writing a value is a few memory stores, no system
call but getpid, so the hot paths (an IMAP command, an SMTP transaction, an fsync) can
count themselves.

The metric objects below are names and label sets, not state built from the config: the
values live in the per-process files (or, with [metrics] off, in memory, never read). So
they are module-level, as prometheus-client expects, and registered with no registry:
the serving process collects them from the files. `enable(directory)` must run before the
first value is made (the first `.labels()`), in a process that has not made any: it
switches prometheus-client to its file-backed values. Children of that process (forked or
started with its environment) write to the same directory.

Every metric has labels, so no value exists before a hot path first counts: nothing is
made at import, before `enable` has chosen where values go.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
import socketserver
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: children find the directory in it

# Seconds: from a fraction of a millisecond (an IMAP FETCH FLAGS, an fsync on SSD) to
# minutes (a remote delivery to a slow MX).
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONNECTIONS = Counter(
    "postroom_connections", "Connections, by service (smtp, submission, submissions, imap, imaps, pop3, "
    "pop3s) and result (accepted; refused: over a connection limit or a policy's connection rate)",
    ["service", "result"], registry=None)
CONNECTIONS_OPEN = Gauge(
    "postroom_connections_open", "Connections open now, by service", ["service"], registry=None,
    multiprocess_mode="livesum")
MESSAGES = Counter(
    "postroom_messages", "Messages at the end of their data, by service, result (accepted, deferred: a 4xx "
    "reply, refused: a 5xx reply) and reason (the reply's enhanced status code, RFC 3463)",
    ["service", "result", "reason"], registry=None)
REFUSED_COMMANDS = Counter(
    "postroom_smtp_refusals", "MAIL FROM and RCPT TO refused, by service, command and reason (the reply's "
    "enhanced status code: 5.1.1 unknown user, 4.7.1 rate or greylist, ...)",
    ["service", "command", "reason"], registry=None)
DELIVERIES = Counter(
    "postroom_deliveries", "Deliveries, by kind (local: a received message committed to the store and queue "
    "before its 250; remote: one recipient's attempt by the outbound queue) and result",
    ["kind", "result"], registry=None)
DELIVERY_SECONDS = Histogram(
    "postroom_delivery_seconds", "How long a delivery took: local, the commit (files fsynced, index "
    "written); remote, the SMTP transaction with the next hop", ["kind"], registry=None, buckets=SLOW_BUCKETS)
IMAP_COMMAND_SECONDS = Histogram(
    "postroom_imap_command_seconds", "IMAP commands by name (UID commands as 'UID FETCH'...) and tagged "
    "status (OK, NO, BAD), and how long each took to its tagged response", ["command", "status"],
    registry=None, buckets=FAST_BUCKETS)
POP3_COMMAND_SECONDS = Histogram(
    "postroom_pop3_command_seconds", "POP3 commands by name, and how long each took to its reply",
    ["command"], registry=None, buckets=FAST_BUCKETS)
LOGINS = Counter(
    "postroom_logins", "Logins (IMAP LOGIN/AUTHENTICATE, POP3 USER/PASS and AUTH, SMTP AUTH on submission) by "
    "service and result (ok, failed)", ["service", "result"], registry=None)
POLICY_VERDICTS = Counter(
    "postroom_policy_verdicts", "The policy chain's verdicts, by stage (connect, mail, rcpt, data), verdict "
    "(accept, junk, defer, reject) and reason (rate, spf, dnsbl, greylist, virus, clamd, dmarc, score; "
    "empty for accept)", ["stage", "verdict", "reason"], registry=None)
FSYNC_SECONDS = Histogram(
    "postroom_fsync_seconds", "fsync(2) latency, by what was synced: message (a message file), directory, "
    "queue (a queued message's file)", ["kind"], registry=None, buckets=FAST_BUCKETS)

ALL = (CONNECTIONS, CONNECTIONS_OPEN, MESSAGES, REFUSED_COMMANDS, DELIVERIES, DELIVERY_SECONDS,
       IMAP_COMMAND_SECONDS, POP3_COMMAND_SECONDS, LOGINS, POLICY_VERDICTS, FSYNC_SECONDS)

# The children of the hot paths' metrics, by label values: `.labels()` takes a lock and
# builds a tuple each time; a dict lookup is a fraction of that.
_children: dict[tuple, object] = {}
_DB_FILE = re.compile(r"_(\d+)\.db$")


def _child(metric, *labels: str):
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


# -- what the daemons count ------------------------------------------------------------------

def connection(service: str, accepted: bool) -> None:
    _child(CONNECTIONS, service, "accepted" if accepted else "refused").inc()
    if accepted:
        _child(CONNECTIONS_OPEN, service).inc()


def connection_closed(service: str) -> None:
    """An accepted connection ended."""
    _child(CONNECTIONS_OPEN, service).dec()


def message(service: str, code: int, enhanced: str) -> None:
    """The reply to a message's end of data."""
    result = "accepted" if code < 400 else "deferred" if code < 500 else "refused"
    _child(MESSAGES, service, result, enhanced or str(code)).inc()


def refused_command(service: str, command: str, code: int, enhanced: str) -> None:
    _child(REFUSED_COMMANDS, service, command, enhanced or str(code)).inc()


def delivery(kind: str, result: str, seconds: float | None = None) -> None:
    _child(DELIVERIES, kind, result).inc()
    if seconds is not None:
        _child(DELIVERY_SECONDS, kind).observe(seconds)


def delivery_time(kind: str, seconds: float) -> None:
    _child(DELIVERY_SECONDS, kind).observe(seconds)


def imap_command(command: str, status: str, seconds: float) -> None:
    _child(IMAP_COMMAND_SECONDS, command, status).observe(seconds)


def pop3_command(command: str, seconds: float) -> None:
    _child(POP3_COMMAND_SECONDS, command).observe(seconds)


def login(service: str, ok: bool) -> None:
    _child(LOGINS, service, "ok" if ok else "failed").inc()


def policy_verdict(stage: str, verdict: str, reason: str = "") -> None:
    _child(POLICY_VERDICTS, stage, verdict, reason).inc()


def fsync(fd: int, kind: str) -> None:
    """os.fsync(fd), timed."""
    started = time.perf_counter()
    os.fsync(fd)
    _child(FSYNC_SECONDS, kind).observe(time.perf_counter() - started)


# -- the process side --------------------------------------------------------------------------

def enable(directory: str | os.PathLike | None) -> None:
    """Where this process and its children keep their values: `directory` (made if
    missing; [metrics] on), or memory (None: [metrics] off, the values are never read).
    Before the first value is made."""
    _children.clear()
    if directory is None:
        os.environ.pop(ENVIRONMENT, None)  # one inherited from a shell must not send us there
        values.ValueClass = values.MutexValue
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.environ[ENVIRONMENT] = os.fspath(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus-client reads the environment once, at its import; this process may
        # have imported it before the config said where the data dir is.
        values.ValueClass = values.MultiProcessValue()


def remove_dead(directory: str | os.PathLike, *, everything: bool = False) -> int:
    """Remove the files of processes that no longer run (all files with `everything`: at
    serve's start nothing of a previous run counts). Counters of a process that died are
    kept while the others run (a restarted imapd's counts must not go back), and dropped
    here, when a process starts: Prometheus reads that as a counter reset."""
    removed = 0
    for path in glob.glob(os.path.join(os.fspath(directory), "*.db")):
        m = _DB_FILE.search(path)
        if m is None:
            continue
        if everything or not _alive(int(m.group(1))):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def process_died(directory: str | os.PathLike, pid: int) -> None:
    """A child ended: its open-connection gauges stop counting (its counters stay)."""
    mark_process_dead(pid, os.fspath(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        """A scrape every 15 s is not an event worth a log line."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up a stop

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
