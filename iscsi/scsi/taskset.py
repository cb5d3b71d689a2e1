"""The task set of one logical unit: SIMPLE, ORDERED and HEAD OF QUEUE (SAM-5 §8.6, §8.7).

Rules implemented (SAM-5 §8.7.2-8.7.4, with the Control mode page's QUEUE ALGORITHM
MODIFIER = 1, unrestricted reordering of SIMPLE tasks):

- a SIMPLE task may run as soon as every ORDERED task received before it has completed;
- an ORDERED task runs only after every task received before it has completed, and
  every task received after it (but HEAD OF QUEUE) waits for it;
- a HEAD OF QUEUE task runs at once; ORDERED tasks received later still wait for it.

Commands whose handlers never await complete inside one event-loop step, so they are
finished by the time any later command is looked at; only commands that really
suspend (flush, COMPARE AND WRITE, persistent reservations...) are tracked here.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from .types import ScsiResult, TaskAttr


class TaskSet:
    __slots__ = ("_ordered", "_ordered_all", "_inflight")

    def __init__(self) -> None:
        # Barrier of SIMPLE tasks: done once the newest ORDERED task *and every ORDERED task
        # received before it* have completed (SAM-5 §8.7.2).
        self._ordered: asyncio.Future | None = None
        # Barrier of ORDERED tasks: done once the newest ORDERED task and every task received
        # before it have completed (SAM-5 §8.7.3).  Both differ from the newest ORDERED task's
        # own completion only when that task was aborted while it waited: the tasks it was
        # waiting for still order the ones received after it.
        self._ordered_all: asyncio.Future | None = None
        self._inflight: set[asyncio.Future] = set()  # non-ORDERED tasks received after it

    @property
    def blocked(self) -> bool:
        """True while an ORDERED task is waiting or running: new SIMPLE tasks must queue."""
        return self._ordered is not None

    def __len__(self) -> int:
        return len(self._inflight) + (self._ordered is not None)

    def _begin(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._inflight.add(fut)
        return fut

    def _end(self, fut: asyncio.Future) -> None:
        self._inflight.discard(fut)
        if not fut.done():
            fut.set_result(None)

    async def track(self, pending: Awaitable[ScsiResult]) -> ScsiResult:
        """Finish a SIMPLE task whose handler returned an awaitable (the fast path's slow tail)."""
        fut = self._begin()
        try:
            return await pending
        finally:
            self._end(fut)

    async def run(self, attr: int, start: Callable[[], ScsiResult | Awaitable[ScsiResult]]) -> ScsiResult:
        """Run ``start()`` under the ordering rules of ``attr``."""
        if attr == TaskAttr.ORDERED:
            return await self._run_ordered(start)
        fut = self._begin()
        try:
            if attr != TaskAttr.HEAD_OF_QUEUE:
                barrier = self._ordered
                if barrier is not None:
                    await asyncio.wait((barrier,))
            result = start()
            if not isinstance(result, ScsiResult):
                result = await result
            return result
        finally:
            self._end(fut)

    async def _run_ordered(self, start) -> ScsiResult:
        earlier = list(self._inflight)
        if self._ordered_all is not None:
            earlier.append(self._ordered_all)
        earlier_ordered = [self._ordered] if self._ordered is not None else []
        loop = asyncio.get_running_loop()
        me = self._ordered = loop.create_future()
        me_all = self._ordered_all = loop.create_future()
        self._inflight = set()
        try:
            if earlier:
                await asyncio.wait(earlier)
            result = start()
            if not isinstance(result, ScsiResult):
                result = await result
            return result
        finally:
            # Completed or aborted.  Without an abort everything it waited for is done by now
            # and both barriers open at once.
            self._open_when_done(earlier_ordered, me, "_ordered")
            self._open_when_done(earlier, me_all, "_ordered_all")

    def _open_when_done(self, futures: list[asyncio.Future], barrier: asyncio.Future, slot: str) -> None:
        """Complete ``barrier`` once all of ``futures`` are done (at once if they are), and
        then stop naming it in ``slot`` if it is still the newest one there."""

        def open_barrier() -> None:
            if not barrier.done():
                barrier.set_result(None)
            if getattr(self, slot) is barrier:
                setattr(self, slot, None)

        pending = [f for f in futures if not f.done()]
        if not pending:
            open_barrier()
            return
        left = [len(pending)]

        def one_done(_: asyncio.Future) -> None:
            left[0] -= 1
            if not left[0]:
                open_barrier()

        for f in pending:
            f.add_done_callback(one_done)

    def release_all(self) -> None:
        """Unblock everything (LOGICAL UNIT RESET: the aborted tasks no longer order anyone)."""
        for fut in list(self._inflight):
            if not fut.done():
                fut.set_result(None)
        for fut in (self._ordered, self._ordered_all):
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._inflight = set()
        self._ordered = None
        self._ordered_all = None
