"""Room logic (edge/rooms.py): register, join, release, idle cleanup.

Pure functions, so every test builds a record, calls one function and checks the
returned `Outcome` field by field (protocol.md §4.3–§4.8, §12 items 8–14, 17).
"""

from __future__ import annotations

import msgspec
import pytest

from edge.protocol import rooms
from schemas.client import Error, ErrorCode, JoinRoom, PeerJoined, RegisterRoom, RoomRegistered
from schemas.edge_events import PeerJoinedEvent
from schemas.records import RoomRecord, SlotHolder

ROOM = "K7X2M9QD4A"
SECRET = "a" * 64
NEW_SECRET = "b" * 64
TOKEN = "c" * 64
OTHER_TOKEN = "d" * 64
MAC_KEY = "MacIdentityKey" + "A" * 29 + "="
MAC_KEY_2 = "MacIdentityKey2" + "A" * 28 + "="
IOS_KEY = "IosIdentityKey" + "B" * 29 + "="
T0 = 1_776_000_000_000  # epoch ms
IDLE_MS = 600_000


# --- builders ----------------------------------------------------------------------


def holder(socket_id: str, edge: str = "e1", boot: str = "b1", user: str = "u1") -> SlotHolder:
    return SlotHolder(socket_id=socket_id, edge_id=edge, boot_id=boot, user_id=user)


def alive(holder_: SlotHolder) -> bool:
    return True


def dead(holder_: SlotHolder) -> bool:
    return False


def alive_only(*socket_ids: str):
    return lambda h: h.socket_id in socket_ids


def reg(**fields) -> RegisterRoom:
    base = dict(room_id=ROOM, secret_hash=SECRET, public_key=MAC_KEY, session_nonce="mac-nonce-1", ephemeral_key="mac-eph-1")
    return RegisterRoom(**{**base, **fields})


def joinmsg(**fields) -> JoinRoom:
    base = dict(room_id=ROOM, public_key=IOS_KEY, secret_hash=SECRET, session_nonce="ios-nonce-1", ephemeral_key="ios-eph-1")
    return JoinRoom(**{**base, **fields})


def room(**fields) -> RoomRecord:
    """A registered room: Mac `m1` connected, no iOS, unless `fields` say otherwise."""
    base = dict(
        room_id=ROOM,
        owner_user_id="u1",
        secret_hash=SECRET,
        mac_public_key=MAC_KEY,
        created_at=T0,
        last_activity_at=T0,
        mac_session_nonce="mac-nonce-1",
        mac_ephemeral_key="mac-eph-1",
        mac=holder("m1"),
    )
    return RoomRecord(**{**base, **fields})


def with_ios(**fields) -> RoomRecord:
    """A room where Mac `m1` is registered and iOS `i1` has joined."""
    base = dict(
        ios_public_key=IOS_KEY,
        ios_session_nonce="ios-nonce-1",
        ios_ephemeral_key="ios-eph-1",
        ios=holder("i1", edge="e2"),
    )
    return room(**{**base, **fields})


def copy(record: RoomRecord) -> RoomRecord:
    return msgspec.structs.replace(record)


def assert_failed(outcome: rooms.Outcome, code: str, close: int | None = None) -> Error:
    """A refusal: one error reply, nothing written, nobody notified or evicted."""
    assert outcome.record is None
    assert outcome.accepted is False
    assert outcome.peer is None
    assert outcome.notify_peer is None
    assert outcome.evict is None
    assert len(outcome.replies) == 1
    (error,) = outcome.replies
    assert isinstance(error, Error)
    assert error.code == code
    if close is None:
        assert outcome.close is None
    else:
        assert outcome.close is not None and outcome.close[0] == close
    return error


# --- register_room (§4.3, §12 items 8–10) --------------------------------------------


