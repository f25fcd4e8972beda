"""The check in front of websockets' frame handling (edge/ws_hooks.py), on websockets' own
sans-I/O protocol: bytes in, frames and bytes out, no socket."""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from edge import ws_hooks
from edge.protocol.limits import TokenBucket

PING = b"\x89\x80\x00\x00\x00\x00"  # masked with a zero key, empty
PONG_FROM_CLIENT = b"\x8a\x80\x00\x00\x00\x00"


def _text(data: bytes) -> bytes:
    return Frame(Opcode.TEXT, data).serialize(mask=True, extensions=[])


def _checked_protocol(tokens: int) -> tuple[ServerProtocol, list[int]]:
    """A server protocol whose control frames spend `tokens` tokens; then it fails 1008."""
    protocol = ServerProtocol(state=State.OPEN)
    bucket = TokenBucket(rate_per_s=1e-9, burst=tokens)
    asked: list[int] = []

    def allow() -> bool:
        asked.append(1)
        if bucket.take(0.0):
            return True
        protocol.fail(1008, "rate limit exceeded")
        return False

    ws_hooks.watch_control_frames(protocol, allow)
    return protocol, asked


def test_the_websockets_internals_the_control_frame_limit_relies_on_are_there():
    # A websockets release that no longer parses through `recv_frame` fails here by name
    # (the edge would still count control frames, the coarse way: see ws_hooks).
    assert ws_hooks.HOOKED


def test_control_frames_past_the_check_are_neither_answered_nor_is_anything_after_them_read():
    protocol, asked = _checked_protocol(tokens=3)
    protocol.receive_data(PING * 3 + PONG_FROM_CLIENT + PING * 1000 + _text(b"after"))
    written = protocol.data_to_send()
    assert written[:3] == [b"\x8a\x00"] * 3  # three pongs
    assert written[3] == b"\x88\x15" + (1008).to_bytes(2, "big") + b"rate limit exceeded"
    assert written[4:] == [b""]  # then the end of the stream: nothing more is answered
    assert len(asked) == 4  # the refused pong was the last frame looked at
    assert [frame.opcode for frame in protocol.events_received()] == [Opcode.PING] * 3
    assert protocol.state is State.CLOSING
    protocol.receive_data(PING * 1000 + _text(b"later"))  # discarded unparsed
    assert protocol.data_to_send() == [] and protocol.events_received() == []


def test_data_frames_pass_the_control_frame_check_unasked():
    protocol, asked = _checked_protocol(tokens=0)
    protocol.receive_data(_text(b"one") + _text(b"two"))
    assert [frame.data for frame in protocol.events_received()] == [b"one", b"two"]
    assert asked == [] and protocol.data_to_send() == [] and protocol.state is State.OPEN


def test_control_frames_within_the_limit_are_answered_as_websockets_would():
    protocol, asked = _checked_protocol(tokens=10)
    protocol.receive_data(PING * 2 + _text(b"x"))
    assert protocol.data_to_send() == [b"\x8a\x00"] * 2
    assert [frame.opcode for frame in protocol.events_received()] == [Opcode.PING, Opcode.PING, Opcode.TEXT]
    assert len(asked) == 2
