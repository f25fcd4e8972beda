"""/metrics of every service, scraped as Prometheus would and parsed by Prometheus' own
text parser (prometheus_client's): HELP and TYPE, the standard content type, process and
build metrics, and what an operator watches, counted exactly. No label names a room, a
user or a key."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.embedded_nats import EmbeddedNatsServer, free_port
from tests.harness import (
    MacIdentity,
    connect_ios,
    connect_mac,
    http_get,
    make_account,
    metrics,
    metrics_at,
    paired,
    running_edges,
    running_metering,
    until,
)

# Every label a metric of ours (or prometheus_client's process and platform metrics) has.
ALLOWED_LABELS = {"role", "status", "code", "event", "operation", "result", "gate", "service", "version", "python", "le",
                  "implementation", "major", "minor", "patchlevel"}  # fmt: skip


@pytest.fixture
def own_nats() -> Iterator[str]:
    with EmbeddedNatsServer() as server:
        yield server.url


async def _scrape(port: int) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 200"), head
    return headers["Content-Type"], body.decode()


def _check_exposition(content_type: str, body: str, service: str) -> dict[str, object]:
    """Every family has HELP and TYPE; the standard metrics are there; no forbidden label."""
    assert content_type.startswith("text/plain; version=") and "charset=utf-8" in content_type
    families = {family.name: family for family in text_string_to_metric_families(body)}
    for family in families.values():
        assert family.documentation, f"{family.name} has no HELP"
        assert family.type in {"counter", "gauge", "histogram", "info", "summary"}, (family.name, family.type)
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
    for line in body.splitlines():
        if line.startswith("# TYPE"):
            assert f"# HELP {line.split()[2]} " in body
    if sys.platform == "linux":
        assert "process_resident_memory_bytes" in families and "process_cpu_seconds" in families
    build = next(s for s in families["termrelay_build_info"].samples)
    assert build.value == 1 and build.labels["service"] == service and build.labels["version"]
    return families


async def test_edge_metrics_are_prometheus_text_with_help_type_process_and_build_info(own_nats):
    async with running_edges(own_nats, 1) as (edge,):
        content_type, body = await _scrape(edge.metrics_port)
        families = _check_exposition(content_type, body, "edge")
        for expected in ("relay_connections", "relay_upgrades", "relay_closes", "relay_frames_forwarded", "relay_bytes_forwarded",
                         "relay_frame_publish_seconds", "relay_frame_write_seconds", "relay_storage_operation_seconds",
                         "relay_storage_errors", "relay_quota_check_seconds", "relay_nats_events", "relay_draining",
                         "relay_drain_sockets_left", "relay_paired_rooms", "relay_live_edges"):  # fmt: skip
            assert expected in families, expected


async def test_edge_metrics_count_connections_upgrades_closes_frames_and_bytes_exactly(own_nats):
    async with running_edges(own_nats, 2) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        # A refused upgrade: a room id the protocol does not allow.
        assert (await http_get(a.port, "/ws?room_id=a.b&role=mac"))[0] == 400
        frame = json.dumps({"type": "relay", "payload": "x" * 100}, separators=(",", ":"))  # as the edge forwards it
        for _ in range(128):
            await mac_client.ws.send(frame)
        for _ in range(128):
            await ios_client.expect("relay")
        on_a, on_b = await metrics(a), await metrics(b)
        assert on_a['relay_connections{role="mac"}'] == 1 and on_a['relay_connections{role="ios"}'] == 0
        assert on_b['relay_connections{role="ios"}'] == 1
        assert on_a["relay_paired_rooms"] == 1 and on_b["relay_paired_rooms"] == 0
        assert on_a['relay_upgrades_total{status="101"}'] == 1 and on_a['relay_upgrades_total{status="400"}'] == 1
        assert on_a["relay_frames_forwarded_total"] == 128
        assert on_a["relay_bytes_forwarded_total"] == 128 * len(frame)
        # Timings of one frame in 64, on each side.
        assert on_a["relay_frame_publish_seconds_count"] == 2
        assert on_b["relay_frame_write_seconds_count"] == 2
        assert on_a['relay_storage_operation_seconds_count{operation="rooms.transact"}'] >= 1
        assert on_a["relay_live_edges"] == 2
        await mac_client.close()  # 1000, from the client
        await ios_client.expect("peer_disconnected")
        await until(lambda: not a.connections)
        assert (await metrics(a))['relay_closes_total{code="1000"}'] == 1
        await ios_client.send(type="nonsense-after-close")
        await ios_client.ws.close(4999)  # a client's own code: no label of its own
        await until(lambda: not b.connections)
        assert (await metrics(b))['relay_closes_total{code="other"}'] == 1


async def test_edge_metrics_count_the_quota_check_time_and_nats_events(own_nats):
    account = await make_account(own_nats, tier="free")
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", quota_check_timeout_ms=3000) as (edge,):
        mac, _ = await connect_mac(edge, MacIdentity.new(), account.auth)
        await mac.heartbeat()
        counted = await metrics(edge)
        assert counted["relay_quota_check_seconds_count"] >= 1
        assert counted['relay_nats_events_total{event="reconnected"}'] == 0  # there from the start, at 0
        assert counted['relay_storage_operation_seconds_count{operation="accounts.find_key"}'] >= 1


async def test_metering_serves_prometheus_metrics_with_batches_ledgers_quota_checks_and_lag(own_nats):
    account = await make_account(own_nats, tier="premium")
    port = free_port()
    async with running_metering(own_nats, metrics_port=port) as metering, running_edges(
        own_nats, 1, auth="required", usage_flush_interval_ms=50, quota_check_timeout_ms=3000, socket_rate_limit_per_s=0
    ) as (edge,):
        assert metering.metrics_port == port
        identity = MacIdentity.new()
        mac, _ = await connect_mac(edge, identity, account.auth)
        ios, _ = await connect_ios(edge, identity, account.auth)
        await ios.expect("peer_joined")
        await mac.expect("peer_joined")  # else its first frames may find no peer yet
        for n in range(10):
            await mac.send(type="relay", payload=f"p{n}")
        for _ in range(10):
            await ios.expect("relay")
        deadline = asyncio.get_running_loop().time() + 10
        while (counted := await metrics_at(port))["relay_metering_ledger_updates_total"] < 1:
            assert asyncio.get_running_loop().time() < deadline, "no ledger update counted"
            await asyncio.sleep(0.05)
        content_type, body = await _scrape(port)
        families = _check_exposition(content_type, body, "metering")
        assert counted["relay_metering_batches_applied_total"] >= 1
        assert counted['relay_metering_quota_checks_total{result="allowed"}'] == 2  # the Mac's and the iPhone's
        assert counted["relay_metering_batch_apply_seconds_count"] == counted["relay_metering_batches_applied_total"]
        assert "relay_metering_usage_pending" in families
        assert counted['relay_storage_operation_seconds_count{operation="usage.write_ledger"}'] >= 1


async def test_metering_metrics_port_answers_404_for_anything_else(own_nats):
    async with running_metering(own_nats, metrics_port=0) as metering:
        assert (await http_get(metering.metrics_port, "/"))[0] == 404
        assert (await http_get(metering.metrics_port, "/metrics"))[0] == 200
