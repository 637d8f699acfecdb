"""Mail under fire: senders that behave as real MTAs do (a message not answered 250 is sent
again, with the same Message-ID) while `postroom serve` is killed again and again; then
every message in every mailbox is counted.

Used by tests/test_crash.py (a short run in `make test`) and bench/crash.py (the long one).
A run is a list of phases; in each, the server is started, and every 1-2 s (`interval`)
killed in one way and started again, for the phase's seconds or its number of restarts:
- "kill": SIGKILL to serve alone (its children must die with it, and the port be free);
- "term": SIGTERM (a graceful stop: replies of work done are sent before it ends);
- "group": SIGKILL to serve's whole process group (with `[smtp] workers = 2`).
At the end the senders drain what they have left against a server left running.

What is counted, per mailbox: an acknowledged message stored 0 times (lost) or more than
once (duplicated), and any message with a Message-ID stored more than once (an
at-least-once duplicate: the sender resent one we had stored). `store check` must be clean.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from procs import processes

BIN = Path(sys.executable).parent
POSTROOM = str(BIN / "postroom")
DOMAIN = "crash.test"
USERS = tuple(f"u{i}@{DOMAIN}" for i in range(4))
PASSWORD = "correct horse battery staple"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Phase:
    how: str  # "kill", "term" or "group"
    seconds: float
    workers: int = 1
    restarts: int | None = None  # ends the phase sooner, once it has stopped the server this often


@dataclass
class Outcome:
    sent: int = 0  # distinct messages the senders started
    acknowledged: int = 0
    attempts: int = 0
    restarts: int = 0
    lost: list[int] = field(default_factory=list)  # acknowledged, missing from a mailbox
    duplicated_acknowledged: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)  # any copy beyond the first
    refused: list[str] = field(default_factory=list)  # 5xx answers: never expected
    orphans: list[str] = field(default_factory=list)  # processes that outlived a killed serve
    check_problems: list[str] = field(default_factory=list)
    unfinished: int = 0  # messages still not acknowledged when the drain ended

    def summary(self) -> str:
        return (f"sent {self.sent} messages ({self.attempts} attempts), {self.acknowledged} acknowledged, "
                f"{self.restarts} restarts; acknowledged lost {len(self.lost)}, acknowledged duplicated "
                f"{len(self.duplicated_acknowledged)}, at-least-once duplicates {len(self.duplicated)}, "
                f"5xx {len(self.refused)}, orphans {len(self.orphans)}, store check problems "
                f"{len(self.check_problems)}, unfinished {self.unfinished}")


def message(seq: int) -> tuple[bytes, list[str]]:
    """Message `seq` and its recipients: one in most, two in every fifth (all-or-none)."""
    rng = random.Random(seq)
    recipients = [USERS[seq % len(USERS)]]
    if seq % 5 == 0:
        recipients.append(USERS[(seq + 1) % len(USERS)])
    body = "".join(f"line {i} of message {seq} {'x' * rng.randrange(60)}\r\n" for i in range(rng.randrange(5, 60)))
    raw = (f"From: sender@example.org\r\nTo: {', '.join(recipients)}\r\nSubject: crash {seq}\r\n"
           f"Message-ID: <{seq}.crash@example.org>\r\nX-Seq: {seq}\r\n\r\n{body}").encode()
    return raw, recipients


class Server:
    """`postroom serve` in its own process group, started and killed by the harness."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self, config: Path) -> None:
        self.runs += 1
        sock_dir = tempfile.mkdtemp(prefix="crash-notify-")
        try:
            self._start(config, os.path.join(sock_dir, "notify.sock"))
        finally:
            # Only READY=1 is waited for: later notices (STOPPING=1) find no socket, as
            # they would a closed one (postroom/notify.py drops them). One directory a
            # restart was left in /tmp before: hundreds after a crash run.
            shutil.rmtree(sock_dir, ignore_errors=True)

    def _start(self, config: Path, notify_path: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
            notify_sock.bind(notify_path)
            notify_sock.settimeout(0.2)
            with open(self.workdir / f"serve-{self.runs}.err", "wb") as err:
                self.process = subprocess.Popen(
                    [POSTROOM, "--config", str(config), "serve"], stdout=subprocess.DEVNULL, stderr=err,
                    stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
                    env={**os.environ, "NOTIFY_SOCKET": notify_path})
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"serve exited {self.process.returncode} before READY: "
                                       f"{self.log_tail()}")
                try:
                    if b"READY=1" in notify_sock.recv(4096).split(b"\n"):
                        return
                except socket.timeout:
                    continue
        self.process.kill()
        raise RuntimeError(f"serve not ready within {READY_TIMEOUT}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.workdir / f"serve-{self.runs}.err").read_text(errors="replace")[-2000:]

    def stop(self, how: str) -> list[str]:
        """Stop it the given way; the processes of its group still alive after 10 s."""
        process = self.process
        assert process is not None
        group = process.pid  # its own session, so its own process group
        if how == "group":
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return [f"serve ignored {how} for 60 s"]
        deadline = time.monotonic() + 10
        left = _group_members(group)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = _group_members(group)
        for pid in left:  # the harness ends what it started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"pid {pid} outlived serve ({how})" for pid in left]


def _group_members(group: int) -> list[int]:
    return [pid for pid, p in processes().items() if p.group == group and p.state != "Z"]


class Senders:
    """Threads that send numbered messages until told to stop, each one until it is
    acknowledged: a connection lost or a 4xx means the same message again."""

    def __init__(self, host: str, port: int, clients: int, total: int, outcome: Outcome):
        self.host, self.port = host, port
        self.total = total
        self.outcome = outcome
        self.acknowledged: set[int] = set()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._stop_new = threading.Event()  # start no new message
        self._give_up = threading.Event()  # stop resending too
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self, drain_seconds: float) -> None:
        self._stop_new.set()
        deadline = time.monotonic() + drain_seconds
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._give_up.set()
        for thread in self._threads:
            thread.join(30)

    def _next(self) -> int | None:
        if self._stop_new.is_set():
            return None
        with self._lock:
            seq = next(self._numbers)
            if seq > self.total:
                return None
            self.outcome.sent += 1
            return seq

    def _run(self) -> None:
        while (seq := self._next()) is not None:
            raw, recipients = message(seq)
            while not self._give_up.is_set():
                with self._lock:
                    self.outcome.attempts += 1
                answer = self._send(raw, recipients)
                if answer == 250:
                    with self._lock:
                        self.acknowledged.add(seq)
                    break
                if answer is not None and answer >= 500:
                    with self._lock:
                        self.outcome.refused.append(f"message {seq}: {answer}")
                    break
                time.sleep(0.1)
            else:
                with self._lock:
                    self.outcome.unfinished += 1

    def _send(self, raw: bytes, recipients: list[str]) -> int | None:
        """The final answer to the message, or None if the connection failed first."""
        try:
            with smtplib.SMTP(self.host, self.port, timeout=20) as client:
                client.ehlo("sender.example.org")
                code, _ = client.mail("sender@example.org")
                if code != 250:
                    return code
                for recipient in recipients:
                    code, _ = client.rcpt(recipient)
                    if code != 250:
                        return code
                code, _ = client.data(raw)
                return code
        except smtplib.SMTPResponseException as e:
            return e.smtp_code
        except (OSError, smtplib.SMTPException):
            return None


