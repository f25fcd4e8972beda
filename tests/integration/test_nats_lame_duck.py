"""A NATS node in lame-duck mode costs an edge no socket (`edge.nats_move`): a rolling
restart of the NATS cluster, with frames streaming both ways all along."""

from __future__ import annotations

import asyncio
import contextlib
import time

from runtime.embedded_nats import EmbeddedNatsCluster
from tests.harness import Client, metrics, paired, running_edges, until

# The shortest the server allows (30 s); the clients go after a 1 s grace, one by one.
LAME_DUCK = 'lame_duck_duration: "30s"\nlame_duck_grace_period: "1s"'


async def _stream(client: Client, prefix: str, stop: asyncio.Event) -> list[str]:
    sent: list[str] = []
    while not stop.is_set():
        payload = f"{prefix}{len(sent)}"
        await client.send(type="relay", payload=payload)
        sent.append(payload)
        await asyncio.sleep(0.005)
    return sent


async def _receive(client: Client, into: list[dict]) -> None:
    """Everything the client receives, into `into`, until cancelled."""
    while True:
        into.append(await client.recv(timeout=30))


async def test_a_nats_node_in_lame_duck_mode_costs_the_edge_no_socket_and_relaying_goes_on():
    with EmbeddedNatsCluster(size=3, extra_config=LAME_DUCK) as cluster:
        # Each edge is told one node (it learns the others from it): edge a's node goes.
        async with running_edges(cluster.urls[0], count=1, kv_replicas=3) as (a,), running_edges(
            cluster.urls[1], count=1, kv_replicas=3
        ) as (b,):
            pairs = [await paired(a, b) for _ in range(4)] + [await paired(b, a)] + [await paired(a, a)]
            stop = asyncio.Event()
            flows = []
            for n, (mac_client, ios_client, _) in enumerate(pairs):
                for sender, receiver, prefix in ((mac_client, ios_client, f"m{n}-"), (ios_client, mac_client, f"i{n}-")):
                    received: list[dict] = []
                    flows.append((asyncio.create_task(_stream(sender, prefix, stop)), asyncio.create_task(_receive(receiver, received)), received))
            await asyncio.sleep(0.3)
            old_port = a.ctx.nc.connected_url.port
            assert old_port == cluster.nodes[0].port
            started = time.monotonic()
            cluster.nodes[0].enter_lame_duck_mode()
            await until(lambda: a.ctx.counters.nats_moves == 1, timeout=20)
            moved_in = time.monotonic() - started
            await asyncio.sleep(0.3)  # relaying on after the move
            stop.set()
            for streaming, receiving, received in flows:
                sent = await streaming
                with contextlib.suppress(AssertionError):
                    await until(lambda: any(m.get("payload") == sent[-1] for m in received), timeout=10)
                receiving.cancel()
                # Every frame, once, in order; nothing else (no peer_disconnected, no error).
                assert [m.get("payload") for m in received] == sent, [m for m in received if m.get("type") != "relay"][:3]
                assert len(sent) > 100
            assert a.ctx.nc.connected_url.port != old_port
            assert a.ctx.frame_nc is a.ctx.nc and a.nats_move.bridge is None
            for mac_client, ios_client, _ in pairs:
                assert mac_client.ws.close_code is None and ios_client.ws.close_code is None
            assert (await metrics(a))["relay_nats_moves_total"] == 1
            assert moved_in < 15
            # Storage works on the new node: a new pair on the moved edge.
            await paired(a, b)
