"""Draining instead of a reconnect storm (issue 17): a stopped edge answers 503 to new
connections while its sockets relay on, then closes them 1001 at a bounded pace, both
sides of a room on it together; a second stop closes the rest at once. Real edges, real
nats-server, real WebSocket clients."""

from __future__ import annotations

import asyncio
import signal
import time

from websockets.exceptions import InvalidStatus

from tests.harness import Client, EdgeProcess, MacIdentity, connect_mac, http_get, paired, running_edges, until


async def _upgrade_status(edge, role: str = "mac") -> int:
    try:
        client = await Client.connect(edge, MacIdentity.new().room_id, role)
    except InvalidStatus as exc:
        return exc.response.status_code
    await client.close()
    return 101


async def test_a_draining_edge_answers_503_to_new_connections_while_its_sockets_relay_on(nats_url):
    async with running_edges(nats_url, drain_grace_ms=1_500, drain_ms=0) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        a.stop()
        await until(lambda: not a.ready.is_set())
        assert (await http_get(a.port, "/readyz"))[0] == 503
        assert await _upgrade_status(a) == 503
        await mac_client.send(type="relay", payload="still relayed while draining")
        assert (await ios_client.expect("relay"))["payload"] == "still relayed while draining"
        assert (await mac_client.heartbeat())["mac_connected"] is True
        # After the grace: closed 1001, and the peer hears why.
        assert (await mac_client.expect_close(timeout=10))[0] == 1001
        assert (await ios_client.expect("peer_disconnected", timeout=10))["reason"] == "server_restart"


async def test_a_drain_closes_the_sockets_at_a_bounded_pace_and_both_sides_of_a_room_together(nats_url):
    rooms_here, rooms_across = 12, 12
    async with running_edges(nats_url, drain_grace_ms=0, drain_ms=2_400) as (a, b):
        here = [await paired(a, a) for _ in range(rooms_here)]
        across = [await paired(a, b) for _ in range(rooms_across)]
        closed_at: dict[int, float] = {}

        async def watch(client: Client) -> None:
            assert (await client.expect_close(timeout=20))[0] == 1001
            closed_at[id(client)] = time.monotonic()

        on_a = [c for mac, ios, _ in here for c in (mac, ios)] + [mac for mac, _, _ in across]
        watching = [asyncio.create_task(watch(c)) for c in on_a]
        began = time.monotonic()
        a.stop()
        await asyncio.gather(*watching)
        times = sorted(closed_at.values())
        # Spread over the drain, not at once: 24 rooms over 2.4 s, one every 0.1 s.
        assert times[-1] - times[0] >= 1.2, times
        for start in times:
            assert sum(start <= t < start + 0.3 for t in times) <= len(times) // 2, (start - began, times)
        # A room whose both sides are here closes together.
        for mac, ios, _ in here:
            assert abs(closed_at[id(mac)] - closed_at[id(ios)]) < 0.3
        # The iPhones across hear server_restart, and their Macs pair again on the other edge.
        for mac_client, ios_client, mac in across[:3]:
            assert (await ios_client.expect("peer_disconnected"))["reason"] == "server_restart"
            again, _ = await connect_mac(b, mac)
            assert (await again.expect("peer_joined"))["public_key"]
            await again.send(type="relay", payload="again")
            assert (await ios_client.expect("peer_joined"))
            assert (await ios_client.expect("relay"))["payload"] == "again"


async def test_a_second_stop_closes_what_the_drain_has_left_at_once(nats_url):
    async with running_edges(nats_url, count=1, drain_grace_ms=0, drain_ms=60_000) as (a,):
        pairs = [await paired(a, a) for _ in range(6)]
        clients = [c for mac, ios, _ in pairs for c in (mac, ios)]
        a.stop()
        await until(lambda: len(a.connections) < len(clients), timeout=10)  # the drain has begun
        began = time.monotonic()
        a.stop()
        closes = await asyncio.gather(*(c.expect_close(timeout=10) for c in clients))
        assert {code for code, _ in closes} == {1001}
        assert time.monotonic() - began < 5  # not the 60 s the drain had left


async def test_sigterm_drains_a_relay_edge_process_and_a_second_sigterm_ends_it(nats_url):
    edge = EdgeProcess(nats_url, drain_grace_ms=30_000, drain_ms=30_000)
    async with edge:
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(edge, mac)
        edge.process.send_signal(signal.SIGTERM)
        await until(lambda: "draining 1 sockets" in edge.log_text(), timeout=10)
        assert (await http_get(edge.port, "/readyz"))[0] == 503
        assert (await mac_client.heartbeat())["type"] == "heartbeat_ack"  # relaying goes on
        began = time.monotonic()
        assert await edge.stop(signal.SIGTERM) == 0
        assert time.monotonic() - began < 10  # not the minute of grace and drain
        assert (await mac_client.expect_close())[0] == 1001


async def test_five_hundred_sockets_drain_at_the_configured_pace_reconnect_elsewhere_and_usage_is_exact(nats_url, tmp_path):
    from tests.harness import TEST_USER
    from tests.integration.test_metering import read_ledger, start_metering, stop_metering

    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.premium]\nmax_rooms = -1\n")  # the local user's 250 rooms
    metering, metering_task = await start_metering(nats_url, tiers_file=str(tiers))
    try:
        async with running_edges(nats_url, drain_grace_ms=0, drain_ms=3_000, tiers_file=str(tiers)) as (a, b):
            pairs = [await paired(a, a) for _ in range(250)]  # 500 sockets on the edge to drain
            for mac_client, ios_client, _ in pairs:
                await mac_client.send(type="relay", payload="before")
            for _, ios_client, _ in pairs:
                assert (await ios_client.expect("relay"))["payload"] == "before"
            closed_at: list[float] = []

            async def watch(client: Client) -> None:
                assert (await client.expect_close(timeout=30))[0] == 1001
                closed_at.append(time.monotonic())

            clients = [c for mac, ios, _ in pairs for c in (mac, ios)]
            watching = [asyncio.create_task(watch(c)) for c in clients]
            a.stop()
            await asyncio.gather(*watching)
            closed_at.sort()
            # 250 rooms over 3 s: about 83 a second; never more than twice that in any second.
            for start in closed_at:
                assert sum(start <= t < start + 1.0 for t in closed_at) <= 2 * 2 * 250 / 3, closed_at
            assert closed_at[-1] - closed_at[0] >= 2.0
            # Every pair reconnects to the other edge and relays again.
            for _, _, mac in pairs:
                mac_again, ios_again, _ = await paired(b, b, mac)
                await mac_again.send(type="relay", payload="after")
                assert (await ios_again.expect("relay"))["payload"] == "after"
                await mac_again.close()
                await ios_again.close()
        # Both edges have stopped and flushed: one credit per relayed frame, none lost or doubled.
        deadline = time.monotonic() + 15
        while True:
            ledger = await read_ledger(nats_url, TEST_USER.get())
            counted = sum(w.message_tokens for w in ledger.windows)
            if counted >= 500 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert counted == 500
    finally:
        await stop_metering(metering, metering_task)
