"""One socket's protocol state (edge/session.py): frames and events in, actions out.

Wire output is checked by decoding the exact bytes a `Send`/`Forward` carries
(protocol.md §3, §4.4–§4.8, §12 items 1, 7, 11–14).
"""

from __future__ import annotations

import msgspec
import pytest

from edge.protocol import rooms
from edge.protocol.actions import Close, Forward, Notify, RoomRequest, Send
from edge.protocol.limits import TokenBucket
from edge.protocol.rooms import Outcome
from edge.protocol.session import Session, SocketState
from schemas.client import Error, JoinRoom, PeerJoined, RegisterRoom, RoomRegistered
from schemas.edge_events import PeerJoinedEvent, PeerLeftEvent, ReplacedEvent
from schemas.records import RoomRecord, SlotHolder

ROOM = "K7X2M9QD4A"
SECRET = "a" * 64
MAC_KEY = "MacIdentityKey" + "A" * 29 + "="
IOS_KEY = "IosIdentityKey" + "B" * 29 + "="


# --- builders ----------------------------------------------------------------------


def holder(socket_id: str, edge: str = "e1", boot: str = "b1", user: str = "u1") -> SlotHolder:
    return SlotHolder(socket_id=socket_id, edge_id=edge, boot_id=boot, user_id=user)


def session(role: str | None = None, socket_id: str = "s1", room_id: str = ROOM) -> Session:
    return Session(room_id=room_id, role=role, socket_id=socket_id, edge_id="e1", boot_id="b1", user_id="u1", last_message_at=0.0)


def frame(type_: str, **fields) -> bytes:
    return msgspec.json.encode({"type": type_, **fields})


def reg_frame(**fields) -> bytes:
    base = dict(room_id=ROOM, secret_hash=SECRET, public_key=MAC_KEY, session_nonce="mn", ephemeral_key="me")
    return frame("register_room", **{**base, **fields})


def join_frame(**fields) -> bytes:
    base = dict(room_id=ROOM, secret_hash=SECRET, public_key=IOS_KEY, session_nonce="in", ephemeral_key="ie")
    return frame("join_room", **{**base, **fields})


def wire(action) -> dict:
    """The JSON object a Send/Forward puts on a socket."""
    assert isinstance(action, (Send, Forward)), action
    return msgspec.json.decode(action.data)


def wire_all(actions) -> list[dict]:
    return [wire(a) for a in actions]


def in_room(role: str, peer: SlotHolder | None = None, socket_id: str = "s1") -> Session:
    """A session whose register/join was accepted, with `peer` as its current peer."""
    s = session(role, socket_id=socket_id)
    s.receive(reg_frame() if role == "mac" else join_frame(), now=1.0)
    s.apply(Outcome(accepted=True, peer=peer))
    return s


MAC_PEER = holder("m1", edge="e2", boot="b2")
IOS_PEER = holder("i1", edge="e3", boot="b3")


def error_of(actions) -> dict:
    """The one error the session answers, with no close and nothing else."""
    assert len(actions) == 1, actions
    msg = wire(actions[0])
    assert isinstance(actions[0], Send)
    assert msg["type"] == "error"
    return msg


# --- role, bad input (§12 items 1, 11) ----------------------------------------------------


def test_role_inferred_from_first_message_register_means_mac():
    s = session(role=None)
    actions = s.receive(reg_frame(), now=1.0)
    assert s.role == "mac"
    assert len(actions) == 1 and isinstance(actions[0], RoomRequest)
    assert isinstance(actions[0].message, RegisterRoom)
    assert actions[0].message.secret_hash == SECRET


def test_role_inferred_from_first_message_join_means_ios():
    s = session(role=None)
    actions = s.receive(join_frame(), now=1.0)
    assert s.role == "ios"
    assert len(actions) == 1 and isinstance(actions[0], RoomRequest) and isinstance(actions[0].message, JoinRoom)


def test_register_on_ios_socket_gives_bad_role():
    s = session(role="ios")
    err = error_of(s.receive(reg_frame(), now=1.0))
    assert err["code"] == "BAD_ROLE"
    assert isinstance(err["message"], str) and err["message"]
    assert s.role == "ios"


def test_join_on_mac_socket_gives_bad_role():
    err = error_of(session(role="mac").receive(join_frame(), now=1.0))
    assert err["code"] == "BAD_ROLE"


