"""Which processes of this node have a shard's files open, so that the agent detaches a
shard's volume only once none has (issue 18, item 3).

A process that opens anything on a shard's volume (its store's index, a message file being
written or read, the shard's outbound queue: storage/pinning.py lists them) first pins the
shard: a shared flock (LOCK_SH) on `<data_dir>/cluster/<node>.pins/<shard>`, held on one
descriptor a process and shard, counted, and let go when the last of them is closed. The
pin files are on the node's own disk, never on the volume they guard: the volume is what
gets detached, and a lock file on it would be one more file open there. The kernel drops a
flock with its descriptor however the process ends (kill -9 included): a dead process never
holds a pin, and no pin is ever judged stale by guessing.

The agent, releasing a shard (cluster/agent.py), first withdraws its claim and closes its
own handle; the node's daemons then let go within FOLLOW_INTERVAL (cluster/follow.py). The
agent asks for the shard's pin exclusively (LOCK_EX | LOCK_NB every POLL seconds) until it
has it or its wait is over, and holds it while the detach command runs. A pin asked for
meanwhile is refused (NotOwnerError, as for a shard the node does not hold): nothing opens
the volume under the detach. A store asks for the pin before it asks whether the node holds
the shard (storage/store.py), so an open racing the claim's withdrawal is either waited
for or refused.

    pins = process_pins(directory)          # this process's, shared by its store and queues
    release = pins.pin(shard)               # NotOwnerError while the agent detaches it
    release()                               # once; later calls do nothing
    with let_go(directory, shard, deadline) as outcome:    # the agent's
        outcome.all_let_go, outcome.waited, outcome.holders
        ... detach ...
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage import NotOwnerError, held_flocks

POLL = 0.05  # seconds between two asks of the agent for a shard's pin


def _open(directory: Path, shard: int) -> int:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(directory / str(shard), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


class Pins:
    """This process's pins in `directory`: one descriptor a shard, with the count of its
    holders (the store's shard, each file open beyond it, the shard's queue)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()
        self._held: dict[int, list[int]] = {}  # shard -> [descriptor, holders]

    def pin(self, shard: int) -> _Release:
        """Pin `shard` until the returned function is called; NotOwnerError while the
        agent holds it to detach the volume."""
        with self._lock:
            held = self._held.get(shard)
            if held is None:
                fd = _open(self.directory, shard)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise NotOwnerError(f"shard {shard} is not served by this node now") from None
                held = self._held[shard] = [fd, 0]
            held[1] += 1
        return _Release(self, shard)

    def _unpin(self, shard: int) -> None:
        with self._lock:
            held = self._held[shard]
            held[1] -= 1
            if held[1] == 0:
                del self._held[shard]
                os.close(held[0])  # the flock goes with it


class _Release:
    """One holder's end of a pin: calling it lets go, once."""

    __slots__ = ("_pins", "_shard")

    def __init__(self, pins: Pins, shard: int):
        self._pins: Pins | None = pins
        self._shard = shard

    def __call__(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins._unpin(self._shard)


_processes: dict[Path, Pins] = {}
_processes_lock = threading.Lock()


def process_pins(directory: Path) -> Pins:
    """This process's Pins for `directory`, one whoever asks (its store and its queues):
    a descriptor a shard, whatever the number of holders."""
    with _processes_lock:
        pins = _processes.get(directory)
        if pins is None:
            pins = _processes[directory] = Pins(directory)
        return pins


@dataclass(frozen=True)
class LetGo:
    all_let_go: bool  # the agent holds the pin: no process of the node has the shard open
    waited: float  # seconds
    holders: tuple[int, ...] = ()  # when not: the pids still holding it (as /proc/locks says)


@contextmanager
def let_go(directory: Path, shard: int, deadline: float) -> Iterator[LetGo]:
    """The agent's: once every process of the node has let go of `shard` (or at `deadline`,
    CLOCK_MONOTONIC, whichever comes first), the body runs (the detach), holding the pin
    exclusively if it was had, so that nothing pins the shard meanwhile."""
    fd = _open(directory, shard)
    started = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                outcome = LetGo(True, time.monotonic() - started)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    outcome = LetGo(False, time.monotonic() - started, _holders(fd))
                    break
                time.sleep(POLL)
        yield outcome
    finally:
        os.close(fd)


def _holders(fd: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    held = held_flocks() or {}
    return tuple(sorted(held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), ())))