def test_first_register_creates_room_owned_by_registering_user_with_mac_slot():
    mac = holder("m1", user="u7")
    out = rooms.register(None, reg(), mac, T0, alive)
    assert out.accepted is True
    assert out.record == RoomRecord(
        room_id=ROOM,
        owner_user_id="u7",
        secret_hash=SECRET,
        mac_public_key=MAC_KEY,
        created_at=T0,
        last_activity_at=T0,
        mac_session_nonce="mac-nonce-1",
        mac_ephemeral_key="mac-eph-1",
        mac=mac,
    )
    assert out.replies == (RoomRegistered(room_id=ROOM, max_sessions=None),)
    assert (out.peer, out.notify_peer, out.evict, out.close) == (None, None, None, None)


def test_room_registered_reply_carries_max_sessions():
    out = rooms.register(None, reg(), holder("m1"), T0, alive, max_sessions=32)
    assert out.replies == (RoomRegistered(room_id=ROOM, max_sessions=32),)


def test_first_register_stores_pairing_hash_unused_with_expiry_in_unix_seconds():
    out = rooms.register(None, reg(pairing_token_hash=TOKEN, pairing_token_expires_at=1_776_000_300), holder("m1"), T0, alive)
    assert out.record.pairing_token_hash == TOKEN
    assert out.record.pairing_token_used is False
    assert out.record.pairing_token_expires_at == 1_776_000_300


@pytest.mark.parametrize("empty", [None, ""])
def test_register_with_absent_or_empty_nonce_and_ephemeral_stores_empty_strings(empty):
    out = rooms.register(None, reg(session_nonce=empty, ephemeral_key=empty), holder("m1"), T0, alive)
    assert out.record.mac_session_nonce == ""
    assert out.record.mac_ephemeral_key == ""


def test_register_with_other_secret_gives_auth_failed_and_changes_nothing():
    record = room(mac=None)
    before = copy(record)
    out = rooms.register(record, reg(secret_hash=NEW_SECRET), holder("m2"), T0 + 1, alive)
    error = assert_failed(out, ErrorCode.AUTH_FAILED)
    assert error.message == "Room secret mismatch"
    assert record == before


def test_register_with_other_secret_does_not_evict_the_registered_mac():
    out = rooms.register(with_ios(), reg(secret_hash=NEW_SECRET), holder("m2"), T0 + 1, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED)


def test_register_by_other_account_gives_account_mismatch():
    out = rooms.register(room(mac=None), reg(), holder("m2", user="intruder"), T0 + 1, alive)
    error = assert_failed(out, ErrorCode.ACCOUNT_MISMATCH)
    assert "different account" in error.message


def test_register_with_changed_public_key_and_matching_secret_is_accepted():
    out = rooms.register(room(mac=None), reg(public_key=MAC_KEY_2), holder("m2"), T0 + 1, alive)
    assert out.accepted is True
    assert out.record.mac_public_key == MAC_KEY_2
    assert out.record.secret_hash == SECRET
    assert out.replies == (RoomRegistered(room_id=ROOM),)


def test_register_from_new_socket_stores_new_per_connection_keys_and_takes_slot():
    record = room(mac=None, last_activity_at=T0)
    m2 = holder("m2", edge="e9", boot="b9")
    out = rooms.register(record, reg(session_nonce="mac-nonce-2", ephemeral_key="mac-eph-2"), m2, T0 + 5, alive)
    assert out.record.mac == m2
    assert out.record.mac_session_nonce == "mac-nonce-2"
    assert out.record.mac_ephemeral_key == "mac-eph-2"
    assert out.record.last_activity_at == T0 + 5
    assert out.record.created_at == T0
    assert out.record.owner_user_id == "u1"


def test_register_from_new_socket_keeps_ios_identity_fields():
    record = with_ios(ios=None)
    out = rooms.register(record, reg(), holder("m2"), T0 + 1, alive)
    assert (out.record.ios_public_key, out.record.ios_session_nonce, out.record.ios_ephemeral_key) == (
        IOS_KEY,
        "ios-nonce-1",
        "ios-eph-1",
    )


