"""Client work admitted at the rate storage answers it, never more (issue 18: a storm must
never collapse).

Every upgrade, register, join and departure costs KV operations. Sent all at once (a
whole fleet reconnecting), they queue inside nats-server and nats-py, every one of them
times out, each retry adds more, and the edge's own lease renewal waits behind them until
the lease is lost. A `Gate` bounds how many of one kind of work talk to storage at once;
the rest wait their turn in arrival order, and what would wait too long (or past a bound
of waiters) is refused at once, before it costs anything: an upgrade with 503, a
register or join with close 1013; both make a client retry after a back-off. Work that
must not be refused (a departure's slot release) only waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass


class Busy(Exception):
    """No place for this work now; try again in `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"busy; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


@dataclass
class GateCounts:
    """What /metrics and the status page read of a gate."""

    admitted: int = 0
    refused: int = 0


class Gate:
    """At most `in_flight` holders at once; up to `max_waiting` more wait in order, each at
    most `max_wait_s` (None: as long as it takes)."""

    def __init__(self, name: str, in_flight: int, max_waiting: int | None, max_wait_s: float | None) -> None:
        self.name = name
        self.limit = max(1, in_flight)
        self.max_waiting = max_waiting  # None: no bound
        self.max_wait_s = max_wait_s
        self.holders = 0
        self.counts = GateCounts()
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """Whether work arriving now would be refused at once."""
        return self.holders >= self.limit and self.max_waiting is not None and len(self._waiters) >= self.max_waiting

    def retry_after_s(self) -> float:
        """A hint for a refused client: about as long as the queue ahead would take, 1 to 10 s."""
        return float(min(10, max(1, math.ceil((self.max_wait_s or 1.0) * self.waiting / max(1, self.max_waiting or 1)))))

    def refuse(self, retry_after_s: float) -> Busy:
        """Count a refusal of this gate's work; the `Busy` to raise."""
        self.counts.refused += 1
        return Busy(retry_after_s)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Hold a place while the body runs; `Busy` if there is none to be had in time."""
        await self._enter()
        try:
            yield
        finally:
            self._leave()

    async def _enter(self) -> None:
        if self.holders < self.limit and not self._waiters:
            self.holders += 1
            self.counts.admitted += 1
            return
        if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
            raise self.refuse(self.retry_after_s())
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            if self.max_wait_s is None:
                await turn
            else:
                async with asyncio.timeout(self.max_wait_s):
                    await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._leave()  # handed a place as the wait ended: give it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(turn)
            if isinstance(exc, TimeoutError):
                raise self.refuse(self.retry_after_s()) from None
            raise
        self.counts.admitted += 1  # the place was handed over: `holders` counts it already

    def _leave(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the place goes to the next in line, still held
                return
        self.holders -= 1


class Gates:
    """The edge's gates, one per kind of client work that costs storage."""

    def __init__(self, upgrades: Gate, room_requests: Gate, departures: Gate) -> None:
        self.upgrades = upgrades
        self.room_requests = room_requests
        self.departures = departures

    def refuse_if_room_requests_full(self) -> None:
        """`Busy` for an upgrade while registers and joins are refused: after a 101 the
        client's back-off starts over, so it would only come back sooner."""
        if self.room_requests.full:
            raise self.upgrades.refuse(self.room_requests.retry_after_s())

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.upgrades, self.room_requests, self.departures))
