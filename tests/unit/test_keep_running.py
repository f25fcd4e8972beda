"""The edge's long-running tasks (watchers, upkeep loops) are started again after an
unforeseen error, waiting longer while failures follow each other, and not otherwise."""

from __future__ import annotations

import asyncio

import pytest

from edge import server
from edge.server import Edge
from edge.settings import EdgeSettings


async def test_a_failing_task_waits_longer_while_failures_follow_each_other_and_starts_over_after_a_long_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "_FAILURES_APART_S", 0.05)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(server.asyncio, "sleep", recorded_sleep)
    edge = Edge(EdgeSettings(nats_url="nats://127.0.0.1:4222", edge_id="unit"))
    runs = iter(["fail", "fail", "fail", "long then fail", "fail", "stop"])

    async def run_once() -> None:
        match next(runs):
            case "fail":
                raise RuntimeError("a bug")
            case "long then fail":
                await real_sleep(0.06)
                raise RuntimeError("a bug, much later")
            case "stop":
                edge.stop()

    await asyncio.wait_for(edge._keep_running("upkeep", run_once), 5)
    assert waits == [0.1, 0.2, 0.4, 0.1, 0.2]
