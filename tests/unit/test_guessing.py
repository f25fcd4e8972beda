"""Limits on guessing (edge.protocol.guessing): pure decisions, no I/O."""

from edge.protocol import guessing
from edge.protocol.guessing import LoginGuard, RoomGuessGuard
from edge.protocol.rooms import Outcome
from schemas.client import Error, ErrorCode, RoomRegistered

WRONG, GOOD = "rdkey_" + "1" * 32, "rdkey_" + "2" * 32


def test_a_wrong_key_is_locked_out_per_address_and_prefix_and_other_keys_are_not():
    guard = LoginGuard(per_key_limit=2, per_address_limit=0, window_s=60)
    assert guard.failed("a", WRONG, 0.0) == []
    assert guard.failed("a", WRONG, 1.0) == [guessing.KEY]  # the lock-out starts: log it
    assert guard.retry_after("a", WRONG, 2.0) == 58.0
    assert guard.retry_after("a", "rdkey_" + "1" * 8 + "f" * 24, 2.0) > 0  # same prefix, same guesser
    assert guard.retry_after("a", GOOD, 2.0) == 0  # the owner's key is still looked up
    assert guard.retry_after("b", WRONG, 2.0) == 0  # another address
    assert guard.retry_after("a", WRONG, 60.5) == 0  # the window passed


def test_many_keys_lock_an_address_out_but_for_keys_seen_to_work():
    guard = LoginGuard(per_key_limit=10, per_address_limit=3, window_s=60)
    guard.succeeded(GOOD)
    started = [guard.failed("a", f"rdkey_{n:032x}", float(n)) for n in range(3)]
    assert started == [[], [], [guessing.ADDRESS]]
    assert guard.retry_after("a", "rdkey_" + "9" * 32, 3.0) == 57.0
    assert guard.retry_after("a", GOOD, 3.0) == 0
    guard.failed("a", GOOD, 4.0)  # it stopped working (revoked): no longer let through
    assert guard.retry_after("a", GOOD, 5.0) > 0


def test_a_lock_out_is_reported_once_until_it_ends():
    guard = LoginGuard(per_key_limit=1, per_address_limit=0, window_s=10)
    assert guard.failed("a", WRONG, 0.0) == [guessing.KEY]
    assert guard.failed("a", WRONG, 1.0) == []  # (refused unchecked in the edge; counted here anyway)
    assert guard.failed("a", WRONG, 30.0) == [guessing.KEY]  # a new lock-out


def test_zero_limits_lock_nothing_out():
    guard = LoginGuard(per_key_limit=0, per_address_limit=0, window_s=60)
    assert all(guard.failed("a", WRONG, float(t)) == [] for t in range(100))
    assert guard.retry_after("a", WRONG, 100.0) == 0
    rooms = RoomGuessGuard(limit=0, window_s=60)
    assert all(rooms.failed("R", "owner", "u", float(t)) == [] for t in range(100))
    assert rooms.user_retry_after("u", 100.0) == 0


def test_room_guesses_lock_out_the_user_and_the_room_for_other_accounts_only():
    guard = RoomGuessGuard(limit=2, window_s=60)
    assert guard.failed("R", "owner", "guesser", 0.0) == []
    assert guard.failed("R", "owner", "guesser", 1.0) == [guessing.USER, guessing.ROOM]
    assert guard.user_retry_after("guesser", 2.0) == 58.0
    assert guard.room_retry_after("R", "owner", "someone", 2.0) == 58.0
    assert guard.room_retry_after("R", "owner", "owner", 2.0) == 0  # the owner's own devices
    assert guard.user_retry_after("owner", 2.0) == 0
    assert guard.room_retry_after("S", "owner", "someone", 2.0) == 0


def test_the_owners_own_failures_count_against_him_not_his_room():
    guard = RoomGuessGuard(limit=2, window_s=60)
    assert guard.failed("R", "owner", "owner", 0.0) == []
    assert guard.failed("R", "owner", "owner", 1.0) == [guessing.USER]
    assert guard.room_retry_after("R", "owner", "someone", 2.0) == 0


def test_only_a_wrong_credential_counts_as_a_guess_and_a_lock_out_closes_1008():
    auth_failed = Outcome(replies=(Error(code=ErrorCode.AUTH_FAILED, message="Room secret mismatch"),))
    assert guessing.guessed_wrong(auth_failed)
    assert not guessing.guessed_wrong(Outcome(replies=(Error(code=ErrorCode.ROOM_NOT_FOUND, message="x"),)))
    assert not guessing.guessed_wrong(Outcome(replies=(RoomRegistered(room_id="R"),), accepted=True))
    assert guessing.with_lock_out_close(auth_failed).close == guessing.LOCKED_OUT_CLOSE
    closing = Outcome(replies=auth_failed.replies, close=(4003, "auth failed"))
    assert guessing.with_lock_out_close(closing).close == (4003, "auth failed")
    refusal = guessing.locked_out(2.5)
    assert refusal.replies[0].code == ErrorCode.RATE_LIMITED and "3 s" in refusal.replies[0].message
    assert refusal.close == (1008, "too many failed room authentications") and refusal.record is None
