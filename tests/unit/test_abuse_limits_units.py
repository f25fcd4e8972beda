"""The pure parts of issue 16 items 5 and 9 (edge/protocol/limits.py): bytes in a token bucket,
upgrades per address, sockets per user and per address."""

from __future__ import annotations

import pytest

from edge.protocol import limits
from edge.protocol.limits import SocketCaps, TokenBucket, UpgradeRateLimiter, user_socket_limit
from edge.settings import EdgeSettings
from schemas.tiers import DEFAULT_TIERS

# --- a bucket of bytes ---------------------------------------------------------------------


def test_a_byte_bucket_spends_what_each_read_holds_and_refuses_past_its_burst():
    bucket = TokenBucket(rate_per_s=1000, burst=4000)
    assert bucket.take(0.0, 2500)
    assert bucket.take(0.0, 1500)
    assert not bucket.take(0.0, 1)
    assert bucket.take(1.0, 1000)  # a second at 1000/s
    assert not bucket.take(1.0, 1)


def test_a_refused_count_spends_nothing():
    bucket = TokenBucket(rate_per_s=1000, burst=4000)
    assert not bucket.take(0.0, 5000)
    assert bucket.take(0.0, 4000)


def test_wait_s_says_when_the_tokens_are_back_and_spends_nothing():
    bucket = TokenBucket(rate_per_s=2, burst=2)
    assert bucket.wait_s(0.0) == 0.0  # a fresh bucket is full
    assert bucket.take(0.0) and bucket.take(0.0)
    assert bucket.wait_s(0.0) == pytest.approx(0.5)
    assert bucket.wait_s(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5)
    assert TokenBucket(rate_per_s=0, burst=1).wait_s(0.0) == 0.0


def test_default_byte_rate_is_generous_for_a_macs_output_and_far_below_the_flood():
    s = EdgeSettings()
    # A Mac's heavy output (protocol.md §9): relay_batches of 32 KiB PTY chunks, ~58 kB each
    # as payloads, many a second: twenty a second of one chunk each is ~1.2 MB/s.
    assert s.socket_bytes_per_s >= 6 * 20 * 58_000
    assert s.socket_bytes_burst >= 8 * s.max_frame_bytes  # eight largest frames at once
    assert s.socket_bytes_per_s * 50 < 467 * 1024 * 1024  # far below the flood of issue 16 item 9


def test_a_byte_burst_below_the_largest_frame_is_refused_at_start():
    with pytest.raises(ValueError, match="socket_bytes_burst"):
        EdgeSettings(socket_bytes_burst=1024, max_frame_bytes=2048)
    EdgeSettings(socket_bytes_burst=1024, max_frame_bytes=2048, socket_bytes_per_s=0)  # off: no matter


# --- upgrades per client address -----------------------------------------------------------


def test_upgrades_of_one_address_get_a_burst_then_429_with_the_wait():
    limiter = UpgradeRateLimiter(rate_per_s=10, burst=3)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [(0.0, False)] * 3
    wait, first = limiter.take("a", 0.0)
    assert wait == pytest.approx(0.1) and first
    assert limiter.take("a", 0.0)[1] is False  # logged once per run of refusals
    assert limiter.take("b", 0.0) == (0.0, False)  # another address has its own
    assert limiter.take("a", 0.1) == (0.0, False)  # refilled: let in...
    assert limiter.take("a", 0.1)[1] is True  # ...so the next refusal is a new run


def test_an_upgrade_rate_of_zero_is_no_limit():
    limiter = UpgradeRateLimiter(rate_per_s=0, burst=1)
    assert all(limiter.take("a", 0.0) == (0.0, False) for _ in range(10_000))
    assert not limiter._buckets


def test_upgrade_buckets_are_bounded_and_a_forgotten_address_starts_full():
    limiter = UpgradeRateLimiter(rate_per_s=1, burst=1, max_tracked=3)
    limiter.take("a", 0.0)
    assert limiter.take("a", 0.0)[0] > 0
    for address in "bcd":
        limiter.take(address, 0.0)
    assert len(limiter._buckets) == 3 and "a" not in limiter._buckets and "a" not in limiter._refusing
    assert limiter.take("a", 0.0) == (0.0, False)


# --- sockets per user and per address ------------------------------------------------------


def test_a_users_cap_is_the_setting_or_four_sockets_per_room_of_its_tier():
    free, pro, premium = (DEFAULT_TIERS[name].max_rooms for name in ("free", "pro", "premium"))
    assert user_socket_limit(32, free) == 32  # 4 rooms: 8 sockets in use at most, 16 while reconnecting
    assert user_socket_limit(32, pro) == 128
    assert user_socket_limit(32, premium) == 128
    assert user_socket_limit(32, -1) == 0  # unlimited rooms: no cap
    assert user_socket_limit(0, free) == 0  # the cap off


def test_sockets_are_counted_per_user_and_per_address_and_given_back():
    caps = SocketCaps(per_address=3)
    assert caps.hold("u", 2, "a") == (None, False)
    assert caps.hold("u", 2, "b") == (None, False)
    assert caps.hold("u", 2, "c") == ("user", True)
    assert caps.hold("u", 2, "c") == ("user", False)  # logged once
    assert caps.held("u", "a") == (2, 1)
    assert caps.hold("v", 2, "a") == (None, False)  # another user from the same address
    assert caps.hold("w", 2, "a") == (None, False)
    assert caps.hold("x", 2, "a") == ("address", True)
    assert caps.check(None, 0, "a") == ("address", False)  # the early look, before the user is known
    caps.release("w", "a")
    assert caps.check(None, 0, "a") == (None, False)
    assert caps.hold("x", 2, "a") == (None, False)
    caps.release("u", "a")
    assert caps.hold("u", 2, "c") == (None, False)
    for user, address in (("u", "b"), ("u", "c"), ("v", "a"), ("x", "a")):
        caps.release(user, address)
    assert caps.held("u", "a") == (0, 0)
    assert not caps._users and not caps._addresses and not caps._refusing


def test_no_user_and_zero_caps_count_without_refusing():
    caps = SocketCaps(per_address=0)
    for _ in range(100):
        assert caps.hold(None, 0, "a") == (None, False)  # auth=none: no user cap
        assert caps.hold("u", 0, "a") == (None, False)  # no cap for this user's tier
    assert caps.held("u", "a") == (100, 200)
