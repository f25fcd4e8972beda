"""Waiting between retries: waits that double while failures follow each other."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from runtime.connection import STORAGE_ERRORS

T = TypeVar("T")


class Backoff:
    """The waits between retries: `first`, doubling up to `cap`; `reset()` after a success."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        self.current = first

    def next(self) -> float:
        """The wait before this retry; the one after it is twice as long (up to the cap)."""
        wait = self.current
        self.current = min(self.current * 2, self.cap)
        return wait

    def reset(self) -> None:
        self.current = self.first


async def until_storage_opens(open_once: Callable[[], Awaitable[T]], log: logging.Logger) -> T:
    """Run `open_once` until it gets through, waiting out a JetStream that is not ready yet
    (a cluster elects its leaders for some seconds after it starts)."""
    backoff = Backoff(0.2, 5.0)
    while True:
        try:
            return await open_once()
        except STORAGE_ERRORS as exc:
            wait = backoff.next()
            log.warning("JetStream not ready (%s); retrying in %.1fs", exc or type(exc).__name__, wait)
            await asyncio.sleep(wait)