def prepare(data_dir: Path, config: Path) -> None:
    """The domain and its users, through the accounts API as `postroom user add` makes them
    (five CLI processes would cost the suite's short run seconds)."""
    import conf
    from postroom.datadir import open_accounts

    _, accounts = open_accounts(conf.load(config))
    with accounts:
        accounts.add_domain(DOMAIN)
        for user in USERS:
            accounts.add_user(user, PASSWORD)


def run(configs: dict[int, Path], phases: list[Phase], workdir: Path, *, host: str, port: int, clients: int,
        total: int, budgets: list[int] | None = None, drain_seconds: float = 60.0, seed: int = 20261130,
        interval: tuple[float, float] = (1.0, 2.0), say=lambda text: None) -> Outcome:
    """The phases in order (configs[workers] is the config for each worker count), each for
    its seconds or until `budgets[i]` messages are sent in all, then a drain against a server
    left up, then a graceful stop; the count of every mailbox."""
    rng = random.Random(seed)
    outcome = Outcome()
    server = Server(workdir)
    senders = Senders(host, port, clients, total, outcome)
    server.start(configs[phases[0].workers])
    senders.start()
    for index, phase in enumerate(phases):
        budget = budgets[index] if budgets else total
        say(f"phase {phase.how}, workers = {phase.workers}, until {min(phase.seconds, 10**6):.0f} s "
            f"or {budget} messages sent")
        phase_end = time.monotonic() + phase.seconds
        restarts = 0
        while time.monotonic() < phase_end and outcome.sent < budget and restarts != phase.restarts:
            time.sleep(rng.uniform(*interval))
            outcome.orphans += server.stop(phase.how)
            outcome.restarts += 1
            restarts += 1
            server.start(configs[phase.workers])
        say(f"{outcome.sent} sent, {outcome.restarts} restarts")
    say("draining")
    senders.finish(drain_seconds)
    outcome.orphans += server.stop("term")
    outcome.acknowledged = len(senders.acknowledged)
    _count(configs[1], senders.acknowledged, outcome)
    return outcome


def _count(config: Path, acknowledged: set[int], outcome: Outcome) -> None:
    import conf
    from storage import open_data_dir
    from storage.check import check
    from storage.store import Store

    settings = conf.load(config)
    with Store(open_data_dir(settings.server.data_dir, settings.storage.shards)) as store:
        outcome.check_problems = [str(p) for p in check(store)]
        copies: Counter[tuple[str, int]] = Counter()
        for user in USERS:
            for info in store.fetch(user, "INBOX", [(1, 2**32 - 1)]):
                found = re.search(rb"\r\nX-Seq: (\d+)\r\n", store.read_message(info))
                assert found, f"{user} UID {info.uid} is not one of the harness's messages"
                copies[(user, int(found.group(1)))] += 1
    for seq in sorted(acknowledged):
        for user in message(seq)[1]:
            if copies[(user, seq)] == 0:
                outcome.lost.append(seq)
            elif copies[(user, seq)] > 1:
                outcome.duplicated_acknowledged.append(seq)
    outcome.duplicated = sorted(seq for (_, seq), n in copies.items() for _ in range(n - 1))
