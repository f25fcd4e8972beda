"""Asking every process of a kind at once (scatter-gather over core NATS).

nats-py's `request` takes the first answer only: here one request goes out with an inbox
of its own as reply subject, and every answer that comes back within the time is kept.
"""

from __future__ import annotations

import asyncio
import contextlib

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg


async def gather_answers(nc: NATS, subject: str, timeout_s: float, expected: int | None = None) -> list[bytes]:
    """Every answer to one request on `subject` within `timeout_s`; sooner once `expected`
    answers are in (when the number of answerers is known, e.g. from the leases)."""
    answers: list[bytes] = []
    enough = asyncio.Event()

    async def keep(msg: Msg) -> None:
        answers.append(msg.data)
        if expected is not None and len(answers) >= expected:
            enough.set()

    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox, cb=keep)
    try:
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout_s)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
    return answers
