"""The admission gate (`edge.admission`): bounded in flight, waiters in order, the rest
refused at once, and no place ever leaked by a waiter that timed out or was cancelled."""

from __future__ import annotations

import asyncio

import pytest

from edge.admission import Busy, Gate, Gates


async def _hold(gate: Gate, log: list[str], name: str, release: asyncio.Event) -> None:
    async with gate.place():
        log.append(name)
        await release.wait()


async def test_gate_holds_at_most_in_flight_and_serves_waiters_in_arrival_order():
    gate = Gate("t", in_flight=2, max_waiting=10, max_wait_s=None)
    entered: list[str] = []
    releases = {name: asyncio.Event() for name in "abcde"}
    tasks = [asyncio.create_task(_hold(gate, entered, name, releases[name])) for name in "abcde"]
    await asyncio.sleep(0.01)
    assert entered == ["a", "b"] and gate.holders == 2 and gate.waiting == 3
    releases["b"].set()
    await asyncio.sleep(0.01)
    assert entered == ["a", "b", "c"] and gate.holders == 2
    releases["a"].set()
    releases["c"].set()
    await asyncio.sleep(0.01)
    assert entered == ["a", "b", "c", "d", "e"]
    releases["d"].set()
    releases["e"].set()
    await asyncio.gather(*tasks)
    assert gate.holders == 0 and gate.waiting == 0
    assert gate.counts.admitted == 5 and gate.counts.refused == 0


async def test_gate_refuses_at_once_beyond_its_waiters():
    gate = Gate("t", in_flight=1, max_waiting=1, max_wait_s=None)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, [], "a", release))
    waiter = asyncio.create_task(_hold(gate, [], "b", release))
    await asyncio.sleep(0.01)
    assert gate.full
    with pytest.raises(Busy) as refused:
        async with gate.place():
            raise AssertionError("no place should have been given")
    assert 1 <= refused.value.retry_after_s <= 10
    assert gate.counts.refused == 1
    release.set()
    await asyncio.gather(holder, waiter)
    assert gate.holders == 0 and not gate.full


async def test_gate_refuses_a_waiter_that_waited_too_long_and_leaks_no_place():
    gate = Gate("t", in_flight=1, max_waiting=5, max_wait_s=0.02)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, [], "a", release))
    await asyncio.sleep(0)
    with pytest.raises(Busy):
        async with gate.place():
            raise AssertionError("no place should have been given")
    assert gate.waiting == 0 and gate.holders == 1
    release.set()
    await holder
    assert gate.holders == 0
    async with gate.place():  # the gate is whole again
        assert gate.holders == 1


async def test_gate_gives_on_the_place_of_a_cancelled_waiter():
    gate = Gate("t", in_flight=1, max_waiting=5, max_wait_s=None)
    release = asyncio.Event()
    entered: list[str] = []
    holder = asyncio.create_task(_hold(gate, entered, "a", release))
    cancelled = asyncio.create_task(_hold(gate, entered, "b", release))
    later = asyncio.create_task(_hold(gate, entered, "c", release))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, later), 1)
    assert cancelled.cancelled()
    assert entered == ["a", "c"] and gate.holders == 0 and gate.waiting == 0


async def test_gate_passes_on_a_place_handed_over_just_as_the_wait_was_cancelled():
    # The holder leaves (handing its place to the waiter) and the waiter is cancelled in
    # the same turn of the loop: the place must go on to the next one, not vanish.
    gate = Gate("t", in_flight=1, max_waiting=5, max_wait_s=None)
    entered: list[str] = []
    held = gate.place()
    await held.__aenter__()  # this task holds the one place
    handed = asyncio.create_task(_hold(gate, entered, "b", asyncio.Event()))
    release = asyncio.Event()
    later = asyncio.create_task(_hold(gate, entered, "c", release))
    await asyncio.sleep(0.01)
    assert gate.waiting == 2
    await held.__aexit__(None, None, None)  # the place goes to "b", whose task has not run
    handed.cancel()  # ... and is cancelled before it does
    release.set()
    await asyncio.wait_for(later, 1)  # hangs (and fails) if the place vanished
    assert handed.cancelled()
    assert entered == ["c"] and gate.holders == 0 and gate.waiting == 0


async def test_upgrades_are_refused_while_room_requests_would_be():
    gates = Gates(
        upgrades=Gate("upgrades", 4, 4, 1.0),
        room_requests=Gate("room_requests", 1, 0, 1.0),
        departures=Gate("departures", 1, 1 << 62, None),
    )
    gates.refuse_if_room_requests_full()  # nothing in flight: no refusal
    async with gates.room_requests.place():
        with pytest.raises(Busy):
            gates.refuse_if_room_requests_full()
    assert gates.upgrades.counts.refused == 1
    gates.refuse_if_room_requests_full()
