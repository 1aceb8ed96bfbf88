"""Group commit: the creates that arrive together are written as one batch.

Why: on a database whose cost per call dominates (secantusd-py is one Python process,
~0.5 ms of its CPU a call whatever the call does), n concurrent creates that each take an
id and insert a document make n times as many calls and collide on the counter; one `$inc`
of n and one `insert_many` of n cost about as much as one create. So each create request
puts its item in the queue of its kind and awaits its own future; one task writes whatever
is queued as one batch, and while it writes, newly arriving requests queue for the next
one. Nothing waits for a timer: a lone request is written at once (one turn of the event
loop later), and under load a batch holds the requests that arrived during the previous.

The writer returns one outcome per item, a result or the item's own exception, so one bad
request (e.g. a missing deployment) fails alone. The batch runs in a task of its own, so a
client that disconnects (its handler cancelled) does not cancel the others' writes; an item
whose request is gone before its batch starts is not written.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
MAX_BATCH = 256  # items per write: bounds one batch's latency and message size


class Batcher(Generic[T, R]):
    """`await submit(item)`: the item's result, once `write` has written its batch."""

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R | Exception]]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._write, self._max = write, max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # sizes of the last batches written (tests, benches)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await future

    async def aclose(self) -> None:
        """Wait for the batches queued or being written (at shutdown)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                taken, self._queue = self._queue[: self._max], self._queue[self._max :]
                batch = [(item, future) for item, future in taken if not future.done()]
                if not batch:
                    continue
                self.batches = [*self.batches[-99:], len(batch)]
                try:
                    outcomes = await self._write([item for item, _ in batch])
                except Exception as exc:  # the whole batch failed (e.g. the database is down)
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its request was cancelled meanwhile
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
                batch = []
        except BaseException:  # cancelled: nobody may wait forever
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue = []
            raise
        finally:
            self._task = None