def test_register_same_socket_rotation_updates_secret_and_sends_no_peer_joined():
    record = with_ios()
    out = rooms.register(record, reg(secret_hash=NEW_SECRET, ephemeral_key=""), holder("m1"), T0 + 1, alive)
    assert out.accepted is True
    assert out.record.secret_hash == NEW_SECRET
    assert out.replies == (RoomRegistered(room_id=ROOM),)
    assert out.notify_peer is None
    assert out.evict is None
    assert out.peer == holder("i1", edge="e2")  # frames keep flowing to the joined iPhone
    assert out.record.mac == holder("m1")


def test_same_socket_register_with_changed_key_and_matching_secret_sends_no_peer_joined():
    out = rooms.register(with_ios(), reg(public_key=MAC_KEY_2), holder("m1"), T0 + 1, alive)
    assert out.accepted is True
    assert out.record.mac_public_key == MAC_KEY_2
    assert out.replies == (RoomRegistered(room_id=ROOM),)
    assert out.notify_peer is None
    assert out.evict is None
    assert out.peer == holder("i1", edge="e2")


def test_rotation_with_empty_nonce_and_ephemeral_keeps_stored_values():
    out = rooms.register(with_ios(), reg(secret_hash=NEW_SECRET, session_nonce="", ephemeral_key=""), holder("m1"), T0 + 1, alive)
    assert out.record.mac_session_nonce == "mac-nonce-1"
    assert out.record.mac_ephemeral_key == "mac-eph-1"


def test_rotation_with_absent_nonce_and_ephemeral_keeps_stored_values():
    out = rooms.register(with_ios(), reg(secret_hash=NEW_SECRET, session_nonce=None, ephemeral_key=None), holder("m1"), T0 + 1, alive)
    assert out.record.mac_session_nonce == "mac-nonce-1"
    assert out.record.mac_ephemeral_key == "mac-eph-1"


def test_rotation_without_pairing_fields_leaves_pairing_state_alone():
    record = with_ios(pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=1_776_000_300)
    out = rooms.register(record, reg(secret_hash=NEW_SECRET, ephemeral_key=""), holder("m1"), T0 + 1, alive)
    assert out.record.pairing_token_hash == TOKEN
    assert out.record.pairing_token_used is True
    assert out.record.pairing_token_expires_at == 1_776_000_300


def test_same_socket_register_with_new_pairing_hash_stores_it_unused():
    record = room(pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=100)
    out = rooms.register(record, reg(pairing_token_hash=OTHER_TOKEN, pairing_token_expires_at=200), holder("m1"), T0 + 1, alive)
    assert out.accepted is True
    assert out.record.pairing_token_hash == OTHER_TOKEN
    assert out.record.pairing_token_used is False
    assert out.record.pairing_token_expires_at == 200


def test_register_from_new_socket_without_pairing_fields_clears_pairing_hash():
    record = room(mac=None, pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=1_776_000_300)
    out = rooms.register(record, reg(), holder("m2"), T0 + 1, alive)
    assert out.record.pairing_token_hash == ""
    assert out.record.pairing_token_used is False
    assert out.record.pairing_token_expires_at is None


def test_register_with_different_pairing_hash_resets_used_flag():
    record = room(mac=None, pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=100)
    out = rooms.register(record, reg(pairing_token_hash=OTHER_TOKEN, pairing_token_expires_at=400), holder("m2"), T0 + 1, alive)
    assert out.record.pairing_token_hash == OTHER_TOKEN
    assert out.record.pairing_token_used is False
    assert out.record.pairing_token_expires_at == 400


def test_register_with_same_pairing_hash_keeps_used_flag():
    record = room(mac=None, pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=100)
    out = rooms.register(record, reg(pairing_token_hash=TOKEN, pairing_token_expires_at=100), holder("m2"), T0 + 1, alive)
    assert out.record.pairing_token_hash == TOKEN
    assert out.record.pairing_token_used is True


