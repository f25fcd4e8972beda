"""Where one edge's time goes per frame: one pair across two in-process edges, under cProfile.

    .venv/bin/python -m bench.profile_one_pair 20000

Edges and clients share one process, so the rate is only for comparing runs of this
script with each other; the load benchmark is its own issue.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import pstats
import sys
import time

from runtime.embedded_nats import EmbeddedNatsServer
from tests.harness import paired, running_edges


async def profile(frames: int) -> None:
    with EmbeddedNatsServer() as nats_server:
        # Max rate on one socket is far past the inbound rate limit: off for this probe.
        async with running_edges(nats_server.url, socket_rate_limit_per_s=0) as (a, b):
            mac_client, ios_client, _ = await paired(a, b)
            frame = json.dumps({"type": "relay", "payload": "A" * 256})

            async def pump() -> None:
                for _ in range(frames):
                    await mac_client.ws.send(frame)

            async def sink() -> None:
                for _ in range(frames):
                    await ios_client.ws.recv()

            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            await asyncio.gather(pump(), sink())
            profiler.disable()
            elapsed = time.perf_counter() - started
            print(f"{frames} frames of 256-byte payload: {frames / elapsed:.0f} frames/s (all in one process)")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    asyncio.run(profile(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
