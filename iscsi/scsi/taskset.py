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
        self._ordered: asyncio.Future | None = None  # completion of the newest ORDERED task
        # Completion of the newest ORDERED task *and of every task received before it*.  The
        # same as ``_ordered`` unless that ORDERED task was aborted while it waited: the
        # next ORDERED task must still wait for the older ones (SAM-5 §8.7.3).
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
        loop = asyncio.get_running_loop()
        me = loop.create_future()
        me_all = loop.create_future()
        self._ordered = me
        self._ordered_all = me_all
        self._inflight = set()
        try:
            if earlier:
                await asyncio.wait(earlier)
            result = start()
            if not isinstance(result, ScsiResult):
                result = await result
            return result
        finally:
            # Done (or aborted): SIMPLE tasks received after it may run (SAM-5 §8.7.2).
            if not me.done():
                me.set_result(None)
            if self._ordered is me:
                self._ordered = None
            self._resolve_when_done(earlier, me_all)

    def _resolve_when_done(self, futures: list[asyncio.Future], target: asyncio.Future) -> None:
        """Complete ``target`` once every one of ``futures`` is done (at once if they are)."""
        pending = [f for f in futures if not f.done()]

        def finish(_=None) -> None:
            if not target.done():
                target.set_result(None)
            if self._ordered_all is target:
                self._ordered_all = None

        if not pending:
            finish()
            return
        left = [len(pending)]

        def one_done(_: asyncio.Future) -> None:
            left[0] -= 1
            if not left[0]:
                finish()

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
