"""Waiting requests in this instance: how many may wait, and waking them when jobs change.

A claim with `wait_s` waits here between its attempts. `notify()` (a job was created,
retried or imported through this instance) wakes every waiter at once; any other new due
job (made through another instance, or scheduled and now due) is found by the next
attempt, at most POLL_S later. The limit on waiters is MAX_WAITERS: past it a request is
refused with 503 rather than held.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from .errors import RETRY_AFTER_S, Overloaded

POLL_S = 1.0  # longest time between two attempts of a waiting request


class Wakeups:
    def __init__(self, max_waiters: int) -> None:
        self.max_waiters = max_waiters
        self.waiting = 0
        self._changed: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """Wake every request waiting now."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def wait(self, seconds: float) -> None:
        """Until the next `notify()`, or `seconds` (at most POLL_S)."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), min(seconds, POLL_S))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One waiter's place; 503 when MAX_WAITERS are waiting already."""
        if self.waiting >= self.max_waiters:
            raise Overloaded(
                f"{self.waiting} requests are waiting in this instance already, the most it "
                "holds (MAX_WAITERS); try again later.",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1


WAKEUPS = web.AppKey("wakeups", Wakeups)