def test_inferred_role_is_kept_so_a_later_other_request_gives_bad_role():
    s = session(role=None)
    s.receive(reg_frame(), now=1.0)
    s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))
    err = error_of(s.receive(join_frame(), now=2.0))
    assert err["code"] == "BAD_ROLE"
    assert s.role == "mac"


def test_malformed_json_gives_bad_message():
    err = error_of(session(role="mac").receive(b'{"type": "relay", "payload": ', now=1.0))
    assert err["code"] == "BAD_MESSAGE"


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_json_nested_too_deeply_gives_bad_message_not_an_internal_error(depth):
    # msgspec raises RecursionError here; it used to close the socket 1011, with a traceback each.
    data = b'{"type":"heartbeat","x":' + b"[" * depth + b"]" * depth + b"}"
    s = in_room("mac", peer=IOS_PEER)
    assert s.take_now(data, 1.0, lambda: True) is None
    err = error_of(s.receive(data, now=1.0))
    assert err["code"] == "BAD_MESSAGE" and "nested too deeply" in err["message"]


@pytest.mark.parametrize("data", [frame("subscribe_everything"), b"[1,2]", b'"relay"', b"{}", frame("relay")])
def test_unknown_type_or_invalid_shape_gives_bad_message(data):
    err = error_of(session(role="ios").receive(data, now=1.0))
    assert err["code"] == "BAD_MESSAGE"


def test_relay_batch_over_256_payloads_gives_bad_message():
    s = in_room("mac", peer=IOS_PEER)
    err = error_of(s.receive(frame("relay_batch", payloads=["x"] * 257), now=2.0))
    assert err["code"] == "BAD_MESSAGE"


def test_request_for_another_room_id_gives_bad_message():
    s = session(role="mac")
    err = error_of(s.receive(reg_frame(room_id="OTHERROOM1"), now=1.0))
    assert err["code"] == "BAD_MESSAGE"


def test_bad_room_id_in_request_gives_bad_message():
    err = error_of(session(role="mac").receive(reg_frame(room_id="a.b"), now=1.0))
    assert err["code"] == "BAD_MESSAGE"


@pytest.mark.parametrize("as_text", [False, True], ids=["binary-utf8", "text"])
def test_binary_and_text_frames_with_json_are_both_accepted(as_text):
    data = reg_frame().decode() if as_text else reg_frame()
    actions = session(role="mac").receive(data, now=1.0)
    assert len(actions) == 1 and isinstance(actions[0], RoomRequest)


def test_any_frame_even_a_bad_one_counts_as_a_sign_of_life():
    s = session(role="mac")
    s.receive(b"not json", now=42.5)
    assert s.last_message_at == 42.5
    s.receive(frame("heartbeat"), now=50.0)
    assert s.last_message_at == 50.0


# --- relay, relay_batch (§4.6, §12 item 11) -------------------------------------------------


@pytest.mark.parametrize("data", [frame("relay", payload="cGF5"), frame("relay_batch", payloads=["YQ==", "Yg=="])])
def test_relay_before_register_gives_not_in_room(data):
    err = error_of(session(role=None).receive(data, now=1.0))
    assert err["code"] == "NOT_IN_ROOM"


def test_relay_while_request_in_flight_gives_not_in_room():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    err = error_of(s.receive(frame("relay", payload="cGF5"), now=1.1))
    assert err["code"] == "NOT_IN_ROOM"


def test_relay_after_rejected_request_gives_not_in_room():
    s = session(role="ios")
    s.receive(join_frame(), now=1.0)
    s.apply(Outcome(replies=(Error(code="ROOM_NOT_FOUND", message="Room not found"),)))
    err = error_of(s.receive(frame("relay", payload="cGF5"), now=2.0))
    assert err["code"] == "NOT_IN_ROOM"


@pytest.mark.parametrize("data", [frame("relay", payload="cGF5"), frame("relay_batch", payloads=["YQ==", "Yg=="])])
def test_relay_without_peer_gives_no_peer(data):
    err = error_of(in_room("mac", peer=None).receive(data, now=2.0))
    assert err == {"type": "error", "code": "NO_PEER", "message": "Peer not connected"}


