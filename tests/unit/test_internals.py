"""The library internals the edge uses (edge/internals.py): the probes that check them at
import, the check in front of websockets' frame handling on websockets' own sans-I/O
protocol (bytes in, frames and bytes out, no socket), and `run_eagerly`."""

from __future__ import annotations

import asyncio

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

from edge import internals
from edge.internals import run_eagerly
from edge.protocol.limits import TokenBucket
from edge.settings import EdgeSettings
from runtime.settings import load_settings

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

    internals.watch_control_frames(protocol, allow)
    return protocol, asked


def test_the_websockets_internals_the_control_frame_limit_relies_on_are_there():
    # A websockets release that no longer parses through `recv_frame` fails here by name
    # (the edge would still count control frames, the coarse way: see edge/internals.py).
    assert internals.PROBED.watch_parse, internals.PROBED.why_not


def test_the_websockets_and_asyncio_internals_of_the_fast_path_are_there():
    # Each probe by name: a release that breaks one fails here, not only in the benchmark.
    probed = internals.PROBED
    assert probed.write_at_once and probed.take_at_once and probed.eager, probed.why_not
    assert probed.all_on and probed.why_not == ""
    assert probed.describe().startswith("library shortcuts on")


def test_shortcuts_turned_off_by_the_operator_are_all_off_and_say_why():
    off = internals.shortcuts_for(False)
    assert not (off.watch_parse or off.write_at_once or off.take_at_once or off.eager)
    assert off.describe() == (
        "library shortcuts off: watch_parse, write_at_once, take_at_once, eager (RELAY_LIBRARY_SHORTCUTS is false)"
    )
    assert internals.shortcuts_for(True) is internals.PROBED


def test_the_operator_turns_the_shortcuts_off_by_flag_or_environment():
    assert EdgeSettings().library_shortcuts is True
    assert load_settings(EdgeSettings, ["--library-shortcuts", "false"], {}).library_shortcuts is False
    assert load_settings(EdgeSettings, [], {"RELAY_LIBRARY_SHORTCUTS": "false"}).library_shortcuts is False


def test_a_probe_that_fails_turns_off_its_shortcut_and_those_that_need_it_with_the_reason(monkeypatch):
    def broken(conn, data):
        raise AttributeError("'ServerConnection' object has no attribute 'send_data'")

    monkeypatch.setattr(internals, "write_now", broken)
    probed = internals._probe()
    assert probed.watch_parse and probed.eager
    assert not probed.write_at_once and not probed.take_at_once
    assert "write_at_once: asyncio Connection: AttributeError: 'ServerConnection' object has no attribute" in probed.why_not
    assert "take_at_once: needs write_at_once" in probed.why_not
    assert probed.describe().startswith("library shortcuts off: write_at_once, take_at_once; on: watch_parse, eager (")


def test_a_parse_that_no_longer_goes_through_recv_frame_turns_the_watch_off(monkeypatch):
    # As if a release parsed frames without calling `recv_frame` for each.
    monkeypatch.setattr(Protocol, "recv_frame", lambda self, frame: self.events.append(frame))
    assert internals._probe_parse() == "Protocol.recv_frame does not see each parsed frame"


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


# --- run_eagerly: a coroutine run from plain code, at once, and finished by a task if it waits.


async def test_a_coroutine_that_does_not_wait_finishes_before_run_eagerly_returns():
    done = []

    async def append() -> None:
        done.append(1)

    assert run_eagerly(append(), asyncio.create_task) is None
    assert done == [1]


async def test_an_error_before_the_first_wait_is_raised_to_the_caller():
    async def fail() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_eagerly(fail(), asyncio.create_task)


async def test_a_coroutine_that_waits_on_a_future_is_finished_by_a_task_with_the_futures_result():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_then_record() -> None:
        seen.append("before")
        seen.append(await future)

    task = run_eagerly(wait_then_record(), asyncio.create_task)
    assert task is not None and seen == ["before"]
    future.set_result("result")
    await asyncio.wait_for(task, 1)
    assert seen == ["before", "result"]


async def test_a_futures_exception_reaches_the_coroutine_that_awaited_it():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_and_catch() -> None:
        try:
            await future
        except KeyError as exc:
            seen.append(exc)

    task = run_eagerly(wait_and_catch(), asyncio.create_task)
    future.set_exception(KeyError("k"))
    await asyncio.wait_for(task, 1)
    assert len(seen) == 1 and isinstance(seen[0], KeyError)


async def test_a_bare_yield_and_several_waits_in_a_row_are_resumed_in_order():
    seen = []

    async def steps() -> None:
        for n in range(3):
            await asyncio.sleep(0)
            seen.append(n)
        await asyncio.sleep(0.01)
        seen.append("slept")

    task = run_eagerly(steps(), asyncio.create_task)
    assert task is not None
    await asyncio.wait_for(task, 1)
    assert seen == [0, 1, 2, "slept"]


async def test_cancelling_the_task_cancels_what_the_coroutine_waits_for_and_raises_inside_it():
    future = asyncio.get_running_loop().create_future()
    seen = []

    async def wait_forever() -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    task = run_eagerly(wait_forever(), asyncio.create_task)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled inside"] and future.cancelled()
