"""Frames that reached nobody (issue 16 item 10), without I/O: what the session tells its
client, the meter's refund, and the reply subject that carries the news."""

from __future__ import annotations

import msgspec
import pytest

from edge.protocol.actions import Send, Undelivered
from edge.protocol.meter import UsageMeter
from metering.windows import WINDOW_MS, period_of
from edge.protocol.rooms import Outcome
from edge.protocol.session import Session
from schemas.edge_events import PeerLeftEvent, ReplacedEvent
from schemas.records import SlotHolder
from schemas.subjects import frame_reply, sender_addressee_and_credits, sequence_of, undelivered_reply_prefix

ROOM = "K7X2M9QD4A"
PEER = SlotHolder(socket_id="i1", edge_id="e3", boot_id="b3", user_id="u1")
NEW_PEER = SlotHolder(socket_id="i2", edge_id="e4", boot_id="b4", user_id="u1")
NO_PEER = {"type": "error", "code": "NO_PEER", "message": "Peer not connected"}
TIMEOUT = {"type": "peer_disconnected", "reason": "timeout"}


def mac_in_room(peer: SlotHolder | None = PEER) -> Session:
    s = Session(room_id=ROOM, role="mac", socket_id="m1", edge_id="e1", boot_id="b1", user_id="u1", last_message_at=0.0)
    s.receive(
        msgspec.json.encode(
            {"type": "register_room", "room_id": ROOM, "secret_hash": "a" * 64, "public_key": "k", "session_nonce": "n", "ephemeral_key": "e"}
        ),
        now=1.0,
    )
    s.apply(Outcome(accepted=True, peer=peer))
    return s


def wire_all(actions) -> list[dict]:
    assert all(isinstance(a, Send) for a in actions), actions
    return [msgspec.json.decode(a.data) for a in actions]


def relay(s: Session) -> list[dict]:
    return wire_all(s.receive(b'{"type":"relay","payload":"eA=="}', now=2.0))


def test_a_frame_to_a_peer_whose_edge_is_gone_tells_peer_disconnected_timeout_then_no_peer_and_the_peer_is_gone():
    s = mac_in_room()
    assert wire_all(s.receive_event(Undelivered("i1", edge_gone=True), "i1")) == [TIMEOUT, NO_PEER]
    assert s.peer is None
    assert relay(s) == [NO_PEER]  # not forwarded, so not charged
    # Frames that were in flight with it: NO_PEER each, no second peer_disconnected.
    assert wire_all(s.receive_event(Undelivered("i1", edge_gone=True), "i1")) == [NO_PEER]
    # The peer's edge's lease expires later: nothing more to say.
    assert s.edge_died("e3", "b3") == []


def test_a_frame_to_a_socket_its_live_edge_no_longer_has_gets_no_peer_and_the_reason_comes_from_its_edge():
    s = mac_in_room()
    assert wire_all(s.receive_event(Undelivered("i1", edge_gone=False), "i1")) == [NO_PEER]
    assert s.peer == PEER  # its edge's peer_left says why it left
    assert wire_all(s.receive_event(PeerLeftEvent(reason="client_left"), "i1")) == [
        {"type": "peer_disconnected", "reason": "client_left"}
    ]


def test_news_of_an_undelivered_frame_to_a_former_peer_says_nothing_to_a_client_with_a_new_peer():
    s = mac_in_room(NEW_PEER)
    assert s.receive_event(Undelivered("i1", edge_gone=True), "i1") == []
    assert s.peer == NEW_PEER


def test_news_of_an_undelivered_frame_waits_for_a_room_request_in_flight():
    s = mac_in_room()
    s.receive(
        msgspec.json.encode(
            {"type": "register_room", "room_id": ROOM, "secret_hash": "a" * 64, "public_key": "k", "session_nonce": "", "ephemeral_key": ""}
        ),
        now=2.0,
    )  # a same-socket re-register: in flight
    assert s.receive_event(Undelivered("i1", edge_gone=True), "i1") == []
    actions = s.apply(Outcome(accepted=True, peer=PEER, replies=[]))
    assert wire_all(actions) == [TIMEOUT, NO_PEER]
    assert s.peer is None


def test_a_replaced_session_hears_nothing_of_undelivered_frames():
    s = mac_in_room()
    s.receive_event(ReplacedEvent(by_socket_id="m2"), "m2")
    assert s.replaced
    assert s.receive_event(Undelivered("i1", edge_gone=True), "i1") == []