def test_replacement_evicts_old_live_holder_only():
    m2 = holder("m2", edge="e3")
    out = rooms.register(room(), reg(), m2, T0 + 1, alive)
    assert out.accepted is True
    assert out.evict == holder("m1")
    assert out.record.mac == m2


def test_dead_holder_is_not_evicted_nor_notified():
    out = rooms.register(with_ios(), reg(), holder("m2"), T0 + 1, dead)
    assert out.accepted is True
    assert out.evict is None
    assert out.peer is None
    assert out.notify_peer is None
    assert out.replies == (RoomRegistered(room_id=ROOM),)


def test_mac_register_while_ios_joined_renotifies_both():
    m2 = holder("m2", edge="e3", boot="b3")
    record = with_ios(mac=None)
    out = rooms.register(record, reg(session_nonce="mac-nonce-2", ephemeral_key="mac-eph-2"), m2, T0 + 1, alive)
    # Mac: room_registered first, then the stored iOS keys.
    assert out.replies == (
        RoomRegistered(room_id=ROOM),
        PeerJoined(public_key=IOS_KEY, session_nonce="ios-nonce-1", ephemeral_key="ios-eph-1"),
    )
    # iOS: the Mac's new keys, from the new socket.
    assert out.peer == holder("i1", edge="e2")
    assert out.notify_peer == PeerJoinedEvent(peer=m2, public_key=MAC_KEY, session_nonce="mac-nonce-2", ephemeral_key="mac-eph-2")


def test_mac_register_while_ios_joined_and_old_mac_live_evicts_and_renotifies():
    out = rooms.register(with_ios(), reg(), holder("m2"), T0 + 1, alive)
    assert out.evict == holder("m1")
    assert out.notify_peer is not None and out.notify_peer.peer == holder("m2")
    assert len(out.replies) == 2 and isinstance(out.replies[1], PeerJoined)


def test_mac_register_with_only_dead_ios_holder_sends_no_peer_joined():
    out = rooms.register(with_ios(mac=None), reg(), holder("m2"), T0 + 1, alive_only("m2"))
    assert out.replies == (RoomRegistered(room_id=ROOM),)
    assert out.peer is None
    assert out.notify_peer is None


def test_register_does_not_mutate_the_input_record():
    # The edge reruns the function after a lost compare-and-set: the input must stay intact.
    for record, msg, by in [
        (with_ios(pairing_token_hash=TOKEN), reg(secret_hash=NEW_SECRET, ephemeral_key=""), holder("m1")),
        (with_ios(pairing_token_hash=TOKEN), reg(), holder("m2")),
        (with_ios(pairing_token_hash=TOKEN), reg(pairing_token_hash=OTHER_TOKEN), holder("m2")),
    ]:
        before = copy(record)
        rooms.register(record, msg, by, T0 + 1, alive)
        assert record == before


# --- join_room (§4.4, §4.5, §12 items 10–12, 14) -------------------------------------


def test_join_unregistered_room_gives_room_not_found_and_keeps_socket_open():
    out = rooms.join(None, joinmsg(), holder("i1"), T0, alive)
    assert_failed(out, ErrorCode.ROOM_NOT_FOUND, close=None)


def test_join_with_matching_secret_sends_peer_joined_both_ways():
    i1 = holder("i1", edge="e2")
    out = rooms.join(room(), joinmsg(), i1, T0 + 1, alive)
    assert out.accepted is True
    assert out.replies == (PeerJoined(public_key=MAC_KEY, session_nonce="mac-nonce-1", ephemeral_key="mac-eph-1"),)
    assert out.peer == holder("m1")
    assert out.notify_peer == PeerJoinedEvent(peer=i1, public_key=IOS_KEY, session_nonce="ios-nonce-1", ephemeral_key="ios-eph-1")
    assert out.evict is None
    assert out.close is None


