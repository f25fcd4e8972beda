"""Heartbeats, silence, dead edges and graceful shutdown. Timings are shortened settings."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import time

import nats

from schemas.subjects import PRESENCE_BUCKET, edge_lease_key
from tests.harness import (
    Client,
    EdgeProcess,
    MacIdentity,
    connect_ios,
    connect_mac,
    http_get,
    paired,
    running_edges,
)


async def joined_and_relaying(edge, mac: MacIdentity, mac_client: Client) -> Client:
    """An iPhone that joins `mac`'s room on `edge`: both sides hear peer_joined, and a frame
    from the Mac reaches it."""
    ios_client, _ = await connect_ios(edge, mac)
    await ios_client.expect("peer_joined")
    await mac_client.expect("peer_joined")
    await mac_client.send(type="relay", payload="aGk=")
    assert (await ios_client.expect("relay"))["payload"] == "aGk="
    return ios_client


async def test_heartbeat_dead_threshold_closes_silent_socket_4000_and_peer_hears_timeout(nats_url):
    async with running_edges(nats_url, heartbeat_dead_threshold_ms=300) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        ios_client, _ = await connect_ios(b, mac)
        await ios_client.expect("peer_joined")
        await mac_client.expect("peer_joined")
        # The Mac keeps talking; the iPhone falls silent.
        async def keep_talking() -> None:
            while True:
                await mac_client.send(type="heartbeat")
                await asyncio.sleep(0.05)

        talker = asyncio.create_task(keep_talking())
        try:
            assert (await ios_client.expect_error("HEARTBEAT_TIMEOUT"))["message"] == "No heartbeat received"
            assert await ios_client.expect_close() == (4000, "heartbeat timeout")
            while (message := await mac_client.recv())["type"] == "heartbeat_ack":
                pass
            assert message == {"type": "peer_disconnected", "reason": "timeout"}
            assert mac_client.ws.state.name == "OPEN"  # the talking side was never timed out
        finally:
            talker.cancel()


async def test_heartbeats_keep_a_socket_alive_past_the_dead_threshold(nats_url):
    async with running_edges(nats_url, count=1, heartbeat_dead_threshold_ms=300) as (edge,):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(edge, mac)
        for _ in range(12):  # 0.9 s in all, three thresholds
            await asyncio.sleep(0.075)
            await mac_client.heartbeat()


async def test_dead_edge_lease_expiry_tells_peer_timeout(nats_url):
    async with EdgeProcess(nats_url, edge_lease_ttl_ms=1000) as edge_process:
        async with running_edges(nats_url, count=1) as (survivor,):
            mac = MacIdentity.new()
            mac_client, _ = await connect_mac(survivor, mac)
            ios_client, _ = await connect_ios(edge_process, mac)
            await ios_client.expect("peer_joined")
            await mac_client.expect("peer_joined")
            await edge_process.stop(signal.SIGKILL)  # a crash: no word to anyone
            # Told through the lease's expiry (1 s TTL here): the heartbeat threshold is 45 s.
            assert await mac_client.expect("peer_disconnected", timeout=10) == {
                "type": "peer_disconnected",
                "reason": "timeout",
            }
            # The room record still names the dead socket, but it no longer counts.
            assert (await mac_client.heartbeat())["mac_connected"] is True
            await mac_client.send(type="relay", payload="eA==")
            await mac_client.expect_error("NO_PEER")
            # The iPhone reconnects to the surviving edge and carries on.
            ios_again, _ = await connect_ios(survivor, mac)
            await ios_again.expect("peer_joined")
            await mac_client.expect("peer_joined")


async def test_the_idle_peer_of_a_killed_edge_hears_timeout_within_ten_seconds_by_default(nats_url):
    # Issue 17: the default lease (8 s, renewed every 2.7 s) bounds what an idle peer waits.
    async with EdgeProcess(nats_url) as edge_process:
        async with running_edges(nats_url, count=1) as (survivor,):
            mac_client, _, _ = await paired(survivor, edge_process)
            await asyncio.sleep(3)  # past a renewal: the kill lands anywhere in the renewal cycle
            killed = time.monotonic()
            await edge_process.stop(signal.SIGKILL)
            assert (await mac_client.expect("peer_disconnected", timeout=15))["reason"] == "timeout"
            assert time.monotonic() - killed <= 10.0


async def test_sigterm_closes_every_socket_1001_and_peers_hear_server_restart(nats_url):
    async with EdgeProcess(nats_url, admin_token="op-secret-42") as edge_process:
        async with running_edges(nats_url, count=1) as (survivor,):
            pairs = [await paired(edge_process, survivor) for _ in range(3)]
            local = await paired(edge_process, edge_process)  # both sides on the stopping edge
            assert await edge_process.stop(signal.SIGTERM) == 0
            for on_stopping_edge, on_survivor, _ in pairs:
                assert (await on_stopping_edge.expect_close())[0] == 1001
                assert await on_survivor.expect("peer_disconnected") == {
                    "type": "peer_disconnected",
                    "reason": "server_restart",
                }
            for client in local[:2]:
                assert (await client.expect_close())[0] == 1001
            # The operator token never reached the log.
            log = edge_process.log_text()
            assert "edge" in log and "op-secret-42" not in log
            # The Macs reconnect at once to another edge and take their rooms back.
            for _, ios_client, mac in pairs:
                mac_client, _ = await connect_mac(survivor, mac)
                await mac_client.expect("peer_joined")
                await ios_client.expect("peer_joined")


async def test_peers_hear_server_restart_even_when_the_shutdown_outlasts_the_lease(nats_url):
    # A client that does not answer the close holds the shutdown for the close timeout,
    # here longer than the lease: the lease is renewed until the slots are released, so no
    # other edge declares this one dead and tells the peer `timeout` instead.
    async with running_edges(nats_url, count=1) as (survivor,):
        async with running_edges(nats_url, count=1, edge_lease_ttl_ms=1000, close_timeout_ms=2500) as (stopping,):
            mac_client, ios_client, _ = await paired(stopping, survivor)
            mac_client.ws.transport.pause_reading()  # it will not see, nor answer, the close
            stopping.stop()
            assert await ios_client.expect("peer_disconnected", timeout=8) == {
                "type": "peer_disconnected",
                "reason": "server_restart",
            }


async def test_sigterm_frees_the_slots_so_status_shows_them_disconnected(nats_url):
    async with EdgeProcess(nats_url) as edge_process:
        async with running_edges(nats_url, count=1) as (other,):
            mac_client, ios_client, mac = await paired(edge_process, other)
            await edge_process.stop(signal.SIGTERM)
            await ios_client.expect("peer_disconnected")
            record, _ = await other.ctx.rooms.get(mac.room_id)
            assert record is not None and record.mac is None and record.ios is not None


async def test_edge_that_lost_its_lease_closes_its_sockets_1001_and_starts_over(nats_url):
    async with running_edges(nats_url, edge_lease_ttl_ms=1000) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        # As if edge a had stalled past its lease: the lease is gone under it.
        nc = await nats.connect(nats_url)
        try:
            await (await nc.jetstream().key_value(PRESENCE_BUCKET)).delete(edge_lease_key(a.settings.edge_id))
        finally:
            await nc.close()
        assert await ios_client.expect("peer_disconnected") == {"type": "peer_disconnected", "reason": "timeout"}
        assert (await mac_client.expect_close())[0] == 1001
        # Edge a serves again under a new incarnation.
        mac_again, _ = await connect_mac(a, mac)
        await mac_again.expect("peer_joined")
        await ios_client.expect("peer_joined")


async def test_slow_reader_is_closed_1013_without_stalling_other_rooms(nats_url):
    async with running_edges(nats_url, socket_queue_max_msgs=20, close_timeout_ms=300) as (a, b):
        fast_mac, slow_ios, _ = await paired(a, b)
        other_mac, other_ios, _ = await paired(a, b)
        # slow_ios never reads; its client stops reading from TCP after a few frames.
        payload = "A" * 65536
        for _ in range(300):
            await fast_mac.ws.send(f'{{"type":"relay","payload":"{payload}"}}')
            await other_mac.send(type="relay", payload="still-flowing")
            assert (await other_ios.expect("relay"))["payload"] == "still-flowing"
        # Frames the Mac sent after the iPhone's socket was closed and before the news of
        # it reached the Mac are answered NO_PEER (§12: a frame nobody got); then the news.
        message = await fast_mac.recv(15)
        while message == {"type": "error", "code": "NO_PEER", "message": "Peer not connected"}:
            message = await fast_mac.recv(15)
        assert message["type"] == "peer_disconnected" and message["reason"] == "timeout", message


async def test_edge_waiting_for_nats_is_healthy_not_ready_and_stops_promptly_on_sigterm():
    from runtime.embedded_nats import free_port

    unreachable, port = f"nats://127.0.0.1:{free_port()}", free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli", "--nats-url", unreachable, "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(1.0)  # it keeps retrying: an edge may start before its NATS
        assert process.returncode is None
        assert (await http_get(port, "/healthz"))[0] == 200
        assert (await http_get(port, "/readyz"))[0] == 503
        assert (await http_get(port, "/ws?room_id=ROOM&role=mac"))[0] == 503
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert "stopped before it was serving" in (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_after_a_nats_outage_sockets_are_closed_1001_so_sessions_restart(tmp_path):
    from runtime.embedded_nats import EmbeddedNatsServer

    server = EmbeddedNatsServer(store_dir=tmp_path / "nats").start()
    try:
        async with running_edges(server.url, edge_lease_ttl_ms=5000) as (a, b):
            mac_client, ios_client, mac = await paired(a, b)
            server.kill()  # frames in flight now may be lost: the sessions cannot be trusted
            await asyncio.sleep(0.5)
            server.start()
            assert (await mac_client.expect_close(timeout=15))[0] == 1001
            assert (await ios_client.expect_close(timeout=15))[0] == 1001
            # Both reconnect and pair again; the room survived in JetStream.
            await paired(a, b, mac)
    finally:
        server.stop()


async def test_an_edge_that_died_during_a_nats_outage_is_known_dead_afterwards(tmp_path):
    from runtime.embedded_nats import EmbeddedNatsServer

    server = EmbeddedNatsServer(store_dir=tmp_path / "nats").start()
    try:
        async with EdgeProcess(server.url, edge_lease_ttl_ms=1000) as doomed, running_edges(
            server.url, count=1, edge_lease_ttl_ms=5000
        ) as (survivor,):
            mac_client, _, mac = await paired(survivor, doomed)
            server.kill()
            await doomed.stop(signal.SIGKILL)  # dies while nobody can hear it
            await asyncio.sleep(1.5)
            server.start()
            assert (await mac_client.expect_close(timeout=15))[0] == 1001
            # Once the survivor has rebuilt its view of the leases, the dead iPhone's slot
            # no longer counts: a registering Mac gets no peer_joined for it.
            deadline = time.monotonic() + 10
            while True:
                mac_again, _ = await connect_mac(survivor, mac)
                try:
                    await mac_again.expect_silence(within=0.3)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "the dead edge's socket still counts as connected"
                    await mac_again.close()
    finally:
        server.stop()


async def test_a_vanished_iphone_that_neither_reads_nor_sends_is_still_closed_and_its_peer_told(nats_url):
    from websockets.asyncio.client import connect

    from tests.harness import join_message, ws_url

    async with running_edges(nats_url, heartbeat_dead_threshold_ms=500, close_timeout_ms=300) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        ws = await connect(ws_url(b, mac.room_id, "ios"), max_size=None, max_queue=1, compression=None)
        ios_client = Client(ws)
        await ios_client.send(**join_message(mac))
        await ios_client.expect("peer_joined")
        await mac_client.expect("peer_joined")
        ws.transport.pause_reading()  # the phone left the network: it reads nothing more
        for _ in range(300):  # 15 MB of terminal output, under the socket's queue limits
            await mac_client.send(type="relay", payload="B" * 50_000)

        async def keep_talking() -> None:
            while True:
                await mac_client.send(type="heartbeat")
                await asyncio.sleep(0.1)

        async def first_news() -> dict:
            while (message := await mac_client.recv())["type"] == "heartbeat_ack":
                pass
            return message

        talker = asyncio.create_task(keep_talking())
        try:
            # Threshold 0.5 s + sweep + two close timeouts of 0.3 s: 5 s is a generous bound,
            # and far below what the socket's queue limits alone would take.
            assert await asyncio.wait_for(first_news(), 5) == {"type": "peer_disconnected", "reason": "timeout"}
        finally:
            talker.cancel()
        assert b.connections == {}


async def test_a_mac_that_reconnects_while_its_edge_starts_over_is_paired_normally(nats_url):
    async with running_edges(nats_url, close_timeout_ms=2000, edge_lease_ttl_ms=1500) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        stuck, _ = await connect_mac(a, MacIdentity.new())
        stuck.ws.transport.pause_reading()  # its close will take the full close timeout
        nc = await nats.connect(nats_url)
        try:
            await (await nc.jetstream().key_value(PRESENCE_BUCKET)).delete(edge_lease_key(a.settings.edge_id))
        finally:
            await nc.close()
        assert (await mac_client.expect_close())[0] == 1001
        # The Mac reconnects at once, while the edge is still closing the stuck socket.
        mac_again, _ = await connect_mac(a, mac)
        await joined_and_relaying(b, mac, mac_again)


async def test_a_mac_back_on_its_restarted_edge_is_paired_again_every_time(nats_url):
    # Issue 17, a rolling restart: the Mac's edge gets SIGTERM and comes back with the same
    # id and port; the Mac re-registers there and both sides hear peer_joined at once.
    mac_edge = EdgeProcess(nats_url, edge_id=f"restarted-{secrets.token_hex(3)}")
    await mac_edge.start()
    try:
        async with running_edges(nats_url, count=1) as (ios_edge,):
            mac = MacIdentity.new()
            mac_client, ios_client, _ = await paired(mac_edge, ios_edge, mac)
            for restart in range(20):
                await mac_edge.stop(signal.SIGTERM)
                assert (await mac_client.expect_close())[0] == 1001
                assert (await ios_client.expect("peer_disconnected"))["reason"] == "server_restart"
                port, mac_edge = mac_edge.port, EdgeProcess(nats_url, edge_id=mac_edge.edge_id)
                mac_edge.port = port
                mac_edge.args[mac_edge.args.index("--port") + 1] = str(port)
                await mac_edge.start()
                began = time.monotonic()
                mac_client, _ = await connect_mac(mac_edge, mac)
                assert (await mac_client.expect("peer_joined", timeout=5))["public_key"], restart
                assert (await ios_client.expect("peer_joined", timeout=5))["public_key"], restart
                assert time.monotonic() - began < 1.0, restart
                await mac_client.send(type="relay", payload=f"round {restart}")
                assert (await ios_client.expect("relay"))["payload"] == f"round {restart}"
    finally:
        await mac_edge.stop(signal.SIGKILL)


async def test_a_join_that_finds_the_mac_on_an_edge_incarnation_its_lease_view_has_not_seen_yet_pairs_them(nats_url):
    # After a restart of the whole NATS cluster the edges' lease watchers come back seconds
    # after their sockets: a slot of an incarnation the view did not hold looked dead, the
    # join named no peer, and the Mac and the iPhone each waited for the other for good.
    async with running_edges(nats_url, edge_lease_ttl_ms=60_000) as (a, b):  # no renewal within the test
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        b.ctx.live_edges.pop(a.settings.edge_id)  # b's watcher has not seen a's lease yet
        await joined_and_relaying(b, mac, mac_client)


async def test_a_departure_tells_a_peer_on_an_edge_incarnation_the_lease_view_has_not_seen_yet(nats_url):
    async with running_edges(nats_url, edge_lease_ttl_ms=60_000) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        b.ctx.live_edges.pop(a.settings.edge_id)
        await ios_client.close()
        assert (await mac_client.expect("peer_disconnected"))["type"] == "peer_disconnected"


def _lease_reads() -> float:
    from runtime.metrics import storage_seconds

    (count,) = [s.value for m in storage_seconds.collect() for s in m.samples
                if s.name.endswith("_count") and s.labels.get("operation") == "presence.read_lease"] or [0.0]  # fmt: skip
    return count


async def test_a_slot_of_an_incarnation_the_lease_view_saw_go_costs_no_lease_read(nats_url):
    # A crashed edge's slots linger until their rooms are used again: each register or join
    # there must not cost a read of a lease that is gone for good (boot ids never come back).
    async with running_edges(nats_url, edge_lease_ttl_ms=60_000) as (a, b):
        mac = MacIdentity.new()
        await connect_mac(a, mac)
        b.ctx.live_edges.pop(a.settings.edge_id)
        b.ctx.note_gone(a.settings.edge_id, a.boot_id)  # as b's watcher notes an edge's death
        before = _lease_reads()
        ios_client, _ = await connect_ios(b, mac)
        await ios_client.expect_silence(0.5)  # no peer_joined: the Mac's edge counts as dead here
        assert _lease_reads() == before
        b.ctx.gone_incarnations.clear()  # not known gone: one read tells
        ios_again, _ = await connect_ios(b, mac)
        await ios_again.expect("peer_joined")
        assert _lease_reads() == before + 1
