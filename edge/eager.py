"""Run a coroutine from plain (callback) code, at once, without a task when it need not wait.

Python 3.12 has eager tasks for this; the edge supports 3.11. A coroutine driven here
runs in the caller's stack up to its first real wait. Most never wait (nats-py's
`publish` only appends to the client's buffer), so they cost no task and no trip round
the event loop. One that does wait is handed to a task that resumes it where it stopped.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any


def run_eagerly(
    coro: Coroutine[Any, Any, None],
    create_task: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None],
) -> asyncio.Task[None] | None:
    """Run `coro` now up to its first wait. Returns None if it finished (exceptions are
    raised here), else what `create_task` (the owner's task group) made of the rest."""
    try:
        waiting_for = coro.send(None)
    except StopIteration:
        return None
    return create_task(_resume(coro, waiting_for))


async def _resume(coro: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    """Go on with `coro`, stopped on `waiting_for` (a future, or None for a bare yield),
    as a task would: wake it when the future is done, pass on a cancellation."""
    while True:
        try:
            if waiting_for is None:
                await asyncio.sleep(0)
            else:
                waiting_for._asyncio_future_blocking = False  # what a task does with what it is given
                await asyncio.wait([waiting_for])  # the coroutine reads the result (or error) itself
        except asyncio.CancelledError as cancelled:
            if waiting_for is not None:
                waiting_for.cancel()
            step = functools.partial(coro.throw, cancelled)
        else:
            step = functools.partial(coro.send, None)
        try:
            waiting_for = step()
        except StopIteration:
            return
