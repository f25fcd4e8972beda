"""Receiving on two NATS connections at once during a move off a lame-duck node: what is
delivered and what is a copy (`edge.protocol.moves`). The move itself, on a real
three-node cluster: tests/integration/test_nats_lame_duck.py."""

from __future__ import annotations

import random

from edge.protocol.moves import BRIDGE, MAIN, TwoStreams


def test_a_warming_stream_delivers_nothing_the_live_one_delivers_everything_once():
    streams = TwoStreams()
    assert streams.takes_frame(MAIN, "s1", 1)
    assert not streams.takes_frame(BRIDGE, "s1", 2)  # warming: main has it
    assert not streams.takes_event(BRIDGE) and streams.takes_event(MAIN)
    assert streams.takes_frame(MAIN, "s1", 2)


def test_two_live_streams_deliver_each_message_once_in_each_senders_order():
    """Both carry every message, each in order, but they interleave at random: what is
    delivered is each sender's messages, once, in order."""
    rng = random.Random(7)
    for _ in range(200):
        streams = TwoStreams()
        streams.goes_live(BRIDGE)
        senders = [f"s{rng.randrange(3)}" for _ in range(60)]  # sockets of other edges, each counting
        per_sender: dict[str, int] = {}
        numbered = []
        for sender in senders:
            per_sender[sender] = per_sender.get(sender, 0) + 1
            numbered.append((sender, per_sender[sender]))
        queues = {MAIN: list(numbered), BRIDGE: list(numbered)}
        delivered = []
        while queues[MAIN] or queues[BRIDGE]:
            source = rng.choice([s for s in queues if queues[s]])
            sender, seq = queues[source].pop(0)
            if streams.takes_frame(source, sender, seq):
                delivered.append((sender, seq))
        assert sorted(delivered) == sorted(numbered)
        for sender in per_sender:
            assert [seq for s, seq in delivered if s == sender] == list(range(1, per_sender[sender] + 1))


def test_a_stream_that_resubscribed_warms_up_again():
    streams = TwoStreams()
    streams.goes_live(BRIDGE)
    streams.warming(MAIN)  # its connection went away: what it brings next is a new subscription
    assert streams.takes_frame(BRIDGE, "s1", 5)
    assert not streams.takes_frame(MAIN, "s1", 6)
    assert streams.takes_frame(BRIDGE, "s1", 6)
    streams.goes_live(MAIN)
    assert not streams.takes_frame(MAIN, "s1", 6)  # a copy
    assert streams.takes_frame(MAIN, "s1", 7)


def test_frames_without_a_sequence_number_are_delivered_and_events_are_not_deduplicated():
    streams = TwoStreams()
    streams.goes_live(BRIDGE)
    assert streams.takes_frame(MAIN, "old-edge-socket", None)
    assert streams.takes_frame(BRIDGE, "old-edge-socket", None)
    assert streams.takes_event(MAIN) and streams.takes_event(BRIDGE)


def test_news_of_an_undelivered_frame_is_acted_on_once():
    streams = TwoStreams()
    streams.goes_live(BRIDGE)
    subject = "relay.edge.e1.undelivered.a.b.1.42"
    assert streams.takes_undelivered(BRIDGE, subject)
    assert not streams.takes_undelivered(MAIN, subject)
    assert streams.takes_undelivered(MAIN, "relay.edge.e1.undelivered.a.b.1.43")
    streams.warming(MAIN)
    assert not streams.takes_undelivered(MAIN, "relay.edge.e1.undelivered.a.b.1.44")
