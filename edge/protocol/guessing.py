"""Limits on guessing credentials (issue 16 items 6 and 7). No I/O: the caller passes the time.

- `LoginGuard`: failed logins (API keys, refresh tokens) per client address, without
  locking out the owner of a good key who shares the address (a NAT, a proxy, his own
  laptop with an old key in a script).
- `RoomGuessGuard`: failed `join_room`/`register_room` authentications (a wrong room
  secret or pairing token) per room and per user.

Both are per edge and in memory, bounded like `edge.protocol.limits.FailedAuthLimiter` (which
they are made of). Each says when a failure starts a lock-out, so that it is logged once.
Nothing here keeps a key or a secret: keys are remembered by hashes only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

from edge.protocol.limits import FailedAuthLimiter
from edge.protocol.rooms import Outcome
from schemas.client import CloseCode, Error, ErrorCode

#: A key's "prefix" for counting: `rdkey_` and 8 hex digits (`rdrt_` and 9 for a refresh
#: token). A guesser who knows the start of a key and tries its end stays on one prefix.
KEY_PREFIX_CHARS = 14

#: Key hashes remembered as having authenticated on this edge (least recently used first out).
MAX_KNOWN_KEYS = 20_000  # ~3 MB

# What a failure started: a lock-out of one key prefix at one address, of the address, of
# a room (for other accounts than its owner's), of a user.
KEY, ADDRESS, ROOM, USER = "key", "address", "room", "user"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _failed(limiter: FailedAuthLimiter, key: str, now: float) -> bool:
    """Count a failure of `key`; True when it is the one that locks `key` out."""
    before = limiter.retry_after(key, now) > 0
    limiter.failed(key, now)
    return not before and limiter.retry_after(key, now) > 0


@dataclass
class LoginGuard:
    """Failed logins per client address, counted two ways within `window_s`:

    - per address and key prefix, at most `per_key_limit`: past it that key (and any
      other with its prefix) is refused from that address without a look-up, while other
      keys are still looked up: the owner of a good key passes;
    - per address, any keys, at most `per_address_limit` (a guesser trying many keys):
      past it a key is refused from that address without a look-up unless this edge has
      seen it authenticate (`succeeded`): an owner whose key works passes, a guess does
      not (it cannot be a key this edge knows without being a good key).

    0 turns either count off.
    """

    per_key_limit: int
    per_address_limit: int
    window_s: float
    by_key: FailedAuthLimiter = field(init=False)
    by_address: FailedAuthLimiter = field(init=False)
    _known: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.by_key = FailedAuthLimiter(self.per_key_limit, self.window_s)
        self.by_address = FailedAuthLimiter(self.per_address_limit, self.window_s)

    @staticmethod
    def _key_tag(address: str, token: str) -> str:
        return _digest(f"{address}\0{token[:KEY_PREFIX_CHARS]}")

    def retry_after(self, address: str, token: str, now: float) -> float:
        """Seconds until `token` may be tried from `address`; 0 if it may now."""
        wait = self.by_key.retry_after(self._key_tag(address, token), now)
        if _digest(token) not in self._known:
            wait = max(wait, self.by_address.retry_after(address, now))
        return wait

    def failed(self, address: str, token: str, now: float) -> list[str]:
        """Count a failed login with `token` from `address`. Returns the lock-outs it
        started (`KEY`, `ADDRESS`): each is logged once."""
        self._known.pop(_digest(token), None)  # revoked, expired, or its account gone
        started = []
        if _failed(self.by_key, self._key_tag(address, token), now):
            started.append(KEY)
        if _failed(self.by_address, address, now):
            started.append(ADDRESS)
        return started

    def succeeded(self, token: str) -> None:
        """`token` authenticated: a locked-out address may still use it."""
        digest = _digest(token)
        self._known[digest] = None
        self._known.move_to_end(digest)
        while len(self._known) > MAX_KNOWN_KEYS:
            self._known.popitem(last=False)


@dataclass
class RoomGuessGuard:
    """Failed room authentications (wrong secret, wrong, used or expired pairing token)
    within `window_s`, at most `limit` per room and per user (0: no limit).

    - Per user: past it, that user's joins and registers are refused, whatever the room.
    - Per room, counting only users other than the room's owner: past it, other accounts'
      joins of that room are refused. The owner's own devices are never locked out of
      his room by someone else's guesses (only by his own, per user).
    """

    limit: int
    window_s: float
    by_room: FailedAuthLimiter = field(init=False)
    by_user: FailedAuthLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.by_room = FailedAuthLimiter(self.limit, self.window_s)
        self.by_user = FailedAuthLimiter(self.limit, self.window_s)

    def user_retry_after(self, user_id: str, now: float) -> float:
        """Seconds until `user_id` may try a room again; 0 if now."""
        return self.by_user.retry_after(user_id, now)

    def room_retry_after(self, room_id: str, owner_user_id: str | None, user_id: str, now: float) -> float:
        """Seconds until `user_id` may try `room_id` (owned by `owner_user_id`) again; 0 if now."""
        if owner_user_id is None or owner_user_id == user_id:
            return 0.0
        return self.by_room.retry_after(room_id, now)

    def failed(self, room_id: str, owner_user_id: str | None, user_id: str, now: float) -> list[str]:
        """Count a failed authentication of `user_id` to `room_id`. Returns the lock-outs it
        started (`USER`, `ROOM`): each is logged once."""
        started = []
        if _failed(self.by_user, user_id, now):
            started.append(USER)
        if owner_user_id is not None and owner_user_id != user_id and _failed(self.by_room, room_id, now):
            started.append(ROOM)
        return started


#: The close of a socket whose user (or room) is locked out for guessing (the Mac and the
#: iPhone reconnect after their backoff; never AUTH_FAILED for it, which would make a Mac
#: throw its room away, §3.3.7).
LOCKED_OUT_CLOSE = (CloseCode.POLICY, "too many failed room authentications")


def guessed_wrong(outcome: Outcome) -> bool:
    """Whether a register/join was refused for a wrong credential (secret or pairing token)."""
    return not outcome.accepted and any(
        isinstance(reply, Error) and reply.code == ErrorCode.AUTH_FAILED for reply in outcome.replies
    )


def locked_out(wait_s: float) -> Outcome:
    """What a register/join gets while its user (or, for another account, its room) is
    locked out: `error RATE_LIMITED`, then close 1008; nothing is compared or stored."""
    error = Error(
        code=ErrorCode.RATE_LIMITED,
        message=f"Too many failed attempts to authenticate to rooms; try again in {math.ceil(wait_s)} s",
    )
    return Outcome(replies=(error,), close=LOCKED_OUT_CLOSE)


def with_lock_out_close(outcome: Outcome) -> Outcome:
    """A failed outcome that also closes the socket (1008), unless it closes already (4003)."""
    if outcome.close is not None:
        return outcome
    return dataclasses.replace(outcome, close=LOCKED_OUT_CLOSE)
