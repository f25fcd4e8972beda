"""How the edge spreads a periodic pass (lastSeen writes, registration refreshes) over
its time: small slices, evenly apart, never a burst."""

from __future__ import annotations

import math

import pytest

from edge.protocol.plans import spread_plan
from edge.settings import EdgeSettings

_SLICE = EdgeSettings.upkeep_slice  # the defaults
_SPREAD_STEP_S = EdgeSettings.spread_step_ms / 1000


@pytest.mark.parametrize(
    "count, over_s, size, gap_s",
    [
        (1000, 150.0, 1, 0.15),  # registrations of 1000 Macs: one write every 150 ms
        (2000, 15.0, 7, 15.0 / 286),  # lastSeen of 2000 sockets: 7 writes every ~52 ms
        (1, 15.0, 1, 15.0),
        (100_000, 15.0, _SLICE, 15.0 / 4000),  # more than slices 50 ms apart allow: closer
        (60, 0.2, 15, 0.05),  # the tests' short intervals
    ],
)
def test_a_pass_goes_in_slices_as_small_as_keeps_them_apart(count, over_s, size, gap_s):
    got_size, got_gap = spread_plan(count, over_s, _SLICE, _SPREAD_STEP_S)
    assert got_size == size
    assert got_gap == pytest.approx(gap_s)
    slices = math.ceil(count / got_size)
    assert slices * got_gap == pytest.approx(over_s)  # the whole pass fits its time
    assert got_gap >= _SPREAD_STEP_S or got_size == _SLICE


@pytest.mark.parametrize("count, over_s", [(0, 15.0), (0, 0.0), (5, 0.0), (5, -1.0)])
def test_an_empty_pass_or_one_without_time_goes_at_once(count, over_s):
    size, gap_s = spread_plan(count, over_s, _SLICE, _SPREAD_STEP_S)
    assert size == _SLICE and gap_s == 0.0


def test_a_drain_closes_both_sides_of_a_room_together_in_first_seen_order():
    from edge.protocol.plans import drain_order

    sockets = [("r1", "mac1"), ("r2", "mac2"), ("r1", "ios1"), ("r3", "ios3")]
    assert drain_order(sockets) == [["mac1", "ios1"], ["mac2"], ["ios3"]]
    assert drain_order([]) == []


def test_a_drain_of_many_rooms_closes_one_room_per_step_at_an_even_pace():
    # As the edge plans it: every room may go in one step; the pace comes from the drain's length.
    per_step, step_s = spread_plan(600, over_s=30.0, slice_size=600, step_s=0.05)
    assert per_step == 1 and step_s == 30.0 / 600
    # More rooms than steps of 50 ms: several a step, still the even share of the drain per second.
    per_step, step_s = spread_plan(5000, over_s=30.0, slice_size=5000, step_s=0.05)
    assert per_step == 9 and step_s >= 0.05
    assert abs(per_step / step_s - 5000 / 30.0) < 0.01 * 5000 / 30.0
