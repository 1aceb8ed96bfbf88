"""Waiting requests in this instance: how many may wait, and waking waiting claims.

A claim with `wait_s` waits here between its attempts. `notify()` (a PENDING job appeared:
created, retried or imported through any instance, seen by service/changes.py's stream, or
through this one) wakes every waiting claim at once; a scheduled job that becomes due is
found by the next attempt, at most POLL_S later. Claims and GETs with `wait_s` share the
limit MAX_WAITERS: past it a request is refused with 503 rather than held.
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
        self.waiters = Limit(max_waiters, "requests are waiting", "MAX_WAITERS")
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

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """One waiter's place (claims and GETs with wait_s); 503 beyond MAX_WAITERS."""
        return self.waiters.slot()


class Limit:
    """At most `most` of something at once in this instance; one more gets 503."""

    def __init__(self, most: int, what: str, setting: str) -> None:
        self.most, self.what, self.setting = most, what, setting
        self.used = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.used >= self.most:
            raise Overloaded(
                f"{self.used} {self.what} in this instance already, the most it holds "
                f"({self.setting}); try again later.",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.used += 1
        try:
            yield
        finally:
            self.used -= 1


WAKEUPS = web.AppKey("wakeups", Wakeups)