def test_relay_is_reserialised_with_only_type_and_payload():
    s = in_room("mac", peer=IOS_PEER)
    actions = s.receive(frame("relay", payload="cGF5bG9hZA==", room_id=ROOM, secret_hash=SECRET, extra={"x": 1}), now=2.0)
    assert len(actions) == 1 and isinstance(actions[0], Forward)
    assert actions[0].to == IOS_PEER
    assert wire(actions[0]) == {"type": "relay", "payload": "cGF5bG9hZA=="}


def test_relay_batch_is_forwarded_as_a_batch_in_order():
    s = in_room("ios", peer=MAC_PEER)
    payloads = [f"p{i}" for i in range(256)]
    actions = s.receive(frame("relay_batch", payloads=payloads, junk=True), now=2.0)
    assert len(actions) == 1 and isinstance(actions[0], Forward)
    assert actions[0].to == MAC_PEER
    assert wire(actions[0]) == {"type": "relay_batch", "payloads": payloads}


def test_relay_goes_to_the_peer_named_by_the_latest_peer_joined():
    s = in_room("ios", peer=MAC_PEER)
    new_mac = holder("m2", edge="e9", boot="b9")
    s.receive_event(PeerJoinedEvent(peer=new_mac, public_key=MAC_KEY), sender="m2")
    (fwd,) = s.receive(frame("relay", payload="eA=="), now=3.0)
    assert isinstance(fwd, Forward) and fwd.to == new_mac


# --- heartbeat (§4.7) ----------------------------------------------------------------------


def ack(s: Session) -> dict:
    actions = s.receive(frame("heartbeat"), now=5.0)
    assert len(actions) == 1 and isinstance(actions[0], Send)  # answered, never forwarded
    msg = wire(actions[0])
    assert msg["type"] == "heartbeat_ack"
    return msg


def test_heartbeat_ack_reports_mac_connected():
    assert ack(in_room("mac", peer=None))["mac_connected"] is True
    assert ack(in_room("mac", peer=IOS_PEER))["mac_connected"] is True
    assert ack(in_room("ios", peer=MAC_PEER))["mac_connected"] is True


def test_heartbeat_ack_reports_mac_absent_to_ios_without_peer():
    assert ack(in_room("ios", peer=None)).get("mac_connected", False) is False


def test_heartbeat_ack_reports_mac_gone_after_peer_disconnected():
    s = in_room("ios", peer=MAC_PEER)
    s.receive_event(PeerLeftEvent(reason="client_left"), sender="m1")
    assert ack(s).get("mac_connected", False) is False


def test_heartbeat_is_answered_before_register():
    s = session(role=None)
    msg = ack(s)
    assert msg.get("mac_connected", False) is False
    assert s.role is None


def test_heartbeat_with_extra_fields_is_answered():
    actions = in_room("mac").receive(frame("heartbeat", seq=3), now=1.0)
    assert wire(actions[0])["type"] == "heartbeat_ack"


# --- the room logic's outcome (§4.3–§4.5, §12 items 12, 14) -----------------------------------


def test_accepted_outcome_sends_replies_in_order_and_enters_room():
    s = session(role=None)
    s.receive(reg_frame(), now=1.0)
    actions = s.apply(
        Outcome(
            accepted=True,
            peer=IOS_PEER,
            replies=(RoomRegistered(room_id=ROOM, max_sessions=32), PeerJoined(public_key=IOS_KEY, session_nonce="", ephemeral_key="ie")),
        )
    )
    assert wire_all(actions) == [
        {"type": "room_registered", "room_id": ROOM, "max_sessions": 32},
        {"type": "peer_joined", "public_key": IOS_KEY, "session_nonce": "", "ephemeral_key": "ie"},
    ]
    assert s.in_room is True
    assert s.peer == IOS_PEER


def test_room_registered_without_max_sessions_omits_it():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    assert wire_all(s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))) == [
        {"type": "room_registered", "room_id": ROOM}
    ]


def test_outcome_with_peer_notice_notifies_the_peer_role():
    s = session(role="ios", socket_id="i9")
    s.receive(join_frame(), now=1.0)
    event = PeerJoinedEvent(peer=s.holder, public_key=IOS_KEY, session_nonce="in", ephemeral_key="ie")
    actions = s.apply(Outcome(accepted=True, peer=MAC_PEER, notify_peer=event, replies=(PeerJoined(public_key=MAC_KEY),)))
    assert isinstance(actions[0], Send)
    assert actions[1] == Notify(to=MAC_PEER, role="mac", event=event)
    assert len(actions) == 2