def test_a_refund_in_the_same_interval_cancels_the_charge():
    meter = UsageMeter("e1", "b1", 30_000)
    meter.charge_messages("u1", 1)
    meter.charge_messages("u1", 3)
    meter.refund_messages("u1", 3)
    meter.tick(1_000)
    batch = meter.next_batch(1_000)
    assert [(e.user_id, e.message_tokens) for e in batch.entries] == [("u1", 1)]


def test_a_refund_after_its_charge_was_closed_into_a_batch_comes_off_the_next_charges():
    meter = UsageMeter("e1", "b1", 30_000)
    meter.charge_messages("u1", 2)
    meter.tick(1_000)
    meter.acknowledged(meter.next_batch(1_000))
    meter.refund_messages("u1", 2)
    meter.tick(2_000)
    assert meter.next_batch(2_000) is None  # nothing negative is ever published
    assert meter.unpublished_credits() == 0
    meter.charge_messages("u1", 5)
    meter.tick(3_000)
    assert [e.message_tokens for e in meter.next_batch(3_000).entries] == [3]


def test_a_refund_after_its_interval_closed_but_within_the_refund_window_cancels_the_charge():
    meter = UsageMeter("e1", "b1", 30_000, refund_window_ms=1_000)
    meter.charge_messages("u1", 1)
    meter.charge_messages("u1", 3)
    meter.tick(1_000)  # the interval closes before the news of the frame of 3 comes
    assert meter.next_batch(1_000) is None  # held for the refund window
    assert meter.unpublished_credits() == 4
    meter.refund_messages("u1", 3)
    meter.tick(1_500)
    assert meter.next_batch(1_500) is None
    meter.tick(2_000)  # the window has passed: the charge, less its refund
    assert [(e.user_id, e.message_tokens) for e in meter.next_batch(2_000).entries] == [("u1", 1)]


def test_a_refund_larger_than_the_newest_held_charge_takes_the_rest_from_older_ones():
    meter = UsageMeter("e1", "b1", 30_000, refund_window_ms=1_000)
    meter.charge_messages("u1", 2)
    meter.tick(100)
    meter.charge_messages("u1", 1)
    meter.tick(200)
    meter.charge_messages("u2", 5)
    meter.refund_messages("u1", 3)
    meter.tick(1_200)
    assert meter.next_batch(1_200) is None  # u1's 2 + 1 refunded whole; u2's held
    assert meter.unpublished_credits() == 5  # u2's, still held


def test_held_charges_keep_the_window_of_their_interval():
    meter = UsageMeter("e1", "b1", 30_000, refund_window_ms=1_000)
    boundary = WINDOW_MS * 10
    meter.tick(boundary - 500)
    meter.charge_messages("u1", 2)
    meter.tick(boundary)  # the interval lies in the window before the boundary
    meter.tick(boundary + 1_000)
    (entry,) = meter.next_batch(boundary + 1_000).entries
    assert (entry.period, entry.message_tokens) == (period_of(boundary - 500), 2)


def test_release_held_hands_over_every_held_charge_at_exit():
    meter = UsageMeter("e1", "b1", 30_000, refund_window_ms=60_000)
    meter.charge_messages("u1", 2)
    meter.tick(1_000)
    assert meter.next_batch(1_000) is None
    meter.release_held()
    assert [e.message_tokens for e in meter.next_batch(1_000).entries] == [2]
    assert meter.next_batch(1_000) is not None  # unacknowledged: offered again


def test_the_reply_subject_of_a_frame_names_sender_addressee_credits_and_sequence():
    prefix = undelivered_reply_prefix("edge-1", "Sa_b-1", "Tc-d_2")
    assert sender_addressee_and_credits(frame_reply(prefix, 1, 7)) == ("Sa_b-1", "Tc-d_2", 1)
    assert sender_addressee_and_credits(frame_reply(prefix, 256, 8)) == ("Sa_b-1", "Tc-d_2", 256)
    assert sequence_of(frame_reply(prefix, 256, 8), "Sa_b-1") == 8
    assert sequence_of(frame_reply(prefix, 0, 12345678901), "Sa_b-1") == 12345678901
    assert sequence_of(frame_reply(prefix, 1, 9), "another-socket") is None
    assert sequence_of("_INBOX.abcdef.123", "Sa_b-1") is None  # a control event's
    with pytest.raises(ValueError):
        sender_addressee_and_credits("relay.edge.edge-1.undelivered.x.y.z.w")
    with pytest.raises(ValueError):
        sender_addressee_and_credits("relay.edge.edge-1.undelivered.x.y.1")
