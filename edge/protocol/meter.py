"""An edge's usage since its last publish (protocol.md §6.1, §12 items 18–19). No I/O.

The hot path adds a forwarded frame's credits to a dict; every flush interval the edge
`tick`s the meter (closing the interval into its window) and publishes `next_batch()`
until it is acknowledged. One batch is in flight at a time and is offered again, the
same batch, until acknowledged: a retry carries the same de-duplication id. A batch
holds the users of one usage partition (`schemas.subjects.usage_partition`): each
partition is applied by one metering process.

Frame charges are held for `refund_window_ms` after their interval closed before they go
into a batch: news that a frame reached nobody (`refund_messages`) comes a round trip
after the charge, and may come after the tick. Nothing negative is ever published, so a
refund that found its charge already published could only come off the user's later
charges, and a user who sends nothing more would stay overcharged.
"""

from __future__ import annotations

from collections import deque

from metering.windows import period_of
from schemas.metering import UsageBatch, UsageEntry
from schemas.subjects import usage_partition


class UsageMeter:
    """Credits per user and window, counted in memory between publishes."""

    def __init__(
        self, edge_id: str, boot_id: str, session_ms_per_credit: float, max_entries: int = 1000, refund_window_ms: int = 0
    ) -> None:
        self.edge_id = edge_id
        self.boot_id = boot_id
        self._session_ms_per_credit = session_ms_per_credit
        self._max_entries = max_entries
        self._refund_window_ms = refund_window_ms
        # Since the last tick, not yet in a window: user → credits.
        self._messages: dict[str, int] = {}
        # Closed intervals' frame charges waiting out the refund window, oldest first:
        # (closed at ms, period, user → credits).
        self._held: deque[tuple[int, str, dict[str, int]]] = deque()
        # Session time not yet a whole credit: user → ms (kept across ticks).
        self._session_ms: dict[str, float] = {}
        # Closed intervals, by partition and window: partition → (user, period) → [message
        # credits, duration credits].
        self._pending: dict[int, dict[tuple[str, str], list[int]]] = {}
        self._interval_start_ms: int | None = None
        self._in_flight: UsageBatch | None = None
        self._seq = 0

    def charge_messages(self, user_id: str, credits: int) -> None:
        """Forwarded frames of `user_id` (on the hot path: one dict update)."""
        self._messages[user_id] = self._messages.get(user_id, 0) + credits

    def refund_messages(self, user_id: str, credits: int) -> None:
        """Take back credits charged for frames that reached nobody: from this interval's
        charges, else from the held ones (newest first). A refund later than the refund
        window, its charge published, is taken off the user's next charges."""
        charged = self._messages.get(user_id, 0)
        if charged > 0:
            taken = min(charged, credits)
            self._messages[user_id] = charged - taken
            credits -= taken
        for _, _, charges in reversed(self._held):
            if not credits:
                return
            held = charges.get(user_id, 0)
            if held > 0:
                taken = min(held, credits)
                charges[user_id] = held - taken
                credits -= taken
        if credits:
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
        charges = {}
        for user_id, credits in messages.items():
            if credits > 0:
                charges[user_id] = credits
            elif credits < 0:  # refunds past what was charged: off the next charges
                self._messages[user_id] = credits
        if charges:
            self._held.append((now_ms, period, charges))
        self._release_held(now_ms - self._refund_window_ms)
        for user_id, ms in list(self._session_ms.items()):
            credits, rest = divmod(ms, self._session_ms_per_credit)
            if credits:
                self._pending_of(user_id).setdefault((user_id, period), [0, 0])[1] += int(credits)
            if rest:
                self._session_ms[user_id] = rest
            else:
                del self._session_ms[user_id]

    def release_held(self) -> None:
        """Every held charge into the batches, whatever its age (at exit: no socket is
        left to be refunded)."""
        self._release_held(None)

    def _release_held(self, closed_by_ms: int | None) -> None:
        while self._held and (closed_by_ms is None or self._held[0][0] <= closed_by_ms):
            _, period, charges = self._held.popleft()
            for user_id, credits in charges.items():
                if credits > 0:
                    self._pending_of(user_id).setdefault((user_id, period), [0, 0])[0] += credits

    def _pending_of(self, user_id: str) -> dict[tuple[str, str], list[int]]:
        partition = usage_partition(user_id)
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = {}
        return pending

    def next_batch(self, now_ms: int) -> UsageBatch | None:
        """The batch to publish: the unacknowledged one again, else a new one from what is
        pending in one partition (at most `max_entries` entries), else None."""
        if self._in_flight is not None:
            return self._in_flight
        if not self._pending:
            return None
        partition, pending = next(iter(self._pending.items()))
        entries = []
        for key in list(pending)[: self._max_entries]:
            messages, duration = pending.pop(key)
            entries.append(UsageEntry(key[0], key[1], messages, duration))
        if not pending:
            del self._pending[partition]
        self._seq += 1
        self._in_flight = UsageBatch(
            edge_id=self.edge_id, boot_id=self.boot_id, seq=self._seq, at_ms=now_ms, entries=entries, partition=partition
        )
        return self._in_flight

    def acknowledged(self, batch: UsageBatch) -> None:
        """The stream has `batch`: it is metering's now."""
        if self._in_flight is batch:
            self._in_flight = None

    def unpublished_credits(self) -> int:
        """Whole credits not yet acknowledged by the stream (what would be lost now)."""
        total = sum(c for c in self._messages.values() if c > 0) + sum(m + d for pending in self._pending.values() for m, d in pending.values())
        total += sum(c for _, _, charges in self._held for c in charges.values() if c > 0)
        total += sum(int(ms // self._session_ms_per_credit) for ms in self._session_ms.values())
        if self._in_flight is not None:
            total += sum(e.message_tokens + e.duration_tokens for e in self._in_flight.entries)
        return total
