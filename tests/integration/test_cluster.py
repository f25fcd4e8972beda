"""A three-node JetStream cluster, as in production: edges on different NATS nodes, R3 buckets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import nats
import nats.errors
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from runtime.connection import where
from runtime.embedded_nats import EmbeddedNatsCluster
from schemas.subjects import PRESENCE_BUCKET, ROOMS_BUCKET
from tests.harness import Client, connect_mac, http_get, paired, running_edges, until


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(size=3) as nats_cluster:
        yield nats_cluster


async def restart_and_wait_healthy(cluster: EmbeddedNatsCluster, node) -> None:
    """Bring a killed node back and wait until every bucket has a leader and all replicas
    are current again, so that the next test starts on a whole cluster."""
    node.start()
    nc = await nats.connect(servers=cluster.urls)
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                infos = [await js.stream_info(f"KV_{bucket}") for bucket in (ROOMS_BUCKET, PRESENCE_BUCKET)]
                if all(
                    info.cluster
                    and info.cluster.leader
                    and all(peer.current and not peer.offline for peer in info.cluster.replicas or [])
                    for info in infos
                ):
                    return
            except (nats.errors.Error, asyncio.TimeoutError):
                pass
            assert asyncio.get_running_loop().time() < deadline, "the cluster did not recover"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_mac_and_ios_on_edges_of_different_nats_nodes_relay_in_order(cluster):
    # Each edge knows one node only, so the frames must cross the cluster's routes.
    async with running_edges(cluster.urls[0], count=1, kv_replicas=3) as (a,), running_edges(
        cluster.urls[2], count=1, kv_replicas=3
    ) as (b,):
        mac_client, ios_client, mac = await paired(a, b)
        for n in range(1000):
            await mac_client.ws.send(f'{{"type":"relay","payload":"m{n}"}}')
            await ios_client.ws.send(f'{{"type":"relay","payload":"i{n}"}}')
        to_ios = [json.loads(await asyncio.wait_for(ios_client.ws.recv(), 10))["payload"] for _ in range(1000)]
        to_mac = [json.loads(await asyncio.wait_for(mac_client.ws.recv(), 10))["payload"] for _ in range(1000)]
        assert to_ios == [f"m{n}" for n in range(1000)] and to_mac == [f"i{n}" for n in range(1000)]
        # A takeover across nodes: the new Mac on b, the old one on a is closed 4001.
        new_mac, _ = await connect_mac(b, mac)
        assert (await mac_client.expect_close())[0] == 4001
        await new_mac.expect("peer_joined")
        await ios_client.expect("peer_joined")


async def test_losing_the_nats_node_of_an_edge_keeps_the_rooms_and_restarts_its_sessions(cluster):
    async with running_edges(cluster.url, count=2, kv_replicas=3, edge_lease_ttl_ms=5000) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        lost = next(node for node in cluster.nodes if node.url == a.ctx.nc.connected_url.geturl())
        lost.kill()
        try:
            assert (await mac_client.expect_close(timeout=20))[0] == 1001
            # The room (R3) survived the node. While the cluster re-elects its leaders a
            # register can fail with 1011, or the edge, its lease lapsed meanwhile, can start
            # over with 1001 (or refuse the upgrade with 503); the Mac retries, as here.
            delay = 0.5
            for _ in range(12):
                try:
                    mac_again = await Client.connect(a, mac.room_id, "mac")
                    await mac_again.send(**mac.register_message())
                    reply = await mac_again.recv(timeout=20)
                except (ConnectionClosed, InvalidStatus) as refused:
                    if isinstance(refused, ConnectionClosed):
                        assert refused.rcvd is not None and refused.rcvd.code in (1001, 1011), refused
                    else:
                        assert refused.response.status_code == 503, refused
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                assert reply["type"] == "room_registered", reply  # never AUTH_FAILED for a transient failure
                break
            else:
                raise AssertionError("the Mac never registered again")
        finally:
            await restart_and_wait_healthy(cluster, lost)


async def test_a_departure_while_its_edge_has_no_nats_is_announced_once_it_reconnects(cluster):
    async with running_edges(cluster.urls[0] + "," + cluster.urls[1], count=1, kv_replicas=3) as (a,), running_edges(
        cluster.urls[2], count=1, kv_replicas=3
    ) as (b,):
        mac_client, ios_client, _ = await paired(a, b)
        lost = next(node for node in cluster.nodes if node.url == a.ctx.nc.connected_url.geturl())
        lost.kill()
        try:
            await mac_client.close()  # the Mac leaves while its edge cannot reach NATS
            assert await ios_client.expect("peer_disconnected", timeout=30) == {
                "type": "peer_disconnected",
                "reason": "client_left",
            }
        finally:
            await restart_and_wait_healthy(cluster, lost)


async def test_an_edge_that_cannot_renew_its_lease_for_a_ttl_closes_its_sockets_1001_and_refuses_new_ones(cluster):
    # The edge keeps its NATS node, but the node has no quorum (the other two are gone):
    # its lease expires for everyone else a TTL after its last renewal. It must not keep
    # sockets whose frames go nowhere until storage comes back (issue 15, routes cut).
    ttl_s = 2.0
    async with running_edges(cluster.urls[0], count=1, kv_replicas=3, edge_lease_ttl_ms=int(ttl_s * 1000)) as (a,):
        mac_client, ios_client, mac = await paired(a, a)
        others = [node for node in cluster.nodes if node.url != cluster.urls[0]]
        for node in others:
            node.kill()
        cut_at = asyncio.get_running_loop().time()
        try:
            assert (await mac_client.expect_close(timeout=20))[0] == 1001
            assert (await ios_client.expect_close(timeout=5))[0] == 1001
            fenced_after = asyncio.get_running_loop().time() - cut_at
            assert fenced_after >= ttl_s * 2 / 3, fenced_after  # not before the lease could have lapsed
            assert a.ctx.counters.leases_lost == 1  # its lease, not a NATS disconnect, closed them
            assert (await http_get(a.port, "/readyz"))[0] == 503
            with pytest.raises(InvalidStatus) as refused:
                await Client.connect(a, mac.room_id, "mac")
            assert refused.value.response.status_code == 503
        finally:
            others[0].start()
            await restart_and_wait_healthy(cluster, others[1])
        # Storage back: a new incarnation holds the lease, and the Mac registers again.
        deadline = asyncio.get_running_loop().time() + 30
        while (await http_get(a.port, "/readyz"))[0] != 200:
            assert asyncio.get_running_loop().time() < deadline, "the edge never became ready again"
            await asyncio.sleep(0.2)
        # Ready means it holds a lease; a node just back may still answer an upgrade's
        # storage read with 503 (try again), and the Mac agent tries again.
        while True:
            try:
                mac_again = await Client.connect(a, mac.room_id, "mac")
                break
            except InvalidStatus as refused:
                assert refused.response.status_code == 503
                assert asyncio.get_running_loop().time() < deadline, "the edge kept refusing upgrades"
                await asyncio.sleep(0.5)
        await mac_again.send(**mac.register_message())
        assert (await mac_again.recv(timeout=20))["type"] == "room_registered"


async def test_the_lease_connection_follows_the_main_connection_to_its_node(cluster):
    # A renewed lease must mean that this edge's node has storage: a lease connection on
    # another node would renew it while the main connection's node is cut off.
    async with running_edges(cluster.url, count=1, kv_replicas=3) as (a,):
        first = where(a.ctx.nc)
        assert where(a.leases.connection.nc) == first
        revision = a.leases.revision
        for _ in range(20):  # nats-py picks a node of its pool, perhaps the same one again
            await a.ctx.nc.force_reconnect()
            await until(lambda: a.ctx.nc.is_connected, timeout=10, step=0.02)
            if where(a.ctx.nc) != first:
                break
        assert where(a.ctx.nc) != first
        await until(lambda: where(a.leases.connection.nc) == where(a.ctx.nc), timeout=10, step=0.02)
        await until(lambda: a.leases.revision > revision + 1, timeout=10, step=0.02)  # renewed there
        assert where(a.leases.connection.nc) == where(a.ctx.nc)
