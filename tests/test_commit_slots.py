"""Commit slots (storage/slots.py): a slot let go passes to the thread that has waited
longest, never back to the one that let it go, so that no shard's committer waits while
another commits again and again; and a wait that stalls (the holders stuck on a disk) ends
without a slot rather than holding every shard back."""

from __future__ import annotations

import threading
import time

import pytest

from storage.slots import CommitSlots


def wait_for_waiters(slots: CommitSlots, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(slots._waiting) < count:  # the queue's length: no other way to see a thread wait
        assert time.monotonic() < deadline, "a thread never came to wait for its slot"
        time.sleep(0.001)


def test_a_slot_let_go_goes_to_the_thread_that_waited_longest():
    slots = CommitSlots(1, stall=30)
    order: list[object] = []

    def take(name: int) -> None:
        assert slots.take()
        order.append(name)
        slots.give_back()

    assert slots.take()
    threads = []
    for name in range(4):
        threads.append(threading.Thread(target=take, args=(name,)))
        threads[-1].start()
        wait_for_waiters(slots, name + 1)
    slots.give_back()
    assert slots.take()  # the thread that let go asks again at once: it comes after those waiting
    order.append("again")
    slots.give_back()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, "again"]


def test_slots_bound_the_threads_inside():
    slots = CommitSlots(2, stall=30)
    inside = most = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(50):
            assert slots.take()
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.0005)
            with lock:
                inside -= 1
            slots.give_back()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert most == 2 and inside == 0


def test_a_stalled_wait_goes_on_without_a_slot_and_the_count_holds():
    slots = CommitSlots(1, stall=0.1)
    assert slots.take()  # held, as by a committer stuck on a hung volume
    started = time.monotonic()
    assert not slots.take()
    assert 0.1 <= time.monotonic() - started < 5
    assert slots._waiting == type(slots._waiting)()  # it left the queue
    slots.give_back()
    assert slots.take()  # one slot, as before: not lost, not doubled
    assert not slots.take()
    slots.give_back()


def test_no_slot_is_refused():
    with pytest.raises(ValueError):
        CommitSlots(0)
