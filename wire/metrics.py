"""Prometheus metrics: what every daemon process counts ([metrics] listen, docs/metrics.md;
the listener is postroom/metrics.py's).

The metrics are prometheus-client's, in its multiprocess mode: each process (mtad, its
[smtp] workers, imapd, pop3d) writes its values to small mmapped files of its own in one
directory under the data dir, and the one process that serves [metrics] listen sums them
at each scrape (MultiProcessCollector). Writing a value is a few memory stores, no system
call but getpid, so the hot paths (an IMAP command, an SMTP transaction, an fsync) can
count themselves.

The metrics (METRICS) are names and label sets, not state built from the config: the
values live in the per-process files (or, with [metrics] off, in memory, never read). So
they are module-level, as prometheus-client expects, and registered with no registry:
the serving process collects them from the files. `enable(directory)` must run before the
first value is made (the first `.labels()`), in a process that has not made any: it
switches prometheus-client to its file-backed values. Children of that process (forked or
started with its environment) write to the same directory.

Every metric has labels and is made at its first count, so nothing exists before a hot
path first counts, after `enable` has chosen where values go.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: children find the directory in it

# Seconds: from a fraction of a millisecond (an IMAP FETCH FLAGS, an fsync on SSD) to
# minutes (a remote delivery to a slow MX).
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# name: (type, help, labels, options). Made on first use (`_make`): prometheus-client
# takes 50 ms to import, which no admin command (storage imports this module, for its
# fsyncs) should pay for metrics it never counts.
METRICS = {
    "postroom_connections": (
        "counter", "Connections, by service (smtp, submission, submissions, imap, imaps, pop3, pop3s) and result "
        "(accepted; refused: over a connection limit)", ("service", "result"), {}),
    "postroom_connections_open": (
        "gauge", "Connections open now, by service", ("service",), {"multiprocess_mode": "livesum"}),
    "postroom_messages": (
        "counter", "Messages at the end of their data, by service, result (accepted, deferred: a 4xx reply, "
        "refused: a 5xx reply) and reason (the reply's enhanced status code, RFC 3463)",
        ("service", "result", "reason"), {}),
    "postroom_smtp_refusals": (
        "counter", "MAIL FROM and RCPT TO refused, by service, command and reason (the reply's enhanced status "
        "code: 5.1.1 unknown user, 4.7.1 rate or greylist, ...)", ("service", "command", "reason"), {}),
    "postroom_deliveries": (
        "counter", "Deliveries, by kind (local: a received message committed to the store and queue before its "
        "250; remote: one recipient's attempt by the outbound queue) and result", ("kind", "result"), {}),
    "postroom_delivery_seconds": (
        "histogram", "How long a delivery took: local, the commit (files fsynced, index written); remote, the "
        "SMTP transaction with the next hop", ("kind",), {"buckets": SLOW_BUCKETS}),
    "postroom_imap_command_seconds": (
        "histogram", "IMAP commands by name (UID commands as 'UID FETCH'...) and tagged status (OK, NO, BAD), and "
        "how long each took to its tagged response", ("command", "status"), {"buckets": FAST_BUCKETS}),
    "postroom_pop3_command_seconds": (
        "histogram", "POP3 commands by name, and how long each took to its reply", ("command",),
        {"buckets": FAST_BUCKETS}),
    "postroom_logins": (
        "counter", "Logins (IMAP LOGIN/AUTHENTICATE, POP3 USER/PASS and AUTH, SMTP AUTH on submission) by "
        "service and result (ok, failed)", ("service", "result"), {}),
    "postroom_policy_verdicts": (
        "counter", "The policy chain's verdicts, by stage (connect, mail, rcpt, data), verdict (accept, junk, "
        "defer, reject) and reason (rate, spf, dnsbl, greylist, virus, clamd, dmarc, score; empty for accept)",
        ("stage", "verdict", "reason"), {}),
    "postroom_fsync_seconds": (
        "histogram", "fsync(2) latency, by what was synced: message (a message file), directory, queue (a "
        "queued message's file)", ("kind",), {"buckets": FAST_BUCKETS}),
}

_metrics: dict[str, object] = {}
# The children of the metrics, by name and label values: `.labels()` takes a lock and
# builds a tuple each time; a dict lookup is a fraction of that.
_children: dict[tuple, object] = {}
_lock = threading.Lock()  # committer threads count fsyncs while the loop counts commands
_DB_FILE = re.compile(r"_(\d+)\.db$")


def _child(name: str, *labels: str):
    key = (name, labels)
    child = _children.get(key)
    if child is None:
        with _lock:
            metric = _metrics.get(name)
            if metric is None:
                metric = _make(name)
            child = _children[key] = metric.labels(*labels)
    return child


def _make(name: str):
    import prometheus_client

    kind, documentation, labels, options = METRICS[name]
    # Registered nowhere: the serving process reads every process's values from the files.
    made = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
            "histogram": prometheus_client.Histogram}[kind](name, documentation, labels, registry=None, **options)
    _metrics[name] = made
    return made


# -- what the daemons count ------------------------------------------------------------------

def connection(service: str, accepted: bool) -> None:
    _child("postroom_connections", service, "accepted" if accepted else "refused").inc()
    if accepted:
        _child("postroom_connections_open", service).inc()


def connection_closed(service: str) -> None:
    """An accepted connection ended."""
    _child("postroom_connections_open", service).dec()


def message(service: str, code: int, enhanced: str) -> None:
    """The reply to a message's end of data."""
    result = "accepted" if code < 400 else "deferred" if code < 500 else "refused"
    _child("postroom_messages", service, result, enhanced or str(code)).inc()


def refused_command(service: str, command: str, code: int, enhanced: str) -> None:
    _child("postroom_smtp_refusals", service, command, enhanced or str(code)).inc()


def delivery(kind: str, result: str, seconds: float | None = None) -> None:
    _child("postroom_deliveries", kind, result).inc()
    if seconds is not None:
        _child("postroom_delivery_seconds", kind).observe(seconds)


def delivery_time(kind: str, seconds: float) -> None:
    _child("postroom_delivery_seconds", kind).observe(seconds)


def imap_command(command: str, status: str, seconds: float) -> None:
    _child("postroom_imap_command_seconds", command, status).observe(seconds)


def pop3_command(command: str, seconds: float) -> None:
    _child("postroom_pop3_command_seconds", command).observe(seconds)


def login(service: str, ok: bool) -> None:
    _child("postroom_logins", service, "ok" if ok else "failed").inc()


def policy_verdict(stage: str, verdict: str, reason: str = "") -> None:
    _child("postroom_policy_verdicts", stage, verdict, reason).inc()


def fsync(fd: int, kind: str) -> None:
    """os.fsync(fd), timed."""
    started = time.perf_counter()
    os.fsync(fd)
    _child("postroom_fsync_seconds", kind).observe(time.perf_counter() - started)


def fsync_observed(kind: str, seconds: float) -> None:
    """A flush timed by its caller (a checkpoint's syncfs)."""
    _child("postroom_fsync_seconds", kind).observe(seconds)


# -- the process side --------------------------------------------------------------------------

def enable(directory: str | os.PathLike | None) -> None:
    """Where this process and its children keep their values: `directory` (made if
    missing; [metrics] on), or memory (None: [metrics] off, the values are never read).
    Before the first value is made."""
    from prometheus_client import values  # here, in a daemon, and loaded for its children

    _children.clear()
    _metrics.clear()
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
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, os.fspath(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