def test_outcome_with_evict_tells_old_holder_it_was_replaced():
    s = session(role="mac", socket_id="m2")
    s.receive(reg_frame(), now=1.0)
    old = holder("m1", edge="e7")
    actions = s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),), evict=old))
    assert actions[-1] == Notify(to=old, role="mac", event=ReplacedEvent(by_socket_id="m2"))


def test_rejected_join_sends_error_then_closes_4003_and_stays_out_of_room():
    s = session(role="ios")
    (req,) = s.receive(join_frame(secret_hash="f" * 64), now=1.0)
    record = RoomRecord(room_id=ROOM, owner_user_id="u1", secret_hash=SECRET, mac_public_key=MAC_KEY, created_at=0, last_activity_at=0)
    actions = s.apply(rooms.join(record, req.message, s.holder, 1, lambda h: True))
    assert len(actions) == 2
    assert wire(actions[0]) == {"type": "error", "code": "AUTH_FAILED", "message": "Room secret mismatch"}
    assert actions[1] == Close(4003, "auth failed")
    assert s.in_room is False


def test_register_then_join_gives_each_side_the_others_keys():
    mac, ios = session(role="mac", socket_id="m1"), session(role="ios", socket_id="i1")
    always = lambda h: True  # noqa: E731
    (req,) = mac.receive(reg_frame(session_nonce="mn", ephemeral_key="me"), now=1.0)
    reg_out = rooms.register(None, req.message, mac.holder, 1000, always)
    assert wire_all(mac.apply(reg_out)) == [{"type": "room_registered", "room_id": ROOM}]

    (req,) = ios.receive(join_frame(session_nonce="in", ephemeral_key=""), now=2.0)
    join_out = rooms.join(reg_out.record, req.message, ios.holder, 2000, always)
    ios_actions = ios.apply(join_out)
    assert wire(ios_actions[0]) == {"type": "peer_joined", "public_key": MAC_KEY, "session_nonce": "mn", "ephemeral_key": "me"}
    notify = ios_actions[1]
    assert isinstance(notify, Notify) and notify.to == mac.holder and notify.role == "mac"

    mac_actions = mac.receive_event(notify.event, sender=ios.socket_id)
    assert wire_all(mac_actions) == [{"type": "peer_joined", "public_key": IOS_KEY, "session_nonce": "in", "ephemeral_key": ""}]
    assert mac.peer == ios.holder and ios.peer == mac.holder


# --- events from other edges (§4.5, §4.8, §12 items 12–13) ------------------------------------


def test_events_held_while_room_request_in_flight():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    early = PeerJoinedEvent(peer=IOS_PEER, public_key=IOS_KEY, session_nonce="in", ephemeral_key="ie")
    assert s.receive_event(early, sender="i1") == []
    actions = s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))
    # room_registered reaches the Mac before the peer_joined that overtook it.
    assert wire_all(actions) == [
        {"type": "room_registered", "room_id": ROOM},
        {"type": "peer_joined", "public_key": IOS_KEY, "session_nonce": "in", "ephemeral_key": "ie"},
    ]
    assert s.peer == IOS_PEER


def test_held_peer_joined_is_dropped_when_the_request_is_refused():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    s.receive_event(PeerJoinedEvent(peer=IOS_PEER, public_key=IOS_KEY), sender="i1")
    actions = s.apply(Outcome(replies=(Error(code="AUTH_FAILED", message="Room secret mismatch"),)))
    assert wire_all(actions) == [{"type": "error", "code": "AUTH_FAILED", "message": "Room secret mismatch"}]
    assert s.peer is None


def test_failed_room_request_closes_1011_and_releases_held_events():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    s.receive_event(ReplacedEvent(by_socket_id="m2"), sender="m2")
    actions = s.request_failed()
    assert actions[0] == Close(1011, "Internal error")
    assert actions[1:] == [Close(4001, "Replaced by another device")]


