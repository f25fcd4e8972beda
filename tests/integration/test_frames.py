"""Forwarding frames, errors that leave the socket open, limits — across two edges."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from tests.harness import Client, MacIdentity, connect_ios, paired, running_edges, ws_url


async def test_relay_is_reserialised_with_only_type_and_payload(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await mac_client.send(type="relay", payload="cGF5bG9hZA==", secret="do not forward", extra=[1, 2])
        raw = await asyncio.wait_for(ios_client.ws.recv(), 5)
        assert json.loads(raw) == {"type": "relay", "payload": "cGF5bG9hZA=="}


async def test_relay_batch_is_forwarded_as_a_batch_in_order(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        payloads = [f"p{n}" for n in range(20)]
        await mac_client.send(type="relay_batch", payloads=payloads, note="dropped")
        assert await ios_client.expect("relay_batch") == {"type": "relay_batch", "payloads": payloads}
        await ios_client.send(type="relay_batch", payloads=["x", "y"])
        assert (await mac_client.expect("relay_batch"))["payloads"] == ["x", "y"]


async def test_relay_batch_over_256_payloads_gives_bad_message(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await mac_client.send(type="relay_batch", payloads=["a"] * 257)
        await mac_client.expect_error("BAD_MESSAGE")
        await ios_client.expect_silence()
        await mac_client.send(type="relay_batch", payloads=["a"] * 256)
        assert len((await ios_client.expect("relay_batch"))["payloads"]) == 256


async def test_relay_before_register_gives_not_in_room(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        client = await Client.connect(edge, MacIdentity.new().room_id, "mac")
        await client.send(type="relay", payload="eA==")
        await client.expect_error("NOT_IN_ROOM")
        await client.send(type="relay_batch", payloads=["eA=="])
        await client.expect_error("NOT_IN_ROOM")
        await client.heartbeat()


async def test_relay_without_peer_gives_no_peer(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, "mac")
        await client.send(**mac.register_message())
        await client.expect("room_registered")
        await client.send(type="relay", payload="eA==")
        error = await client.expect_error("NO_PEER")
        assert error["message"] == "Peer not connected"
        await client.heartbeat()


async def test_malformed_json_and_unknown_type_give_bad_message_and_socket_stays_open(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        client = await Client.connect(edge, MacIdentity.new().room_id, "mac")
        for bad in ("{not json", json.dumps({"type": "teleport"}), json.dumps([1, 2]), json.dumps({"type": "relay"})):
            await client.ws.send(bad)
            await client.expect_error("BAD_MESSAGE")
        await client.heartbeat()


async def test_deeply_nested_json_gives_bad_message_and_the_socket_stays_open(nats_url, caplog):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        deep = '{"type":"heartbeat","x":' + "[" * 5000 + "]" * 5000 + "}"
        for _ in range(3):
            await mac_client.ws.send(deep)
            await mac_client.expect_error("BAD_MESSAGE")
        await mac_client.heartbeat()
        await mac_client.send(type="relay", payload="eA==")
        assert (await ios_client.expect("relay"))["payload"] == "eA=="
        assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


async def test_binary_frames_with_utf8_json_are_accepted(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        client = await Client.connect(edge, MacIdentity.new().room_id, "mac")
        await client.ws.send(json.dumps({"type": "heartbeat"}).encode())
        await client.expect("heartbeat_ack")


async def test_heartbeat_ack_reports_mac_connected(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client = await Client.connect(a, mac.room_id, "mac")
        # Answered before register_room has been processed too.
        assert await mac_client.heartbeat() == {"type": "heartbeat_ack", "mac_connected": False}
        await mac_client.send(**mac.register_message())
        await mac_client.expect("room_registered")
        assert (await mac_client.heartbeat())["mac_connected"] is True
        ios_client, _ = await connect_ios(b, mac)
        await ios_client.expect("peer_joined")
        assert (await ios_client.heartbeat())["mac_connected"] is True
        await mac_client.close()
        await ios_client.expect("peer_disconnected")
        assert (await ios_client.heartbeat())["mac_connected"] is False


async def test_heartbeats_are_not_forwarded(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await mac_client.heartbeat()
        await ios_client.expect_silence()


async def test_frame_over_max_frame_bytes_closes_1009(nats_url):
    async with running_edges(nats_url, max_frame_bytes=2048) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await mac_client.send(type="relay", payload="A" * 1500)  # under the limit: forwarded
        await ios_client.expect("relay")
        await mac_client.send(type="relay", payload="A" * 4096)
        code, _ = await mac_client.expect_close()
        assert code == 1009
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"


async def test_ten_thousand_frames_each_way_across_edges_arrive_in_order_exactly_once(nats_url):
    count = 10_000
    # Far past any real client's rate: the inbound rate limit (tested on its own) is off here.
    async with running_edges(nats_url, socket_rate_limit_per_s=0) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)

        async def pump(sender: Client, tag: str) -> None:
            for n in range(count):
                await sender.ws.send(f'{{"type":"relay","payload":"{tag}{n}"}}')

        async def collect(receiver: Client) -> list[str]:
            got = []
            while len(got) < count:
                got.append(json.loads(await asyncio.wait_for(receiver.ws.recv(), 10))["payload"])
            return got

        _, _, to_ios, to_mac = await asyncio.gather(pump(mac_client, "m"), pump(ios_client, "i"), collect(ios_client), collect(mac_client))
        assert to_ios == [f"m{n}" for n in range(count)]
        assert to_mac == [f"i{n}" for n in range(count)]
        await ios_client.expect_silence()  # and nothing more: no duplicates
        await mac_client.expect_silence()


async def test_room_id_outside_the_alphabet_is_refused_with_400_before_the_upgrade(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        for room_id in (">", "a.b", "*", "", "a%20b", "x" * 129, "room%2Ein"):
            try:
                async with connect(f"ws://127.0.0.1:{edge.port}/ws?room_id={room_id}&role=mac", open_timeout=5):
                    raise AssertionError(f"room id {room_id!r} was accepted")
            except Exception as exc:  # websockets raises InvalidStatus with the response
                assert getattr(getattr(exc, "response", None), "status_code", None) == 400, (room_id, exc)
        # And no subscription was made for them: the edge holds no socket.
        assert edge.connections == {}


async def test_unknown_role_is_refused_with_400(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        try:
            async with connect(ws_url(edge, "GOODROOM", "android"), open_timeout=5):
                raise AssertionError("role android was accepted")
        except Exception as exc:
            assert getattr(getattr(exc, "response", None), "status_code", None) == 400


async def test_frames_up_to_4_mib_are_forwarded(nats_url):
    # A full relay_batch of terminal output is over 1 MiB, NATS's default max_payload.
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        payloads = ["B" * 200_000] * 20  # about 4 MB as JSON
        await mac_client.send(type="relay_batch", payloads=payloads)
        assert (await ios_client.expect("relay_batch", timeout=10))["payloads"] == payloads


async def test_a_frame_larger_than_a_small_nats_max_payload_is_forwarded_in_parts(tmp_path):
    from runtime.embedded_nats import EmbeddedNatsServer

    with EmbeddedNatsServer(store_dir=tmp_path / "nats", max_payload=64 * 1024) as small:
        async with running_edges(small.url) as (a, b):
            mac_client, ios_client, _ = await paired(a, b)
            await mac_client.send(type="relay", payload="C" * 1_000_000)  # 16 parts
            assert (await ios_client.expect("relay"))["payload"] == "C" * 1_000_000