def test_join_stores_ios_keys_and_slot_and_keeps_room_identity():
    i1 = holder("i1", edge="e2")
    out = rooms.join(room(), joinmsg(), i1, T0 + 9, alive)
    r = out.record
    assert (r.ios_public_key, r.ios_session_nonce, r.ios_ephemeral_key, r.ios) == (IOS_KEY, "ios-nonce-1", "ios-eph-1", i1)
    assert (r.owner_user_id, r.secret_hash, r.mac_public_key, r.mac) == ("u1", SECRET, MAC_KEY, holder("m1"))
    assert r.last_activity_at == T0 + 9


@pytest.mark.parametrize("empty", [None, ""])
def test_join_passes_absent_or_empty_keys_through_as_empty_strings(empty):
    out = rooms.join(room(), joinmsg(session_nonce=empty, ephemeral_key=empty), holder("i1"), T0, alive)
    assert out.record.ios_session_nonce == ""
    assert out.record.ios_ephemeral_key == ""
    assert out.notify_peer.session_nonce == ""
    assert out.notify_peer.ephemeral_key == ""


def test_join_passes_empty_mac_keys_through_to_ios():
    out = rooms.join(room(mac_session_nonce="", mac_ephemeral_key=""), joinmsg(), holder("i1"), T0, alive)
    assert out.replies == (PeerJoined(public_key=MAC_KEY, session_nonce="", ephemeral_key=""),)


def test_join_while_mac_absent_is_accepted_without_peer_joined():
    out = rooms.join(room(mac=None), joinmsg(), holder("i1"), T0 + 1, alive)
    assert out.accepted is True
    assert out.replies == ()
    assert out.peer is None
    assert out.notify_peer is None
    assert out.record.ios == holder("i1")


def test_join_while_mac_holder_dead_is_accepted_without_peer_joined():
    out = rooms.join(room(), joinmsg(), holder("i1"), T0 + 1, alive_only("i1"))
    assert out.accepted is True
    assert out.replies == ()
    assert out.notify_peer is None


def test_join_with_wrong_secret_fails_auth_and_closes_4003():
    out = rooms.join(room(), joinmsg(secret_hash=NEW_SECRET), holder("i1"), T0, alive)
    error = assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)
    assert error.message == "Room secret mismatch"


@pytest.mark.parametrize("secret", [None, ""])
def test_join_without_credentials_fails_auth_and_closes_4003(secret):
    out = rooms.join(room(), joinmsg(secret_hash=secret), holder("i1"), T0, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_join_with_empty_secret_never_matches_an_empty_stored_secret():
    out = rooms.join(room(secret_hash=""), joinmsg(secret_hash=""), holder("i1"), T0, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_join_with_pairing_token_authenticates_and_marks_it_used():
    record = room(pairing_token_hash=TOKEN, pairing_token_expires_at=(T0 // 1000) + 300)
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), T0, alive)
    assert out.accepted is True
    assert out.record.pairing_token_used is True
    assert out.record.pairing_token_hash == TOKEN
    assert record.pairing_token_used is False  # input untouched
    assert len(out.replies) == 1 and isinstance(out.replies[0], PeerJoined)


def test_join_with_used_pairing_token_fails_auth_and_closes_4003():
    record = room(pairing_token_hash=TOKEN, pairing_token_used=True)
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i2"), T0, alive)
    error = assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)
    assert error.message == "Pairing token already used"
    assert out.close == (4003, "pairing token already used")


def test_second_join_with_same_pairing_token_fails_auth_and_closes_4003():
    first = rooms.join(room(pairing_token_hash=TOKEN), joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), T0, alive)
    second = rooms.join(first.record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i2"), T0 + 1, alive)
    assert_failed(second, ErrorCode.AUTH_FAILED, close=4003)


@pytest.mark.parametrize("now_ms", [1_776_000_300_000, 1_776_000_300_001, 1_776_000_999_000])
def test_expired_pairing_token_fails_auth_and_closes_4003(now_ms):
    record = room(pairing_token_hash=TOKEN, pairing_token_expires_at=1_776_000_300)  # unix seconds
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), now_ms, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_pairing_token_just_before_its_deadline_authenticates():
    record = room(pairing_token_hash=TOKEN, pairing_token_expires_at=1_776_000_300)
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), 1_776_000_299_999, alive)
    assert out.accepted is True
    assert out.record.pairing_token_used is True