def test_peer_joined_event_updates_peer_and_passes_keys_unchanged():
    s = in_room("mac", peer=None)
    new_ios = holder("i2", edge="e5")
    actions = s.receive_event(PeerJoinedEvent(peer=new_ios, public_key=IOS_KEY, session_nonce="", ephemeral_key=""), sender="i2")
    assert wire_all(actions) == [{"type": "peer_joined", "public_key": IOS_KEY, "session_nonce": "", "ephemeral_key": ""}]
    assert s.peer == new_ios


def test_peer_joined_event_before_entering_the_room_is_ignored():
    s = session(role="ios")
    assert s.receive_event(PeerJoinedEvent(peer=MAC_PEER, public_key=MAC_KEY), sender="m1") == []
    assert s.peer is None


@pytest.mark.parametrize("reason", ["client_left", "timeout", "server_restart"])
def test_peer_left_from_current_peer_sends_peer_disconnected_with_its_reason(reason):
    s = in_room("ios", peer=MAC_PEER)
    actions = s.receive_event(PeerLeftEvent(reason=reason), sender="m1")
    assert wire_all(actions) == [{"type": "peer_disconnected", "reason": reason}]
    assert s.peer is None


def test_peer_left_from_stale_peer_is_ignored():
    s = in_room("ios", peer=holder("m2"))
    assert s.receive_event(PeerLeftEvent(reason="client_left"), sender="m1") == []
    assert s.peer == holder("m2")


def test_peer_left_without_peer_is_ignored():
    assert in_room("mac", peer=None).receive_event(PeerLeftEvent(reason="client_left"), sender="i1") == []


def test_replaced_event_closes_4001():
    s = in_room("ios", peer=MAC_PEER)
    actions = s.receive_event(ReplacedEvent(by_socket_id="i2"), sender="i2")
    assert actions == [Close(4001, "Replaced by another device")]
    assert s.replaced is True and s.in_room is False and s.peer is None


def test_replaced_socket_is_closed_once_and_sends_no_more_peer_messages():
    s = in_room("ios", peer=MAC_PEER)
    s.receive_event(ReplacedEvent(by_socket_id="i2"), sender="i2")
    assert s.receive_event(ReplacedEvent(by_socket_id="i3"), sender="i3") == []
    assert s.receive_event(PeerLeftEvent(reason="client_left"), sender="m1") == []
    assert s.receive_event(PeerJoinedEvent(peer=MAC_PEER, public_key=MAC_KEY), sender="m1") == []
    assert error_of(s.receive(frame("relay", payload="eA=="), now=9.0))["code"] == "NOT_IN_ROOM"


def test_frames_accepted_only_from_the_current_peer():
    s = in_room("mac", peer=IOS_PEER)
    assert s.accepts_frame_from("i1") is True
    assert s.accepts_frame_from("i0") is False
    assert in_room("mac", peer=None).accepts_frame_from("i1") is False


def test_replaced_session_accepts_no_frames():
    s = in_room("mac", peer=IOS_PEER)
    s.receive_event(ReplacedEvent(by_socket_id="m2"), sender="m2")
    assert s.accepts_frame_from("i1") is False


# --- edge death, liveness (§4.7, §12 item 13) ------------------------------------------------------


def test_edge_death_tells_peer_timeout():
    s = in_room("mac", peer=IOS_PEER)
    actions = s.edge_died("e3", "b3")
    assert wire_all(actions) == [{"type": "peer_disconnected", "reason": "timeout"}]
    assert s.peer is None


@pytest.mark.parametrize("edge, boot", [("e3", "b-older"), ("e4", "b3"), ("e1", "b1")])
def test_death_of_another_edge_incarnation_is_ignored(edge, boot):
    s = in_room("mac", peer=IOS_PEER)
    assert s.edge_died(edge, boot) == []
    assert s.peer == IOS_PEER


def test_edge_death_without_peer_is_ignored():
    assert in_room("mac", peer=None).edge_died("e3", "b3") == []


@pytest.mark.parametrize("edge, boot, expected", [("e3", "b3", True), ("e3", "b-older", False), ("e4", "b3", False)])
def test_an_edge_death_concerns_a_session_whose_peer_lives_there(edge, boot, expected):
    # The edge only schedules (under the socket's write lock) the sessions it concerns.
    assert in_room("mac", peer=IOS_PEER).depends_on_edge(edge, boot) is expected
    assert in_room("mac", peer=None).depends_on_edge(edge, boot) is False


