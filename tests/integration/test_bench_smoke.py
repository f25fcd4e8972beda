"""The load generator still works: smoke runs of 2 pairs for a few seconds against real edges.

No timing is asserted: the benchmark's figures are read by people (`make bench`), never gated.
"""

from __future__ import annotations

import asyncio
import os

from bench.loadgen import REPORT_FIELDS, LoadConfig, run_load, summary
from tests.harness import make_account, running_edges


async def test_load_generator_relays_frames_both_ways_across_two_edges_without_loss(nats_url):
    account = await make_account(nats_url, tier="pro")
    async with running_edges(nats_url, auth="required", socket_rate_limit_per_s=0) as (a, b):
        cfg = LoadConfig(
            mac_urls=[f"ws://127.0.0.1:{a.port}"],
            ios_urls=[f"ws://127.0.0.1:{b.port}"],
            pairs=2,
            workers=2,
            mode="max",
            window=4,
            duration_s=2.0,
            warmup_s=0.2,
            api_key=account.api_key,
            relay_pid=os.getpid(),  # the edges run in this process
        )
        # The coordinator blocks while it waits for its workers; the edges need this loop.
        report = await asyncio.to_thread(run_load, cfg)

    for name in REPORT_FIELDS["common"] + REPORT_FIELDS["traffic"]:
        assert name in report, f"report lacks {name}"
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99", "max"}
    assert set(report["setup"]) >= {"paired", "failed", "p50_ms", "max_ms"}
    assert {"cpu_s", "rss_kib"} <= set(report["relay"])
    assert report["setup"] == report["setup"] | {"paired": 2, "failed": 0}
    assert report["delivered_per_s"] > 0 and report["received"] > 0
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["reordered"] == 0
    assert report["errors"] == 0, report["error_samples"]
    assert report["disconnects"] == 0
    assert "frames/s" in summary(report)


async def test_realistic_mode_batches_payloads_and_has_every_heartbeat_answered(nats_url):
    """TermOnMac's cadence (protocol.md §3.2.4, §5, §9): 2 pairs and 1 idle Mac each for 3 s,
    bursts often enough that batches surely go out, idle Macs' heartbeats every second."""
    account = await make_account(nats_url, tier="pro")
    async with running_edges(nats_url, auth="required", socket_rate_limit_per_s=0) as (a, b):
        cfg = LoadConfig(
            mac_urls=[f"ws://127.0.0.1:{a.port}"],
            ios_urls=[f"ws://127.0.0.1:{b.port}"],
            pairs=2,
            workers=2,
            mode="realistic",
            idle_macs_per_pair=1,
            burst_every_s=0.5,
            idle_heartbeat_s=1.0,
            duration_s=3.0,
            warmup_s=0.5,
            api_key=account.api_key,
            relay_pid=os.getpid(),
        )
        report = await asyncio.to_thread(run_load, cfg)

    for name in REPORT_FIELDS["common"] + REPORT_FIELDS["traffic"] + REPORT_FIELDS["realistic"]:
        assert name in report, f"report lacks {name}"
    assert report["setup"] == report["setup"] | {"paired": 2, "failed": 0, "idle_registered": 2, "idle_failed": 0}
    assert report["sockets"] == 6
    assert report["lost"] == 0 and report["received"] == report["sent"] > 0
    assert report["duplicates"] == 0
    assert report["reordered"] == 0
    assert report["errors"] == 0, report["error_samples"]
    assert report["disconnects"] == 0 and report["send_failures"] == 0
    # Keystrokes one way, echoes and bursts the other, some of them in batches.
    assert report["latency_by_direction"]["ios_to_mac"]["samples"] > 0
    assert report["latency_by_direction"]["mac_to_ios"]["samples"] > 0
    assert report["bursts"] > 0
    assert report["batches"]["received"] == report["batches"]["sent"] > 0
    assert report["batches"]["payloads_received"] >= 2 * report["batches"]["received"]
    for kind in ("mac", "ios", "idle_mac"):
        beats = report["heartbeats"][kind]
        assert beats["acked"] > 0 and beats["unanswered"] == 0, (kind, beats)
    assert {"cpu_s", "cpu_util", "cpu_per_pair"} <= set(report["relay"])
    assert "payloads/s" in summary(report)
