"""Abuse limits (protocol.md §12 item 6). No I/O: the caller passes the time.

- `FailedAuthLimiter`: failed authentications per client address; past the limit the
  address gets HTTP 429 until its window has passed.
- `TokenBucket`: a socket's inbound rate; a burst is fine, sustained excess is not. One
  bucket per socket, spent by its messages (`edge.session`) and by its pings and pongs
  (`edge.front.HttpConnection`): a flood of control frames costs the edge as much CPU
  per frame as a flood of messages, and is shed the same way (close 1008).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

# Addresses remembered at most: a flood of distinct addresses must not grow memory forever.
MAX_TRACKED_ADDRESSES = 20_000  # ~25 MB at most


@dataclass
class FailedAuthLimiter:
    """At most `max_failures` failed authentications per address within `window_s` seconds."""

    max_failures: int
    window_s: float
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until `address` may try again; 0 if it may now."""
        if self.max_failures <= 0:
            return 0.0
        times = self._recent(address, now)
        if times is None or len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window_s - now)

    def failed(self, address: str, now: float) -> None:
        """Record a failed authentication from `address`."""
        if self.max_failures <= 0:
            return
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.max_failures)
            while len(self._failures) > MAX_TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        self._failures.move_to_end(address)
        times.append(now)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times


@dataclass
class TokenBucket:
    """`rate_per_s` messages per second on average, bursts of up to `burst`. A rate of 0 turns it off."""

    rate_per_s: float
    burst: float
    _tokens: float = -1.0
    _at: float = 0.0

    def take(self, now: float) -> bool:
        """Spend one token; False when the bucket is empty (the sender is over its rate)."""
        if self.rate_per_s <= 0:
            return True
        if self._tokens < 0:  # first use: a full bucket
            self._tokens, self._at = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
