"""The delivery runner: the loop that works the outbound queue.

One runner per data dir (DESIGN.md, Processes), per node in a cluster: every mtad process
(the main one and its [smtp] workers) calls start_runner(), and only the one that holds the
runner lock (a flock, dropped by the kernel however its holder dies; in a cluster one per
node, <data_dir>/runner.<node>.lock) runs the loop; the others try the lock again every
LOCK_RETRY seconds, so a replacement takes over within that when the holder dies.

The runner works a storage.QueueSet: a single node's one queue, or in a cluster the queues
of every shard the node holds now (storage/queues.py). The set opens a shard's queue when
the node claims the shard and closes it when the node releases it, noticed at the loop's
next look (its change value moves with the shards held); mail queued on a shard that
another node held before is found there and sent from here. The limits below count every
queue's deliveries together. The processes without the lock close their released queues
at each try for it, so that a released shard's volume can be detached.

The loop looks at the queue's change counter (Queue.changed(), no file access) at once
when its doorbell rings (storage/doorbell.py: every enqueue, flush and release, in any
process, rings it after its commit), else every POLL seconds while mail moves and every
IDLE_POLL once it has been still a while (a ring lost, a cluster's shards claimed), and
asks for due messages (Queue.due) when it moved or when the earliest next attempt
(Queue.next_due) has come. Each due message is worked by one task:
- its due recipients are grouped by destination (routes.Router.destination: a domain, a
  route's host, or the relay); each group is one SMTP transaction (client.deliver) within
  `[queue] concurrency` transactions in all and `per_destination` to one destination; a
  transaction's slot is free as soon as it ends (its results are recorded after), and the
  next message waiting for that destination starts at once;
- each group's delivered and deferred recipients are recorded (Queue.record, one fsynced
  commit) as soon as its transaction ends, so a crash never sends again what a remote
  acknowledged and we recorded; a deferred recipient's next attempt follows
  `retry_schedule` with up to 10% jitter, and never later than `max_lifetime` after the
  message was queued, when a recipient still deferred bounces (554 5.4.7, RFC 3463);
- bounced recipients are recorded after their failure report is sent (a crash in between
  sends a second report rather than none). A success report ("relayed", RFC 3464 §2.3.3)
  goes when NOTIFY asks for it and the next hop did not take the DSN parameters (a next
  hop that did reports itself); a delay report goes once, for the recipients still
  deferred once the message is older than `delay_warning` (0: never).
One log line per recipient per attempt: qid, rcpt, host, result, reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from conf.logfmt import EventLogger
from conf.schema import Config
from mtad import dsn
from mtad.outbound.client import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    ClientSettings,
    ConnectionCache,
    Message,
    Outcome,
    Recipient,
    RecipientResult,
    deliver,
)
from mtad.outbound.reports import Reporter, status_of
from mtad.outbound.routes import RouteError, Router
from storage import (
    AddressError,
    Doorbell,
    NotOwnerError,
    NotQueuedError,
    Queue,
    QueuedMessage,
    QueueSet,
    RecipientState,
    Result,
    StoreError,
    normalize_domain,
)
from wire import metrics

# Seconds between two looks at the queue's change counter when the doorbell does not ring:
# a read of LMDB's shared map, no system call, so it can be often while mail moves (it
# bounds the start of a delivery whose ring was lost, or whose runner has no doorbell).
# Once the counter has not moved for IDLE_AFTER, the looks are IDLE_POLL apart: at 50 a
# second an idle mtad took 1.9% of a core (16 shards' queues, 2026-12-03).
POLL = 0.02
IDLE_POLL = 0.5
IDLE_AFTER = 10.0
BATCH = 0.01  # the least time between two looks for due mail
THREADS = 32
IN_FLIGHT_PER_TRANSACTION = 4  # messages under way (recording included) per allowed transaction
MAX_SLEEP = 30.0  # the longest the loop goes without asking the queue for due mail
LOOP_EXIT = 5.0  # seconds the loop may take to see a stop (one look at the queue)
LOCK_RETRY = 2.0  # seconds between two tries for the runner lock, by the processes without it
JITTER = 0.10
REST = 60.0  # seconds a message whose work failed unexpectedly waits before the next try

_log = EventLogger("mtad.outbound")


@dataclass
class _Group:
    """The recipients of one message that go to one destination in one transaction."""

    destination: str
    domains: list[str]
    recipients: list[RecipientState]
    done: bool = False  # its transaction is over: it no longer counts against per_destination


class Runner:
    """Works the queue while run() runs; `clock` and `rng` are the tests' and the jitter's."""

    def __init__(self, config: Config, queue: Queue | QueueSet, reporter: Reporter, *, router: Router | None = None,
                 settings: ClientSettings | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, doorbell: Doorbell | None = None):
        self.config = config
        self.queue = queue
        self.doorbell = doorbell  # rung by whoever makes mail due (storage/doorbell.py)
        self.reporter = reporter
        self.router = router or Router(config.outbound, config.dns)
        self.settings = settings or ClientSettings.from_config(config)
        self.clock = clock
        self.rng = rng or random.Random()
        q = config.queue
        self._connections = asyncio.Semaphore(q.concurrency)
        self._per_destination: dict[str, asyncio.Semaphore] = {}
        self._load: dict[str, int] = {}  # groups scheduled per destination, running or waiting
        self._in_flight: dict[str, asyncio.Task] = {}
        self._resting: dict[str, float] = {}  # qid -> until when: its last work failed (a full disk)
        self._waiting: list[QueuedMessage] = []  # due at the last look, not started for want of room
        # [queue] concurrency counts transactions (connections), not messages whose results
        # are being recorded (an fsync each, shared): those are bounded apart, to bound the
        # files and memory they hold.
        self._busy = 0  # transactions scheduled and not over
        self._max_in_flight = IN_FLIGHT_PER_TRANSACTION * q.concurrency
        self._wake = asyncio.Event()
        self._stopping = False
        self._sessions = ConnectionCache()  # open connections between messages to one host
        # The queue's calls block (a record waits for its fsync; the last close of a file the
        # queue removed frees it, 0.7 ms on a busy disk): threads of the runner's own, enough
        # that the records of many deliveries wait together and share one commit (the queue's
        # group commit), instead of asyncio's default pool of cores + 4.
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="outbound")

    async def run(self) -> None:
        """Until stop(): take due mail, start its deliveries."""
        loop = asyncio.get_running_loop()
        # The doorbell is the runner's until run() returns (RunnerHandle.stop closes it after).
        bell = self.doorbell.fileno() if self.doorbell is not None else None
        if bell is not None:
            loop.add_reader(bell, self._rung, loop, bell)
        try:
            await self._run()
        finally:
            if bell is not None:
                loop.remove_reader(bell)

    def _rung(self, loop: asyncio.AbstractEventLoop, bell: int) -> None:
        try:
            self.doorbell.drain()
        except OSError as e:  # it would fire again at once, for ever: the polls go on alone
            loop.remove_reader(bell)
            _log.error("doorbell_failed", error=str(e))
        self._wake.set()  # looks stay BATCH apart, as for a finished delivery's wake

    async def _run(self) -> None:
        last_change = None
        wake_at = 0.0
        changed_at = -math.inf  # a runner starts quiet: its first look is not a change
        while not self._stopping:
            woken = self._wake.is_set()  # a ring, a transaction over, a delivery done
            self._wake.clear()
            change = self.queue.changed()  # never raises: an unreadable queue's is -1
            now = self.clock()
            if last_change is not None and change != last_change:
                changed_at = now
            if woken or change != last_change or now >= wake_at:
                last_change = change
                try:
                    await self._schedule(now)
                    next_due = await self._blocking(self.queue.next_due)
                except StoreError as e:
                    _log.error("queue_unreadable", reason=str(e))
                    next_due = None
                wake_at = min(next_due if next_due is not None else now + MAX_SLEEP, now + MAX_SLEEP)
                if wake_at <= now:
                    # Due mail this look started or left waiting for a slot (a delivery under
                    # way is due until recorded): its end wakes the loop. Looking again at
                    # every poll meanwhile decoded the due mail 30 times a second while a
                    # slow remote took its time.
                    wake_at = now + IDLE_POLL
                # Each look decodes the due messages: under load, one look per BATCH takes
                # what has come meanwhile together, instead of one look per finished delivery.
                await asyncio.sleep(BATCH)
            if not self._wake.is_set():
                poll = POLL if self.clock() - changed_at < IDLE_AFTER else min(IDLE_POLL, max(wake_at - now, POLL))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)

    def _blocking(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._threads, function, *args)

    async def stop(self, grace: float) -> None:
        """No new delivery; those under way get `grace` seconds to finish (and record)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._in_flight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Once run() has returned: the cached connections, the threads."""
        self._sessions.close()
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown, True)

    async def _schedule(self, now: float) -> None:
        """Ask the queue for due mail (a look), then start what the limits allow."""
        free = self.config.queue.concurrency - self._busy
        if free <= 0 or len(self._in_flight) >= self._max_in_flight:
            return
        # Messages under way are still due until recorded: the queue passes over them.
        in_flight = frozenset(self._in_flight)
        due = await self._blocking(functools.partial(self.queue.due, now, self.config.queue.concurrency,
                                                     exclude=in_flight))
        self._waiting = [m for m in due if m.id not in self._in_flight]
        self._start_waiting(now)

    def _start_waiting(self, now: float | None = None) -> None:
        """Start the due messages of the last look whose destinations have room; the others
        wait, for the end of a transaction to one of their destinations (qmgr's way: a
        finished delivery starts the next at once, not at the next look) or the next look."""
        if self._stopping:
            return
        now = self.clock() if now is None else now
        concurrency, per_destination = self.config.queue.concurrency, self.config.queue.per_destination
        left = []
        for message in self._waiting:
            if message.id in self._in_flight or self._resting.get(message.id, 0) > now:
                continue
            if self._busy >= concurrency or len(self._in_flight) >= self._max_in_flight:
                left.append(message)
                continue
            groups = self._groups(message, now)
            if not groups:
                continue
            if all(self._load.get(g.destination, 0) >= per_destination for g in groups):
                left.append(message)
                continue
            for group in groups:
                self._load[group.destination] = self._load.get(group.destination, 0) + 1
            self._busy += len(groups)
            task = asyncio.create_task(self._work(message, groups, now))
            self._in_flight[message.id] = task
            task.add_done_callback(lambda _, qid=message.id, g=groups: self._done(qid, g))
        self._waiting = left

    def _done(self, qid: str, groups: list[_Group]) -> None:
        self._in_flight.pop(qid, None)
        for group in groups:
            self._transaction_over(group)
        if len(self._resting) > 1000:
            now = self.clock()
            self._resting = {qid: until for qid, until in self._resting.items() if until > now}
        self._wake.set()

    def _transaction_over(self, group: _Group) -> None:
        """The group's connection is closed: the next message for its destination may start
        while this one's results are still being recorded (an fsync)."""
        if group.done:
            return
        group.done = True
        self._busy -= 1
        left = self._load.get(group.destination, 1) - 1
        if left > 0:
            self._load[group.destination] = left
        else:
            self._load.pop(group.destination, None)
            self._per_destination.pop(group.destination, None)
        self._start_waiting()
        self._wake.set()

    def _groups(self, message: QueuedMessage, now: float) -> list[_Group]:
        groups: dict[str, _Group] = {}
        for recipient in message.pending:
            if recipient.next_attempt > now:
                continue
            domain = _domain_of(recipient.address)
            destination = self.router.destination(domain)
            group = groups.setdefault(destination, _Group(destination, [], []))
            if domain not in group.domains:
                group.domains.append(domain)
            group.recipients.append(recipient)
        return list(groups.values())

    # -- one message -------------------------------------------------------------------

    async def _work(self, message: QueuedMessage, groups: list[_Group], started: float) -> None:
        log = _log.bind(qid=message.id)
        try:
            await self._work_on(message, groups, log)
        except NotQueuedError:
            pass  # removed meanwhile (`postroom queue remove`)
        except (StoreError, OSError):
            # The queue could not record (disk full...): the message is still due; it rests first.
            log.error("queue_record_failed", exc_info=True)
            self._resting[message.id] = self.clock() + REST
        except Exception:
            log.error("runner_bug", exc_info=True)
            self._resting[message.id] = self.clock() + REST

    async def _work_on(self, message: QueuedMessage, groups: list[_Group], log: EventLogger) -> None:
        original = await self._blocking(self.queue.open, message.id)
        try:
            # The first group sends from `original`; any other opens the message for itself,
            # as they send at once. The reports read `original` after every group is done.
            attempts = await asyncio.gather(*(self._attempt(message, group, log, original if i == 0 else None)
                                              for i, group in enumerate(groups)), return_exceptions=True)
            bounced: list[tuple[RecipientState, Result]] = []
            relayed: list[tuple[RecipientState, Result]] = []
            deferred: list[tuple[RecipientState, Result]] = []
            for group, attempt in zip(groups, attempts, strict=True):
                if isinstance(attempt, BaseException):
                    if isinstance(attempt, asyncio.CancelledError):
                        raise attempt
                    if isinstance(attempt, NotOwnerError):
                        # A cluster's shard handed over during the transaction: its outcome
                        # cannot be recorded here, and the next owner tries those recipients again.
                        log.warning("record_refused", rcpt=",".join(r.address for r in group.recipients),
                                    reason=str(attempt))
                        self._resting[message.id] = self.clock() + REST
                        continue
                    # Its recipients stay due, unrecorded: the message rests before it is tried again.
                    log.error("delivery_failed", exc_info=(type(attempt), attempt, attempt.__traceback__))
                    self._resting[message.id] = self.clock() + REST
                    continue
                for recipient, result, dsn_passed in attempt:
                    if result.state == BOUNCED:
                        bounced.append((recipient, result))
                    elif result.state == DELIVERED and not dsn_passed:
                        relayed.append((recipient, result))
                    elif result.state == DEFERRED:
                        deferred.append((recipient, result))
            await self._report_and_record(message, bounced, relayed, deferred, original, log)
        finally:
            await self._blocking(original.close)

    async def _attempt(self, message: QueuedMessage, group: _Group, log: EventLogger, reader: BinaryIO | None
                       ) -> list[tuple[RecipientState, Result, bool]]:
        """One transaction for `group`; its delivered and deferred recipients recorded."""
        semaphore = self._per_destination.setdefault(
            group.destination, asyncio.Semaphore(self.config.queue.per_destination))
        try:
            async with self._connections, semaphore:
                started = time.perf_counter()
                outcome = await self._transact(message, group, reader)
                metrics.delivery_time("remote", time.perf_counter() - started)
        finally:
            self._transaction_over(group)
        now = self.clock()
        by_address = {r.address: r for r in outcome.results}
        done: list[tuple[RecipientState, Result, bool]] = []
        for recipient in group.recipients:
            got = by_address[recipient.address]
            result = self._result(message, recipient, got.state, got.reply, got.remote_mta, now)
            log.info("delivery", rcpt=recipient.address, host=str(outcome.host) if outcome.host else "-",
                     result=result.state, reply=result.reply, attempt=recipient.attempts + 1,
                     delay=round(now - message.created, 3), tls=outcome.tls)
            metrics.delivery("remote", result.state)
            done.append((recipient, result, outcome.dsn))
        settled = [result for _, result, _ in done if result.state != BOUNCED]
        if settled:
            await self._blocking(self.queue.record, message.id, settled)
        return done

    async def _transact(self, message: QueuedMessage, group: _Group, reader: BinaryIO | None) -> Outcome:
        envelope = message.envelope
        recipients = tuple(Recipient(r.address, r.notify, r.orcpt) for r in group.recipients)
        try:
            route = await self.router.route(group.domains[0])
        except RouteError as e:
            return Outcome(tuple(RecipientResult(r.address, e.code, e.reply) for r in recipients))
        own = await self._blocking(self.queue.open, message.id) if reader is None else None
        source = reader if own is None else own
        try:
            outgoing = Message(envelope.sender, recipients, message.size, lambda: _Rewound(source),
                               envelope.envid, envelope.ret, envelope.smtputf8, envelope.eight_bit)
            verified = any(d in self.settings.require_verified for d in group.domains)
            return await deliver(route, outgoing, self.settings, verified=verified, cache=self._sessions)
        finally:
            if own is not None:
                await self._blocking(own.close)

    def _result(self, message: QueuedMessage, recipient: RecipientState, state: str, reply: str,
                remote_mta: str | None, now: float) -> Result:
        if state != DEFERRED:
            return Result(recipient.address, state, reply, remote_mta)
        q = self.config.queue
        expires = message.created + float(q.max_lifetime)
        if now >= expires:
            # RFC 5321 §4.5.4.1: give up; the last answer is in the text.
            return Result(recipient.address, BOUNCED,
                          f"554 5.4.7 delivery time expired ({_age(now - message.created)}); last reply: {reply}",
                          remote_mta)
        schedule = q.retry_schedule
        wait = float(schedule[min(recipient.attempts, len(schedule) - 1)]) if schedule else 300.0
        wait *= 1 + self.rng.uniform(0, JITTER)
        return Result(recipient.address, DEFERRED, reply, remote_mta, min(now + wait, expires))

    async def _report_and_record(self, message: QueuedMessage, bounced, relayed, deferred, original: BinaryIO,
                                 log: EventLogger) -> None:
        now = self.clock()
        q = self.config.queue
        failed = [(r, res) for r, res in bounced if dsn.wants_report(r.notify, "failed")]
        if failed:
            await self._report(message, failed, "failed", original, now)
        if bounced:
            await self._blocking(self.queue.record, message.id, [res for _, res in bounced])
        success = [(r, res) for r, res in relayed if dsn.wants_report(r.notify, "relayed")]
        if success:
            await self._report(message, success, "relayed", original, now)
        if deferred and q.delay_warning > 0 and now - message.created >= float(q.delay_warning):
            current = await self._blocking(self.queue.get, message.id)
            if current is not None and not current.delay_warned:
                late = [(r, res) for r, res in deferred if dsn.wants_report(r.notify, "delayed")]
                if late:
                    await self._report(message, late, "delayed", original, now)
                await self._blocking(self.queue.mark_delay_warned, message.id)

    async def _report(self, message: QueuedMessage, items: list[tuple[RecipientState, Result]], action: str,
                      original: BinaryIO, now: float) -> None:
        until = message.created + float(self.config.queue.max_lifetime) if action == "delayed" else None
        reports = [dsn.RecipientReport(address=r.address, orcpt=r.orcpt, action=action,
                                       status=status_of(res.reply), diagnostic=f"smtp; {res.reply}",
                                       remote_mta=res.remote_mta, last_attempt=now, will_retry_until=until)
                   for r, res in items]
        try:
            await self._blocking(self.reporter.send, message, reports, original, now)
        except Exception:
            # The recipients' state is recorded all the same: a report lost is logged, never retried forever.
            _log.error("dsn_failed", qid=message.id, action=action, exc_info=True)


