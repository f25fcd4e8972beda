"""The edge's long-running tasks (watchers, upkeep loops) are started again after an
unforeseen error, waiting longer while failures follow each other, and not otherwise."""

from __future__ import annotations

import asyncio

import pytest

from runtime import service
from runtime.service import keep_running


async def test_a_failing_task_waits_longer_while_failures_follow_each_other_and_starts_over_after_a_long_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(service.asyncio, "sleep", recorded_sleep)
    stopping = asyncio.Event()
    runs = iter(["fail", "fail", "fail", "long then fail", "fail", "stop"])

    async def run_once() -> None:
        match next(runs):
            case "fail":
                raise RuntimeError("a bug")
            case "long then fail":
                await real_sleep(0.06)
                raise RuntimeError("a bug, much later")
            case "stop":
                stopping.set()

    await asyncio.wait_for(keep_running("upkeep", run_once, stopping, failures_apart_s=0.05), 5)
    assert waits == [0.1, 0.2, 0.4, 0.1, 0.2]