def test_an_edge_death_concerns_a_session_whose_request_is_in_flight():
    s = session("mac")
    s.receive(reg_frame(), now=1.0)
    assert s.depends_on_edge("e9", "b9") is True  # the outcome may name a peer there


def test_time_out_sends_heartbeat_timeout_and_closes_4000():
    s = in_room("mac", peer=IOS_PEER)
    actions = s.time_out()
    assert len(actions) == 1
    (close,) = actions
    assert (close.code, close.reason) == (4000, "heartbeat timeout")
    # The error goes out first, as a farewell that cannot hold up the close.
    assert msgspec.json.decode(close.farewell) == {
        "type": "error",
        "code": "HEARTBEAT_TIMEOUT",
        "message": "No heartbeat received",
    }
    assert s.leave_reason == "timeout"


def test_socket_leaves_as_client_left_unless_timed_out():
    assert session(role="mac").leave_reason == "client_left"


def test_socket_is_silent_from_the_dead_threshold_on():
    s = session(role="ios")
    s.receive(frame("heartbeat"), now=100.0)
    assert s.is_silent(144.999, 45.0) is False
    assert s.is_silent(145.0, 45.0) is True
    s.receive(frame("heartbeat"), now=140.0)
    assert s.is_silent(145.0, 45.0) is False


# --- ordering across edges: revisions and held edge deaths ------------------------------


def joined_event(socket_id: str, revision: int) -> PeerJoinedEvent:
    return PeerJoinedEvent(peer=holder(socket_id, edge="e3", boot="b3"), public_key=f"key-{socket_id}", revision=revision)


def test_a_peer_joined_event_older_than_the_peer_the_client_knows_is_ignored():
    s = in_room("mac")
    assert wire_all(s.receive_event(joined_event("i2", revision=20), "i2"))[0]["public_key"] == "key-i2"
    assert s.receive_event(joined_event("i1", revision=10), "i1") == []  # late news of a replaced iPhone
    assert s.peer.socket_id == "i2"


def test_a_newer_peer_joined_event_replaces_the_peer():
    s = in_room("mac")
    s.receive_event(joined_event("i1", revision=10), "i1")
    assert wire_all(s.receive_event(joined_event("i2", revision=11), "i2"))[0]["public_key"] == "key-i2"
    assert s.peer.socket_id == "i2"


def test_notify_carries_the_revision_of_the_write_that_made_us_the_holder():
    s = session("ios")
    s.receive(join_frame(), now=1.0)
    event = PeerJoinedEvent(peer=s.holder, public_key=IOS_KEY)
    outcome = Outcome(accepted=True, peer=MAC_PEER, replies=(PeerJoined(MAC_KEY),), notify_peer=event)
    notify = [a for a in s.apply(outcome, revision=42) if isinstance(a, Notify)]
    assert notify[0].event.revision == 42


def test_a_rotation_does_not_hide_an_iphone_the_mac_was_not_told_of_yet():
    s = session("mac")
    s.receive(reg_frame(), now=1.0)
    s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)), revision=5)
    s.receive(reg_frame(secret_hash="b" * 64, ephemeral_key=""), now=2.0)  # rotation in flight
    assert s.receive_event(joined_event("i1", revision=6), "i1") == []  # held
    # The rotation (revision 7) saw the iPhone in the record but sends no peer_joined:
    actions = s.apply(Outcome(accepted=True, peer=holder("i1", edge="e3", boot="b3"), replies=(RoomRegistered(room_id=ROOM),)), revision=7)
    assert [m["type"] for m in wire_all(actions)] == ["room_registered", "peer_joined"]


def test_an_edge_death_during_a_room_request_is_judged_after_it():
    s = session("mac")
    s.receive(reg_frame(), now=1.0)
    assert s.edge_died("e3", "b3") == []  # held: the outcome may name a peer there
    actions = s.apply(
        Outcome(accepted=True, peer=IOS_PEER, replies=(RoomRegistered(room_id=ROOM), PeerJoined(IOS_KEY))), revision=3
    )
    assert [m["type"] for m in wire_all(actions)] == ["room_registered", "peer_joined", "peer_disconnected"]
    assert s.peer is None


# --- usage and quota (§12 items 18–20) ------------------------------------------------


