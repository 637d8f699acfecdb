"""A fair share of a daemon's worker threads for each account.

imapd runs every store call of every session in one pool of threads. Without a share, one
account with many sessions, each running a slow SEARCH, held every thread, and another
user's LOGIN and SELECT waited behind them for minutes (found by an attack on the running
server). Each account may have at most `per_account` calls running or queued for the pool
at once; its further calls wait their turn here, on the event loop, where they cost nothing
and hold no thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class FairShare:
    def __init__(self, per_account: int):
        self.per_account = per_account
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}  # calls holding or awaiting each account's slots

    @asynccontextmanager
    async def slot(self, account: str) -> AsyncIterator[None]:
        semaphore = self._slots.get(account)
        if semaphore is None:
            semaphore = self._slots[account] = asyncio.Semaphore(self.per_account)
        self._users[account] = self._users.get(account, 0) + 1
        try:
            async with semaphore:
                yield
        finally:
            left = self._users[account] - 1
            if left:
                self._users[account] = left
            else:  # nobody holds or awaits it: forget the account
                del self._users[account]
                del self._slots[account]

    def busy(self, account: str) -> int:
        """How many calls of the account hold or await a slot."""
        return self._users.get(account, 0)
