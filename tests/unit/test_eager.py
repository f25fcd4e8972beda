"""`run_eagerly`: a coroutine run from plain code, at once, and finished by a task if it waits."""

import asyncio

import pytest

from edge.eager import run_eagerly


async def test_a_coroutine_that_does_not_wait_finishes_before_run_eagerly_returns():
    done = []

    async def append() -> None:
        done.append(1)

    assert run_eagerly(append(), asyncio.create_task) is None
    assert done == [1]


async def test_an_error_before_the_first_wait_is_raised_to_the_caller():
    async def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_eagerly(fail(), asyncio.create_task)


async def test_a_coroutine_that_waits_on_a_future_is_finished_by_a_task_with_the_futures_result():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_then_record() -> None:
        seen.append("before")
        seen.append(await future)

    task = run_eagerly(wait_then_record(), asyncio.create_task)
    assert task is not None and seen == ["before"]
    future.set_result("result")
    await asyncio.wait_for(task, 1)
    assert seen == ["before", "result"]


async def test_a_futures_exception_reaches_the_coroutine_that_awaited_it():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_and_catch() -> None:
        try:
            await future
        except KeyError as exc:
            seen.append(exc)

    task = run_eagerly(wait_and_catch(), asyncio.create_task)
    future.set_exception(KeyError("k"))
    await asyncio.wait_for(task, 1)
    assert len(seen) == 1 and isinstance(seen[0], KeyError)


async def test_a_bare_yield_and_several_waits_in_a_row_are_resumed_in_order():
    seen = []

    async def steps() -> None:
        for n in range(3):
            await asyncio.sleep(0)
            seen.append(n)
        await asyncio.sleep(0.01)
        seen.append("slept")

    task = run_eagerly(steps(), asyncio.create_task)
    assert task is not None
    await asyncio.wait_for(task, 1)
    assert seen == [0, 1, 2, "slept"]


async def test_cancelling_the_task_cancels_what_the_coroutine_waits_for_and_raises_inside_it():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_forever() -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    task = run_eagerly(wait_forever(), asyncio.create_task)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled inside"] and future.cancelled()
