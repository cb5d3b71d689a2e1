"""iscsi.eager.start: synchronous completion, suspension, exceptions and cancellation."""
import asyncio

import pytest

from iscsi import eager


async def test_finishes_synchronously_without_a_task():
    seen = []

    async def quick():
        seen.append(1)
        return 5

    assert eager.start(quick()) is None
    assert seen == [1]


async def test_continues_in_a_task_after_suspension():
    fut = asyncio.get_running_loop().create_future()
    log = []

    async def waits():
        log.append("before")
        value = await fut
        log.append(value)
        await asyncio.sleep(0)
        return value * 2

    task = eager.start(waits())
    assert log == ["before"] and task is not None
    fut.set_result(21)
    assert await task == 42
    assert log == ["before", 21]


async def test_suspends_on_several_futures_in_a_row():
    """Each future the coroutine awaits arrives flagged as blocking by its own await; resume
    must clear the flag every time (once was not enough: the second one raised "await
    wasn't used with future", so a large FUA WRITE in steps failed at its flush)."""
    loop = asyncio.get_running_loop()

    async def waits_three_times():
        await asyncio.sleep(0)  # a bare yield first, like a large WRITE's steps
        total = 0
        for i in range(3):
            fut = loop.create_future()
            loop.call_later(0.01, fut.set_result, i)
            total += await fut
        await asyncio.wait((loop.create_future(),), timeout=0.01)  # a timed-out wait too
        return total

    task = eager.start(waits_three_times())
    assert task is not None
    assert await asyncio.wait_for(task, 2) == 3


async def test_exception_from_awaited_future_reaches_the_coroutine():
    fut = asyncio.get_running_loop().create_future()

    async def waits():
        try:
            await fut
        except ValueError:
            return "handled"

    task = eager.start(waits())
    fut.set_exception(ValueError("x"))
    assert await task == "handled"


async def test_cancellation_is_delivered_inside():
    cleaned = []

    async def waits():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cleaned.append(True)
            raise

    task = eager.start(waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_synchronous_exception_propagates():
    async def bad():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        eager.start(bad())


async def test_to_thread_work_completes():
    async def uses_thread():
        return await asyncio.to_thread(lambda: 7)

    task = eager.start(uses_thread())
    assert await task == 7
