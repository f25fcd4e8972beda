"""The edge's lease travels on a connection of its own, beside the main one (issue 18).

The main connection is put behind a proxy (`tests.nats_proxy`) that holds back what the
server sends it, as when the edge cannot read it as fast as it comes (a reconnect storm),
or that refuses it.
"""

from __future__ import annotations

import asyncio

import nats

from runtime.connection import where
from schemas.subjects import PRESENCE_BUCKET, edge_lease_key
from tests.harness import http_get, paired, running_edges, until
from tests.nats_proxy import nats_proxy

TTL_MS = 1500
WHOLE_TTL_MS = 2000


async def _lease_revision(nats_url: str, edge_id: str) -> int | None:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(PRESENCE_BUCKET)
        try:
            return (await kv.get(edge_lease_key(edge_id))).revision
        except nats.js.errors.KeyNotFoundError:
            return None
    finally:
        await nc.close()


async def test_a_lease_renewal_does_not_wait_behind_the_main_connections_traffic(nats_url):
    async with nats_proxy(nats_url) as proxy, running_edges(
        proxy.url, count=1, edge_lease_ttl_ms=TTL_MS, jetstream_timeout_ms=500, nats_ping_interval_ms=60_000
    ) as (a,), running_edges(nats_url, count=1, edge_lease_ttl_ms=TTL_MS) as (b,):
        mac_client, ios_client, _ = await paired(a, b)
        boot_id = a.boot_id
        main_name = f"relay-edge {a.settings.edge_id}"
        assert any(c.name == main_name for c in proxy.clients)
        before = await _lease_revision(nats_url, a.settings.edge_id)
        # Nothing the server sends the main connection reaches the edge: its requests'
        # answers wait behind everything before them. Three TTLs of it.
        proxy.hold_back(lambda name: name == main_name)
        try:
            for _ in range(3 * TTL_MS // 100):
                await asyncio.sleep(0.1)
                assert b.live_edges.get(a.settings.edge_id) == boot_id  # never taken for gone
        finally:
            proxy.release()
        after = await _lease_revision(nats_url, a.settings.edge_id)
        assert before is not None and after is not None and after >= before + 6  # renewed every TTL/3
        assert a.boot_id == boot_id and a.ctx.counters.leases_lost == 0
        await ios_client.expect_silence()  # no peer_disconnected
        await mac_client.send(type="relay", payload="after")
        assert (await ios_client.expect("relay"))["payload"] == "after"
        await ios_client.send(type="relay", payload="back")
        assert (await mac_client.expect("relay"))["payload"] == "back"


async def test_the_lease_lapses_while_the_main_connection_is_away_though_the_lease_connection_is_up(nats_url):
    # A lease renewed without the main connection would have the other edges count this
    # edge's sockets as connected while nothing reaches them. (Whole seconds: JetStream's
    # message TTLs are.)
    async with nats_proxy(nats_url) as proxy, running_edges(
        proxy.url, count=1, edge_lease_ttl_ms=WHOLE_TTL_MS, jetstream_timeout_ms=500
    ) as (a,), running_edges(nats_url, count=1, edge_lease_ttl_ms=WHOLE_TTL_MS) as (b,):
        mac_client, ios_client, mac = await paired(a, b)
        main_name = f"relay-edge {a.settings.edge_id}"
        lease_nc = a.leases.connection.nc
        assert lease_nc is not None and lease_nc.is_connected
        proxy.refuse(lambda name: name == main_name)
        away_at = asyncio.get_running_loop().time()
        assert await ios_client.expect("peer_disconnected", timeout=WHOLE_TTL_MS / 1000 + 5) == {
            "type": "peer_disconnected", "reason": "timeout",
        }  # fmt: skip
        assert asyncio.get_running_loop().time() - away_at >= WHOLE_TTL_MS / 1000 * 2 / 3
        assert a.settings.edge_id not in b.live_edges
        assert lease_nc.is_connected and a.leases.connection.nc is lease_nc  # its own connection was up throughout
        assert (await mac_client.expect_close(timeout=5))[0] == 1001
        # The main connection back: the edge serves again under a new incarnation.
        proxy.refuse(lambda name: False)
        await until(lambda: b.live_edges.get(a.settings.edge_id) == a.boot_id and a.ready.is_set(), timeout=15, step=0.05)
        assert (await http_get(a.port, "/readyz"))[0] == 200