def test_a_forwarded_relay_carries_one_payload_and_a_batch_its_payload_count():
    s = in_room("mac", peer=holder("ios1"))
    [single] = s.receive(frame("relay", payload="p"), 1.0)
    [batch] = s.receive(frame("relay_batch", payloads=["a", "b", "c"]), 1.0)
    assert (single.payloads, batch.payloads) == (1, 3)


def test_quota_exceeded_sends_the_message_then_closes_1000_quota_exceeded():
    s = in_room("ios", peer=holder("mac1"))
    message = b'{"type":"quota_exceeded","usage":10,"limit":10,"period":"5h-1","resets_at":"x"}'
    assert s.quota_exceeded(message) == [Close(1000, "quota exceeded", farewell=message)]


def test_a_replaced_socket_is_not_closed_again_for_quota():
    s = in_room("mac", peer=holder("ios1"))
    s.receive_event(ReplacedEvent(by_socket_id="s2"), "s2")
    assert s.quota_exceeded(b"{}") == []


def test_a_session_is_a_mac_in_its_room_with_its_iphone_there():
    assert in_room("mac", peer=holder("ios1")).in_session
    assert not in_room("mac").in_session  # the Mac alone
    assert not in_room("ios", peer=holder("mac1")).in_session  # counted once, on the Mac's side
    s = in_room("mac", peer=holder("ios1"))
    s.receive_event(PeerLeftEvent(reason="client_left"), "ios1")
    assert not s.in_session


# --- the edge's fast path: take_now ----------------------------------------------------


def _answer_now() -> bool:
    return True


def _no_answer_now() -> bool:
    return False


@pytest.mark.parametrize(
    "data",
    [
        frame("relay", payload="cGF5bG9hZA==", extra={"x": 1}),
        frame("relay_batch", payloads=["a", "b", "c"], junk=True),
    ],
)
def test_take_now_forwards_a_relay_exactly_as_receive_would(data):
    fast, full = in_room("mac", peer=IOS_PEER), in_room("mac", peer=IOS_PEER)
    forward = fast.take_now(data, now=5.0, can_answer_now=_no_answer_now)
    (expected,) = full.receive(data, now=5.0)
    assert isinstance(forward, Forward) and isinstance(expected, Forward)
    assert (forward.data, forward.to, forward.payloads) == (expected.data, expected.to, expected.payloads)
    assert fast.last_message_at == full.last_message_at == 5.0


def _mismatched_ios() -> Session:
    s = in_room("ios", peer=MAC_PEER)
    s.owner_user_id = "someone-else"
    return s


@pytest.mark.parametrize(
    "make",
    [
        lambda: session(),  # before register/join (§4.7: answered at any time)
        lambda: in_room("mac"),  # the Mac alone
        lambda: in_room("mac", peer=IOS_PEER),
        lambda: in_room("ios"),  # the iPhone without its Mac: mac_connected false
        lambda: in_room("ios", peer=MAC_PEER),
        _mismatched_ios,  # account_match "mismatch" (§12 item 15)
    ],
)
def test_take_now_answers_a_heartbeat_exactly_as_receive_would(make):
    fast, full = make(), make()
    answer = fast.take_now(frame("heartbeat"), now=5.0, can_answer_now=_answer_now)
    (expected,) = full.receive(frame("heartbeat"), now=5.0)
    assert isinstance(answer, Send) and isinstance(expected, Send)
    assert answer.data == expected.data
    assert wire(answer)["type"] == "heartbeat_ack"
    assert fast.last_message_at == full.last_message_at == 5.0


def test_take_now_leaves_a_heartbeat_to_receive_when_its_answer_cannot_be_written_at_once():
    s = in_room("mac", peer=IOS_PEER)
    assert s.take_now(frame("heartbeat"), now=9.0, can_answer_now=_no_answer_now) is None
    assert s.last_message_at == 1.0  # unchanged: `receive` will count it


def test_the_longest_heartbeat_ack_fits_the_room_the_fast_path_checks_for():
    from edge.fastpath import HEARTBEAT_ACK_MAX as _HEARTBEAT_ACK_MAX
    from schemas.client import HeartbeatAck, encode

    longest = encode(HeartbeatAck(mac_connected=False, account_match="mismatch", account_deleted=True))
    assert len(longest) <= _HEARTBEAT_ACK_MAX


