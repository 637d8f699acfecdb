"""How many repetitions a test with a long run makes: a short count in `make test`, the
full one under POSTROOM_TEST_LONG=1 (`make test-long`, which runs the tests marked `long`).

The short count goes through the same code as the full one (the same properties, the same
paths and bounds); what the full count adds is more inputs, more rounds of a race, more
bytes, for the defects that only show on a long run.
"""

from __future__ import annotations

import os

LONG = os.environ.get("POSTROOM_TEST_LONG", "") not in ("", "0")


def count(short: int, full: int) -> int:
    """`full` under POSTROOM_TEST_LONG=1, else `short`."""
    return full if LONG else short
