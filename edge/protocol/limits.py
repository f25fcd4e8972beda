"""Abuse limits (protocol.md §12 item 6). No I/O: the caller passes the time.

- `FailedAuthLimiter`: failed authentications per client address; past the limit the
  address gets HTTP 429 until its window has passed.
- `TokenBucket`: a socket's inbound rate; a burst is fine, sustained excess is not. One
  bucket per socket, spent by its messages (`edge.protocol.session`) and by its pings and pongs
  (`edge.front.HttpConnection`): a flood of control frames costs the edge as much CPU
  per frame as a flood of messages, and is shed the same way (close 1008). A second
  bucket per socket counts the bytes it sends (`edge.front.HttpConnection`, per read):
  a few huge messages cost as much as many small ones.
- `UpgradeRateLimiter`: WebSocket upgrades per client address; past it, HTTP 429.
- `SocketCaps`: sockets one user and one client address hold on this edge; past either
  cap, HTTP 429 before the upgrade.
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
    max_tracked: int = MAX_TRACKED_ADDRESSES  # addresses remembered, oldest first out
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
            while len(self._failures) > self.max_tracked:
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

    def take(self, now: float, count: float = 1) -> bool:
        """Spend `count` tokens (a message: 1; bytes: how many); False when the bucket holds
        fewer (the sender is over its rate), and then nothing is spent."""
        if self.rate_per_s <= 0:
            return True
        if self._tokens < 0:  # first use: a full bucket
            self._tokens, self._at = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def wait_s(self, now: float, count: float = 1) -> float:
        """Seconds until `count` tokens are there (0: now); spends nothing."""
        if self.rate_per_s <= 0:
            return 0.0
        tokens = self.burst if self._tokens < 0 else min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        return max(0.0, (count - tokens) / self.rate_per_s)


@dataclass
class UpgradeRateLimiter:
    """At most `rate_per_s` WebSocket upgrades per client address on average, bursts of
    `burst` (a reconnect storm: every client behind one NAT address at once). A rate of 0
    turns it off. Addresses are remembered least recently used first out, at most
    `max_tracked`: one forgotten starts again with a full bucket, which an
    address idle for burst/rate seconds has anyway."""

    rate_per_s: float
    burst: float
    max_tracked: int = MAX_TRACKED_ADDRESSES
    _buckets: OrderedDict[str, TokenBucket] = field(default_factory=OrderedDict)
    _refusing: set[str] = field(default_factory=set)

    def take(self, address: str, now: float) -> tuple[float, bool]:
        """Spend one upgrade of `address`: (0, False) when it may go on; else (seconds until
        it may, True if this is the first refusal since it was last let in: log it once)."""
        if self.rate_per_s <= 0:
            return 0.0, False
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.rate_per_s, self.burst)
            while len(self._buckets) > self.max_tracked:
                forgotten, _ = self._buckets.popitem(last=False)
                self._refusing.discard(forgotten)
        else:
            self._buckets.move_to_end(address)
        if bucket.take(now):
            self._refusing.discard(address)
            return 0.0, False
        first = address not in self._refusing
        self._refusing.add(address)
        return bucket.wait_s(now), first


# Sockets a user may hold on one edge per room his tier allows: a Mac and an iPhone per
# room, each twice over (a client that reconnects opens its new socket before the edge
# has seen the old one go: it is replaced only once the new one has registered or joined).
SOCKETS_PER_ROOM = 4


def user_socket_limit(floor: int, max_rooms: int) -> int:
    """The sockets one user may hold on one edge (0: no cap): `floor`, or more for a tier
    with many rooms (`SOCKETS_PER_ROOM` each); none for a tier with unlimited rooms, or
    when `floor` is 0 (the cap is off)."""
    if floor <= 0 or max_rooms < 0:
        return 0
    return max(floor, SOCKETS_PER_ROOM * max_rooms)


@dataclass
class SocketCaps:
    """How many sockets each user and each client address holds on this edge, against
    their caps (0: none). A socket is counted from the moment it is let through the checks
    before the 101 (`hold`) until its connection is gone (`release`); the check and the
    count are one step, so upgrades waiting side by side on authentication cannot all
    pass one last free place."""

    per_address: int
    _users: dict[str, int] = field(default_factory=dict)
    _addresses: dict[str, int] = field(default_factory=dict)
    _refusing: set[str] = field(default_factory=set)

    def held(self, user_id: str | None, address: str) -> tuple[int, int]:
        """(sockets of `user_id`, sockets from `address`) held now."""
        return self._users.get(user_id, 0) if user_id is not None else 0, self._addresses.get(address, 0)

    def over(self, user_id: str | None, user_limit: int, address: str) -> str | None:
        """Which cap one more socket would pass: "address", "user", or None. `user_id`
        None: no user cap (not known yet, or every connection is the one local user)."""
        if self.per_address > 0 and self._addresses.get(address, 0) >= self.per_address:
            return "address"
        if user_id is not None and user_limit > 0 and self._users.get(user_id, 0) >= user_limit:
            return "user"
        return None

    def check(self, user_id: str | None, user_limit: int, address: str) -> tuple[str | None, bool]:
        """Whether one more socket may be counted, counting nothing: (None, False) if so;
        else (the cap it would pass, True if this is that cap's first refusal since that
        user or address last had a socket counted or released: log it once)."""
        cap = self.over(user_id, user_limit, address)
        if cap is None:
            return None, False
        key = f"{cap}:{user_id if cap == 'user' else address}"
        first = key not in self._refusing
        self._refusing.add(key)  # bounded: a key stays only while it holds a full cap
        return cap, first

    def hold(self, user_id: str | None, user_limit: int, address: str) -> tuple[str | None, bool]:
        """Count one more socket unless a cap refuses it: (None, False) when counted; else
        what `check` says."""
        cap, first = self.check(user_id, user_limit, address)
        if cap is not None:
            return cap, first
        self._addresses[address] = self._addresses.get(address, 0) + 1
        self._refusing.discard(f"address:{address}")
        if user_id is not None:
            self._users[user_id] = self._users.get(user_id, 0) + 1
            self._refusing.discard(f"user:{user_id}")
        return None, False

    def release(self, user_id: str | None, address: str) -> None:
        """A socket counted by `hold` is gone."""
        self._drop(self._addresses, address)
        self._refusing.discard(f"address:{address}")
        if user_id is not None:
            self._drop(self._users, user_id)
            self._refusing.discard(f"user:{user_id}")

    @staticmethod
    def _drop(counts: dict[str, int], key: str) -> None:
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)