class _Rewound:
    """The group's open message, from its first byte, for each host tried; not closed by
    the client (the group closes it)."""

    def __init__(self, reader: BinaryIO):
        self._reader = reader

    def __enter__(self) -> BinaryIO:
        self._reader.seek(0)
        return self._reader

    def __exit__(self, *exc: object) -> None:
        pass


class RunnerHandle:
    """What mtad holds: stop() ends the lock retries or the runner."""

    def __init__(self, task: asyncio.Task, state: dict[str, Any], grace: float):
        self._task = task
        self._state = state
        self._grace = grace

    @property
    def running(self) -> bool:
        return self._state.get("runner") is not None

    async def stop(self) -> None:
        runner: Runner | None = self._state.get("runner")
        self._state["stopping"] = True
        if runner is not None:
            await runner.stop(self._grace)
            # Its loop sees the stop at its next turn (a look at the queue finishes first).
            await asyncio.wait({self._task}, timeout=LOOP_EXIT)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if runner is not None:
            await runner.close()
        doorbell = self._state.get("doorbell")
        if doorbell is not None:
            doorbell.close()  # before the lock: the next runner binds its own
        lock = self._state.get("lock")
        if lock is not None:
            lock.release()
        own = self._state.get("own_queue")
        if own is not None:
            own.close()