def test_pairing_token_without_expiry_authenticates():
    record = room(pairing_token_hash=TOKEN, pairing_token_expires_at=None)
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), T0 * 10, alive)
    assert out.accepted is True


def test_join_with_unknown_pairing_token_fails_auth_and_closes_4003():
    record = room(pairing_token_hash=TOKEN)
    out = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=OTHER_TOKEN), holder("i1"), T0, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_join_with_pairing_token_when_room_has_none_fails_auth_and_closes_4003():
    out = rooms.join(room(), joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1"), T0, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_repeated_join_sends_peer_joined_to_both_again():
    i1 = holder("i1", edge="e2")
    first = rooms.join(room(), joinmsg(), i1, T0, alive)
    again = rooms.join(first.record, joinmsg(ephemeral_key="ios-eph-2"), i1, T0 + 1, alive)
    assert again.accepted is True
    assert again.evict is None  # same socket: nobody to replace
    assert again.replies == (PeerJoined(public_key=MAC_KEY, session_nonce="mac-nonce-1", ephemeral_key="mac-eph-1"),)
    assert again.notify_peer == PeerJoinedEvent(peer=i1, public_key=IOS_KEY, session_nonce="ios-nonce-1", ephemeral_key="ios-eph-2")
    assert again.peer == holder("m1")


def test_join_from_new_ios_socket_evicts_old_live_ios_holder():
    i2 = holder("i2", edge="e4")
    out = rooms.join(with_ios(), joinmsg(), i2, T0 + 1, alive)
    assert out.accepted is True
    assert out.evict == holder("i1", edge="e2")
    assert out.record.ios == i2
    assert out.notify_peer.peer == i2


def test_join_does_not_evict_dead_ios_holder():
    out = rooms.join(with_ios(), joinmsg(), holder("i2"), T0 + 1, alive_only("m1", "i2"))
    assert out.accepted is True
    assert out.evict is None


def test_failed_join_does_not_evict_the_joined_ios():
    out = rooms.join(with_ios(), joinmsg(secret_hash=NEW_SECRET), holder("i2"), T0 + 1, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_join_by_other_account_with_right_secret_is_allowed():
    out = rooms.join(room(), joinmsg(), holder("i1", user="someone-else"), T0, alive)
    assert out.accepted is True


# --- release (§4.8, §12 items 12–13) ---------------------------------------------------


def test_mac_leaving_clears_its_slot_and_names_live_ios_peer():
    out = rooms.release(with_ios(), holder("m1"), "mac", T0 + 7, alive)
    assert out.record.mac is None
    assert out.record.ios == holder("i1", edge="e2")
    assert out.record.last_activity_at == T0 + 7
    assert out.peer == holder("i1", edge="e2")


def test_ios_leaving_clears_its_slot_and_names_live_mac_peer():
    out = rooms.release(with_ios(), holder("i1", edge="e2"), "ios", T0 + 7, alive)
    assert out.record.ios is None
    assert out.record.mac == holder("m1")
    assert out.record.ios_public_key == IOS_KEY  # identity stays
    assert out.peer == holder("m1")


def test_replaced_socket_leaving_changes_nothing_and_tells_nobody():
    record = with_ios(mac=holder("m2"))
    out = rooms.release(record, holder("m1"), "mac", T0 + 7, alive)
    assert out == rooms.Release(record=None, peer=None)


def test_leaving_socket_with_dead_peer_tells_nobody():
    out = rooms.release(with_ios(), holder("m1"), "mac", T0 + 7, alive_only("m1"))
    assert out.record.mac is None
    assert out.peer is None


def test_leaving_socket_without_peer_tells_nobody():
    out = rooms.release(room(), holder("m1"), "mac", T0 + 7, alive)
    assert out.record.mac is None
    assert out.peer is None


def test_release_of_an_already_free_slot_writes_nothing_but_still_names_the_peer():
    # An earlier attempt committed but its answer was lost: the peer must still hear of it.
    out = rooms.release(with_ios(mac=None), holder("m1"), "mac", T0 + 7, alive)
    assert out == rooms.Release(record=None, peer=holder("i1", edge="e2"))


def test_release_of_missing_room_does_nothing():
    assert rooms.release(None, holder("m1"), "mac", T0, alive) == rooms.Release(record=None, peer=None)


def test_release_does_not_mutate_the_input_record():
    record = with_ios()
    before = copy(record)
    rooms.release(record, holder("m1"), "mac", T0 + 7, alive)
    assert record == before


# --- idle cleanup (§4.7, §12 item 17) ---------------------------------------------------


def idle_room(**fields) -> RoomRecord:
    base = dict(mac=None, ios=None, pairing_token_hash=TOKEN, pairing_token_used=True, pairing_token_expires_at=1_776_000_300)
    return with_ios(**{**base, **fields})


def test_idle_cleanup_keeps_identity_and_drops_connection_state():
    record = idle_room(mac=holder("m1"), ios=holder("i1"))  # holders whose edges are dead
    out = rooms.expire_idle(record, T0 + IDLE_MS, IDLE_MS, dead)
    assert out == RoomRecord(
        room_id=ROOM,
        owner_user_id="u1",
        secret_hash=SECRET,
        mac_public_key=MAC_KEY,
        ios_public_key=IOS_KEY,
        created_at=T0,
        last_activity_at=T0,
        mac_session_nonce="",
        mac_ephemeral_key="",
        ios_session_nonce="",
        ios_ephemeral_key="",
        pairing_token_hash="",
        pairing_token_used=False,
        pairing_token_expires_at=None,
        mac=None,
        ios=None,
    )
    assert record.mac_session_nonce == "mac-nonce-1"  # input untouched


def test_room_idle_for_less_than_timeout_is_not_cleaned():
    record = idle_room()
    assert rooms.expire_idle(record, T0 + IDLE_MS - 1, IDLE_MS, dead) is record


@pytest.mark.parametrize("live", ["m1", "i1"])
def test_room_with_a_live_socket_is_not_cleaned(live):
    record = idle_room(mac=holder("m1"), ios=holder("i1"))
    assert rooms.expire_idle(record, T0 + 10 * IDLE_MS, IDLE_MS, alive_only(live)) is record


def test_last_seen_counts_as_activity_for_idle_cleanup():
    record = idle_room()
    now = T0 + IDLE_MS + 1_000
    assert rooms.expire_idle(record, now, IDLE_MS, dead, last_seen=(None, T0 + 2_000)) is record
    assert rooms.expire_idle(record, now, IDLE_MS, dead, last_seen=(None, T0 + 1_000)).mac_session_nonce == ""


def test_idle_cleanup_of_an_already_clean_room_returns_it_unchanged():
    clean = rooms.expire_idle(idle_room(), T0 + IDLE_MS, IDLE_MS, dead)
    assert rooms.expire_idle(clean, T0 + 2 * IDLE_MS, IDLE_MS, dead) is clean


def test_after_idle_cleanup_nobody_else_can_claim_the_room():
    clean = rooms.expire_idle(idle_room(), T0 + IDLE_MS, IDLE_MS, dead)
    assert_failed(rooms.register(clean, reg(secret_hash=NEW_SECRET), holder("x1"), T0 + IDLE_MS + 1, alive), ErrorCode.AUTH_FAILED)
    assert_failed(rooms.register(clean, reg(), holder("x1", user="u2"), T0 + IDLE_MS + 1, alive), ErrorCode.ACCOUNT_MISMATCH)
    back = rooms.register(clean, reg(), holder("m9"), T0 + IDLE_MS + 1, alive)
    assert back.accepted is True
    assert back.record.ios_public_key == IOS_KEY


def test_pairing_token_is_unusable_after_idle_cleanup():
    clean = rooms.expire_idle(idle_room(pairing_token_used=False, pairing_token_expires_at=None), T0 + IDLE_MS, IDLE_MS, dead)
    out = rooms.join(clean, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i5"), T0 + IDLE_MS + 1, alive)
    assert_failed(out, ErrorCode.AUTH_FAILED, close=4003)


def test_last_activity_is_latest_of_record_change_and_last_seen():
    record = room(last_activity_at=T0)
    assert rooms.last_activity(record) == T0
    assert rooms.last_activity(record, (None, None)) == T0
    assert rooms.last_activity(record, (T0 - 5, None)) == T0
    assert rooms.last_activity(record, (T0 + 5, T0 + 3)) == T0 + 5


def test_register_with_changed_public_key_is_logged_as_a_notice_without_key_material():
    out = rooms.register(room(mac=None), reg(public_key="NEWKEY"), holder("m2"), T0 + 1, alive)
    assert out.accepted and out.notice == "Mac identity key changed; secret matched"
    assert "NEWKEY" not in out.notice and MAC_KEY not in out.notice
    same_key = rooms.register(room(mac=None), reg(), holder("m2"), T0 + 1, alive)
    assert same_key.notice is None


# --- retries of requests whose write landed unseen -------------------------------------


def test_register_retried_after_an_unseen_write_is_a_first_register_not_a_rotation():
    # The record names this socket only because the first attempt landed.
    record = with_ios(mac=holder("m2"))
    out = rooms.register(record, reg(), holder("m2"), T0 + 1, alive, registered_before=False)
    assert out.accepted
    assert [type(r).__name__ for r in out.replies] == ["RoomRegistered", "PeerJoined"]
    assert out.notify_peer is not None and out.evict is None


def test_pairing_join_retried_after_an_unseen_write_finds_its_own_use_of_the_token():
    record = room(pairing_token_hash=TOKEN, pairing_token_used=True, ios=holder("i1", edge="e2"))
    mine = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i1", edge="e2"), T0 + 1, alive)
    assert mine.accepted
    someone_else = rooms.join(record, joinmsg(secret_hash=None, pairing_token_hash=TOKEN), holder("i9"), T0 + 1, alive)
    assert not someone_else.accepted and someone_else.close[0] == 4003


@pytest.mark.parametrize("expires", [(T0 // 1000 + 86_401), T0 + 300_000, 2**63 - 1])
def test_register_refuses_a_pairing_token_expiry_more_than_a_day_ahead(expires):
    # Milliseconds for seconds (or 2**63-1) would make a token that never expires.
    out = rooms.register(None, reg(pairing_token_hash=TOKEN, pairing_token_expires_at=expires), holder("m1"), T0, alive)
    assert out.record is None and not out.accepted
    assert [type(r) for r in out.replies] == [Error] and out.replies[0].code == ErrorCode.BAD_MESSAGE
    assert "unix seconds" in out.replies[0].message


def test_register_accepts_a_pairing_token_expiry_up_to_a_day_ahead():
    out = rooms.register(None, reg(pairing_token_hash=TOKEN, pairing_token_expires_at=T0 // 1000 + 86_400), holder("m1"), T0, alive)
    assert out.accepted and out.record.pairing_token_expires_at == T0 // 1000 + 86_400
