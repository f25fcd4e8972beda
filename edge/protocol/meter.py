"""An edge's usage since its last publish (protocol.md §6.1, §12 items 18–19). No I/O.

The hot path adds a forwarded frame's credits to a dict; every flush interval the edge
`tick`s the meter (closing the interval into its window) and publishes `next_batch()`
until it is acknowledged. One batch is in flight at a time and is offered again, the
same batch, until acknowledged: a retry carries the same de-duplication id.
"""

from __future__ import annotations

from metering.windows import period_of
from schemas.metering import UsageBatch, UsageEntry


class UsageMeter:
    """Credits per user and window, counted in memory between publishes."""

    def __init__(self, edge_id: str, boot_id: str, session_ms_per_credit: float, max_entries: int = 1000) -> None:
        self.edge_id = edge_id
        self.boot_id = boot_id
        self._session_ms_per_credit = session_ms_per_credit
        self._max_entries = max_entries
        # Since the last tick, not yet in a window: user → credits.
        self._messages: dict[str, int] = {}
        # Session time not yet a whole credit: user → ms (kept across ticks).
        self._session_ms: dict[str, float] = {}
        # Closed intervals, by window: (user, period) → [message credits, duration credits].
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._interval_start_ms: int | None = None
        self._in_flight: UsageBatch | None = None
        self._seq = 0

    def charge_messages(self, user_id: str, credits: int) -> None:
        """Forwarded frames of `user_id` (on the hot path: one dict update)."""
        self._messages[user_id] = self._messages.get(user_id, 0) + credits

    def refund_messages(self, user_id: str, credits: int) -> None:
        """Take back credits charged for frames that reached nobody. A refund that comes
        after the charge's interval was closed is taken off the user's next charges."""
        self._messages[user_id] = self._messages.get(user_id, 0) - credits

    def add_session_time(self, user_id: str, ms: float) -> None:
        """Time both sides of a room owned by `user_id` were connected."""
        if ms > 0:
            self._session_ms[user_id] = self._session_ms.get(user_id, 0.0) + ms

    def tick(self, now_ms: int) -> None:
        """Close the interval since the last tick into the window it began in.

        The edge ticks at every window boundary too, so an interval lies in one window
        (give or take the milliseconds the tick is late).
        """
        period = period_of(self._interval_start_ms if self._interval_start_ms is not None else now_ms)
        self._interval_start_ms = now_ms
        messages, self._messages = self._messages, {}
        for user_id, credits in messages.items():
            if credits > 0:
                self._pending.setdefault((user_id, period), [0, 0])[0] += credits
            elif credits < 0:  # refunds past what this interval charged: off the next charges
                self._messages[user_id] = credits
        for user_id, ms in list(self._session_ms.items()):
            credits, rest = divmod(ms, self._session_ms_per_credit)
            if credits:
                self._pending.setdefault((user_id, period), [0, 0])[1] += int(credits)
            if rest:
                self._session_ms[user_id] = rest
            else:
                del self._session_ms[user_id]

    def next_batch(self, now_ms: int) -> UsageBatch | None:
        """The batch to publish: the unacknowledged one again, else a new one from what is
        pending (at most `max_entries` entries), else None."""
        if self._in_flight is not None:
            return self._in_flight
        if not self._pending:
            return None
        entries = []
        for key in list(self._pending)[: self._max_entries]:
            messages, duration = self._pending.pop(key)
            entries.append(UsageEntry(key[0], key[1], messages, duration))
        self._seq += 1
        self._in_flight = UsageBatch(edge_id=self.edge_id, boot_id=self.boot_id, seq=self._seq, at_ms=now_ms, entries=entries)
        return self._in_flight

    def acknowledged(self, batch: UsageBatch) -> None:
        """The stream has `batch`: it is metering's now."""
        if self._in_flight is batch:
            self._in_flight = None

    def unpublished_credits(self) -> int:
        """Whole credits not yet acknowledged by the stream (what would be lost now)."""
        total = sum(c for c in self._messages.values() if c > 0) + sum(m + d for m, d in self._pending.values())
        total += sum(int(ms // self._session_ms_per_credit) for ms in self._session_ms.values())
        if self._in_flight is not None:
            total += sum(e.message_tokens + e.duration_tokens for e in self._in_flight.entries)
        return total
