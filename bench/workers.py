"""Shared by the benchmarks: a fixed amount of work spread over a few threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def spread(work: Callable[[int], None], count: int, threads: int, *, setup: Callable[[], object] | None = None,
           teardown: Callable[[object], None] | None = None) -> float:
    """Call work(i) for every i in range(count), from `threads` threads; the seconds taken.
    With `setup`, each thread first makes its own resource (a connection) and calls
    work(i, resource); `teardown(resource)` ends it."""
    todo = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run() -> None:
        resource = setup() if setup else None
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                work(i, resource) if setup else work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            if teardown is not None and resource is not None:
                teardown(resource)

    started = time.perf_counter()
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started
