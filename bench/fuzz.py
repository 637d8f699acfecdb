"""Long fuzzing runs of the protocol cores: the properties of tests/test_fuzz_cores.py (SMTP
session, IMAP framer and parser, POP3 core), with far more examples than `make test` gives
them.

    bench/fuzz.py [--examples N | --minutes M] [--only SUBSTRING] [--seed S]

--examples N (default 20,000) runs each property with N examples; --minutes M instead
shares M minutes among them, running batches of examples with fresh seeds until each one's
share is spent. Every run is random (not derandomized, no example database) unless --seed
fixes it. Prints one line per property: examples run, time taken, and "ok" or the
falsifying example, which hypothesis prints in full; exits 1 if any property failed.
Each defect found gets a plain regression test in tests/test_fuzz_cores.py.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_fuzz_cores  # noqa: E402 - the properties live with the tests

BATCH = 2000  # examples per run under --minutes


def properties(only: str | None) -> list:
    found = [test for name, test in vars(test_fuzz_cores).items()
             if name.startswith("test_") and hasattr(test, "check")]
    return [test for test in found if not only or only in test.__name__]


class Fuzzed:
    """One property, and how many times its check has run (shrinking a failure counts)."""

    def __init__(self, test):
        self.name, self.calls = test.__name__, 0

        def counted(*args, **kwargs):
            self.calls += 1
            return test.check(*args, **kwargs)

        functools.update_wrapper(counted, test.check)  # given() reads the check's signature
        self.counted, self.strategies = counted, test.strategies

    def run(self, examples: int, fixed_seed: int | None) -> None:
        """Up to `examples` examples (hypothesis stops early when it has tried all it can
        generate); raises on the first falsifying one, after shrinking it."""
        runner = settings(max_examples=examples, deadline=datetime.timedelta(seconds=10), derandomize=False,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
            given(**self.strategies)(self.counted))  # a new test each run: settings apply once
        if fixed_seed is not None:
            runner = seed(fixed_seed)(runner)
        runner()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--examples", type=int, default=20_000, help="examples per property")
    budget.add_argument("--minutes", type=float, help="wall time shared among the properties")
    parser.add_argument("--only", help="run only the properties whose name holds this")
    parser.add_argument("--seed", type=int, help="a fixed seed, to repeat a run")
    args = parser.parse_args()
    tests = properties(args.only)
    if not tests:
        parser.error(f"no property matches {args.only!r}")
    share = args.minutes * 60 / len(tests) if args.minutes else None
    print(f"fuzzing {len(tests)} properties, " + (f"{share:.0f} s each" if share else f"{args.examples} examples each"),
          flush=True)
    failed = 0
    for test in tests:
        fuzzed, start, batch = Fuzzed(test), time.monotonic(), 0
        try:
            while batch == 0 or (share is not None and time.monotonic() - start < share):
                fuzzed.run(args.examples if share is None else BATCH, None if args.seed is None else args.seed + batch)
                batch += 1
            outcome = "ok"
        except Exception:  # noqa: BLE001 - a falsifying example: report it and go on to the next property
            failed += 1
            outcome = "FAILED\n" + traceback.format_exc()
        print(f"{fuzzed.name}: {fuzzed.calls} examples in {time.monotonic() - start:.1f} s: {outcome}", flush=True)
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