def start_runner(context: Any, queue: QueueSet | None = None) -> RunnerHandle:
    """Start trying for the runner lock in this process, and run the loop once it is ours.
    `context` is the daemon's (postroom/daemons.py Context: config, data_dir, accounts,
    store); `queue` this process's QueueSet (one per process: LMDB), a single node's made
    here if not given."""
    config: Config = context.config
    state: dict[str, Any] = {}

    async def hold_and_run() -> None:
        nonlocal queue
        if queue is None:
            queue = QueueSet(context.data_dir)
            state["own_queue"] = queue
        lock = queue.runner_lock()
        while not state.get("stopping"):
            if await asyncio.to_thread(lock.acquire):
                break
            try:  # not the runner: still, the queues of shards released are let go
                await asyncio.to_thread(queue.release_gone)
            except Exception:
                _log.error("queue_release_failed", exc_info=True)
            await asyncio.sleep(LOCK_RETRY)
        else:
            return
        state["lock"] = lock
        try:
            state["doorbell"] = Doorbell(lock.path)
        except OSError as e:  # the runner polls instead: mail due from another process waits for a look
            _log.warning("doorbell_unavailable", error=str(e))
        # Loading the system's CA certificates takes a tenth of a second: not in the loop.
        settings = await asyncio.to_thread(ClientSettings.from_config, config)
        from mtad.srs import SRS, load_secret

        srs = SRS(await asyncio.to_thread(load_secret, config.srs, context.data_dir),
                  config.srs.domain or config.server.hostname)
        if state.get("stopping"):
            return
        reporter = Reporter(config.server.hostname, queue, context.store, context.accounts, unwrap=srs.reverse)
        runner = Runner(config, queue, reporter, settings=settings, doorbell=state.get("doorbell"))
        state["runner"] = runner
        _log.info("runner_started")
        try:
            await runner.run()
        except Exception:
            _log.error("runner_bug", exc_info=True)
            raise

    task = asyncio.create_task(hold_and_run())
    return RunnerHandle(task, state, float(config.server.stop_grace))


@functools.lru_cache(maxsize=4096)
def _domain_of(address: str) -> str:
    domain = address.rpartition("@")[2]
    if domain.startswith("["):
        return domain.lower()
    try:
        return normalize_domain(domain)
    except AddressError:
        return domain.lower()


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} hours"
