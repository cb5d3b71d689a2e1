"""Run a coroutine eagerly: synchronously until it first has to wait.

Most SCSI commands never wait (a pread from the page cache), yet wrapping each in
an ``asyncio.Task`` costs a task object, a trip through the event loop and a
context switch per command.  Python 3.12 has ``asyncio.eager_task_factory`` for
this; on 3.11 :func:`start` does the same for one coroutine: it steps the
coroutine at once and only when it really blocks hands the rest to a task.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


async def resume(coro: Coroutine, yielded: Any) -> Any:
    """Finish ``coro``, which already ran up to a suspension that yielded ``yielded``."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)  # a bare yield: give the loop one turn
            else:
                # We await it ourselves, not a Task: clear the flag the coroutine's own await
                # set, or awaiting it again raises "await wasn't used with future".  At every
                # suspension, not just the first one.
                if isinstance(yielded, asyncio.Future):
                    yielded._asyncio_future_blocking = False
                await yielded  # the future the coroutine is blocked on
        except asyncio.CancelledError as exc:
            # Our task was cancelled: deliver it where the coroutine is waiting.
            if isinstance(yielded, asyncio.Future) and not yielded.done():
                yielded.cancel()
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        except BaseException:
            pass  # the coroutine will see the exception from its own future.result()
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


def finish_later(coro: Coroutine, yielded: Any, loop: asyncio.AbstractEventLoop,
                 wrap: Callable[[Coroutine], Coroutine] | None = None) -> asyncio.Task:
    """The Task that finishes ``coro``, already stepped up to a suspension that yielded
    ``yielded`` (``wrap`` may put a coroutine of its own around that: it gets the rest).

    A Task cancelled before its first step never runs its coroutine, so the cancellation
    would never reach ``coro``: its ``finally`` blocks (a SCSI command's writer count, its
    place in the task set) would wait for the garbage collector, and every ORDERED task
    behind it with them.  When that happens the coroutines are closed at once instead.
    """
    rest = resume(coro, yielded)
    outer = wrap(rest) if wrap is not None else rest
    task = loop.create_task(outer)

    def closed_if_cancelled(t: asyncio.Task) -> None:
        if t.cancelled():
            for c in (outer, rest, coro):
                try:
                    c.close()  # unstarted or finished: nothing; suspended: its finally blocks run
                except RuntimeError:  # it awaited in its finally block: nothing more to do here
                    pass

    task.add_done_callback(closed_if_cancelled)
    return task


def start(coro: Coroutine, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task | None:
    """Step ``coro`` now; None if it finished, else the Task that finishes it.

    Exceptions raised before the first suspension propagate to the caller.
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return finish_later(coro, yielded, loop or asyncio.get_running_loop())