@pytest.mark.parametrize(
    "state, data",
    [
        ("not in a room", frame("relay", payload="x")),
        ("no peer", frame("relay", payload="x")),
        ("request in flight", frame("relay", payload="x")),
        ("request in flight", frame("heartbeat")),
        ("in a room", frame("join_room", room_id=ROOM)),
        ("in a room", b'{"type":"relay"'),
        ("in a room", frame("relay_batch", payloads=["p"] * 257)),
        ("in a room", frame("relay", payload=1)),
        ("in a room", b'{"type":"relay","payload":"\xff"}'),
        ("in a room", frame("heartbeat_ack")),
    ],
)
def test_take_now_leaves_everything_else_to_receive_and_changes_nothing(state, data):
    if state == "not in a room":
        s = session("mac")
    elif state == "no peer":
        s = in_room("mac", peer=None)
    elif state == "request in flight":
        s = in_room("mac", peer=IOS_PEER)
        s.receive(reg_frame(), now=1.5)  # a re-register: busy until its outcome
    else:
        s = in_room("mac", peer=IOS_PEER)
    before = (s.last_message_at, s.in_room, s.peer, s.role)
    assert s.take_now(data, now=9.0, can_answer_now=_answer_now) is None
    assert (s.last_message_at, s.in_room, s.peer, s.role) == before


@pytest.mark.parametrize("data", [frame("relay", payload="x"), frame("heartbeat")])
def test_take_now_leaves_a_message_over_the_rate_to_receive_which_closes_1008(data):
    s = in_room("mac", peer=IOS_PEER)
    s.rate = TokenBucket(rate_per_s=1, burst=2)
    assert s.take_now(data, now=2.0, can_answer_now=_answer_now) is not None
    assert s.take_now(data, now=2.0, can_answer_now=_answer_now) is not None
    assert s.take_now(data, now=2.0, can_answer_now=_answer_now) is None  # the bucket is empty
    (close,) = s.receive(data, now=2.0)
    assert isinstance(close, Close) and close.code == 1008
    assert wire(Send(close.farewell))["code"] == "RATE_LIMITED"


# --- the socket's state: one at a time, changed only by its transitions -------------


def test_a_socket_starts_outside_and_an_accepted_request_puts_it_in_the_room():
    s = session(role="mac")
    assert s.state is SocketState.OUTSIDE and not s.releases_slot_on_leave
    s.receive(reg_frame(), now=1.0)
    s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))
    assert s.state is SocketState.IN_ROOM and s.releases_slot_on_leave


def test_a_request_that_failed_unanswered_leaves_the_socket_uncertain_and_its_slot_released_on_leave():
    s = session(role="mac")
    s.receive(reg_frame(), now=1.0)
    assert s.request_failed()[0] == Close(1011, "Internal error")
    assert s.state is SocketState.UNCERTAIN and s.releases_slot_on_leave


def test_a_slot_won_before_the_answer_is_released_on_leave_even_if_the_answer_never_comes():
    s = session(role="ios")
    s.receive(join_frame(), now=1.0)
    s.may_hold_a_slot()
    assert s.state is SocketState.UNCERTAIN and s.releases_slot_on_leave
    s.apply(Outcome(accepted=True, peer=MAC_PEER, replies=()))
    assert s.state is SocketState.IN_ROOM


def test_a_replaced_socket_stays_replaced_and_frees_no_slot_whatever_comes_after():
    s = session(role="mac", socket_id="m1")
    s.receive(reg_frame(), now=1.0)
    s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))
    assert s.receive_event(ReplacedEvent(by_socket_id="m2"), "m2") == [Close(4001, "Replaced by another device")]
    s.receive(reg_frame(), now=2.0)
    s.apply(Outcome(accepted=True, replies=(RoomRegistered(room_id=ROOM),)))
    assert s.state is SocketState.REPLACED and not s.releases_slot_on_leave and s.peer is None
    s.may_hold_a_slot()
    assert s.state is SocketState.REPLACED


def test_a_socket_state_changes_only_by_its_transitions():
    s = session(role="mac")
    s.receive_event(ReplacedEvent(by_socket_id="m2"), "m2")
    with pytest.raises(AssertionError, match="no transition from replaced to in_room"):
        s._enter(SocketState.IN_ROOM)
