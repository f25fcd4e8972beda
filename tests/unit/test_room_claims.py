"""The room limit's claims (accounts.claims): pure decisions, no I/O."""

from accounts import claims


def test_a_room_is_claimed_while_fewer_than_max_rooms_others_live():
    rooms = {"A": 100, "B": 100, "C": 100}
    assert claims.claim(rooms, "D", now_ms=50, expires_at=200, max_rooms=4) == {**rooms, "D": 200}
    assert claims.claim({**rooms, "D": 100}, "E", now_ms=50, expires_at=200, max_rooms=4) is None


def test_a_claimed_room_is_claimed_again_past_the_limit_and_its_expiry_slides():
    rooms = {"A": 100, "B": 100}
    assert claims.claim(rooms, "A", now_ms=50, expires_at=300, max_rooms=2) == {"A": 300, "B": 100}
    assert claims.claim(rooms, "A", now_ms=50, expires_at=80, max_rooms=2) == {"A": 100, "B": 100}  # never shortened


def test_expired_claims_count_for_nothing_and_are_dropped():
    rooms = {"A": 10, "B": 100, "C": 10}
    assert claims.live_claims(rooms, now_ms=50) == {"B": 100}
    assert claims.claim(rooms, "D", now_ms=50, expires_at=200, max_rooms=2) == {"B": 100, "D": 200}


def test_force_claims_past_the_limit_and_unlimited_tiers_have_none():
    rooms = {"A": 100}
    assert claims.claim(rooms, "B", now_ms=0, expires_at=100, max_rooms=1) is None
    assert claims.claim(rooms, "B", now_ms=0, expires_at=100, max_rooms=1, force=True) == {"A": 100, "B": 100}
    assert claims.claim(rooms, "B", now_ms=0, expires_at=100, max_rooms=-1) == {"A": 100, "B": 100}
    assert claims.claim({}, "A", now_ms=0, expires_at=100, max_rooms=0) is None


def test_release_drops_the_room_and_the_expired():
    assert claims.release({"A": 100, "B": 100, "C": 1}, "A", now_ms=50) == {"B": 100}
    assert claims.release({"B": 100}, "A", now_ms=50) == {"B": 100}
