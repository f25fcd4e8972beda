"""The room limit under concurrency (protocol.md §7; issue 16 item 4): registers sent at
once, over two edges, cannot pass it. Real edges, real nats-server, real sockets."""

from __future__ import annotations

import asyncio
import json

import nats

from accounts.store import AccountStore
from tests.harness import Client, MacIdentity, connect_mac, http_get, http_request, make_account, running_edges
from websockets.exceptions import InvalidStatus


async def _claims(nats_url: str, user_id: str) -> dict[str, int]:
    nc = await nats.connect(nats_url)
    try:
        rooms, _ = await (await AccountStore.open(nc.jetstream())).room_claims(user_id, 900)
        return rooms
    finally:
        await nc.close()


async def _upgrade_status(edge, room_id: str, headers) -> int:
    try:
        client = await Client.connect(edge, room_id, "mac", headers)
    except InvalidStatus as exc:
        return exc.response.status_code
    await client.close()
    return 101


async def test_fifty_registers_at_once_over_two_edges_register_no_more_rooms_than_the_limit(nats_url):
    account = await make_account(nats_url, tier="free")  # 4 rooms
    async with running_edges(nats_url, auth="required") as (a, b):
        macs = [MacIdentity.new() for _ in range(50)]
        # Fifty sockets to fifty new rooms, all past the upgrade (nothing is registered yet)...
        clients = await asyncio.gather(
            *(Client.connect((a, b)[n % 2], mac.room_id, "mac", account.auth) for n, mac in enumerate(macs))
        )
        # ...then fifty registers together.
        await asyncio.gather(*(c.send(**mac.register_message()) for c, mac in zip(clients, macs)))
        answers = await asyncio.gather(*(c.recv(timeout=15) for c in clients))
        registered = [mac.room_id for mac, answer in zip(macs, answers) if answer["type"] == "room_registered"]
        refused = [answer for answer in answers if answer["type"] != "room_registered"]
        assert len(registered) == 4, answers
        assert {(r["type"], r["code"]) for r in refused} == {("error", "ROOM_LIMIT")}
        for client, answer in zip(clients, answers):
            if answer["type"] != "room_registered":
                assert (await client.expect_close())[0] == 1008
        # What counts is the four registered rooms, on both edges.
        assert sorted(await _claims(nats_url, account.user_id)) == sorted(registered)
        rooms = json.loads((await http_get(b.port, "/api/rooms", account.auth))[1])["rooms"]
        assert sorted(r["room_id"] for r in rooms) == sorted(registered)
        assert await _upgrade_status(a, MacIdentity.new().room_id, account.auth) == 403
        for client in clients:
            await client.close()
        # A Mac reconnecting to a room it registered is let in, on either edge.
        by_room = {mac.room_id: mac for mac in macs}
        again, _ = await connect_mac(b, by_room[registered[0]], headers=account.auth)
        await again.close()


async def test_a_refused_register_gives_back_its_room_limit_claim(nats_url):
    account = await make_account(nats_url, tier="free")
    other = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        taken = MacIdentity.new()
        client, _ = await connect_mac(edge, taken, headers=other.auth)
        await client.close()
        # Another account's room: ACCOUNT_MISMATCH, and no place of the limit is held for it.
        intruder = await Client.connect(edge, taken.room_id, "mac", account.auth)
        await intruder.send(**taken.register_message())
        await intruder.expect_error("ACCOUNT_MISMATCH")
        assert await _claims(nats_url, account.user_id) == {}
        await intruder.close()
        for _ in range(4):
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
            await client.close()


async def test_deleting_a_room_frees_its_place_under_the_room_limit(nats_url):
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        macs = [MacIdentity.new() for _ in range(4)]
        for mac in macs:
            client, _ = await connect_mac(edge, mac, headers=account.auth)
            await client.close()
        assert await _upgrade_status(edge, MacIdentity.new().room_id, account.auth) == 403
        status, _ = await http_request(edge.port, "DELETE", f"/api/rooms/{macs[0].room_id}", account.auth)
        assert status == 200
        assert macs[0].room_id not in await _claims(nats_url, account.user_id)
        client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
        await client.close()


async def test_a_tier_without_a_room_limit_claims_nothing_and_a_change_of_tier_counts_its_registered_rooms(nats_url, tmp_path):
    # Claims of an unlimited tier would be one record every register rewrites: a reconnect
    # storm of a user's thousand rooms could not get through it.
    import subprocess
    import sys

    from runtime.kv import get_present
    from schemas.subjects import REGISTRATIONS_BUCKET, room_claims_key

    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.team]\ncredits_per_window = -1\nmax_rooms = -1\nmax_sessions = -1\n")
    account = await make_account(nats_url, tier="team")
    async with running_edges(nats_url, count=1, auth="required", tiers_file=str(tiers)) as (edge,):
        macs = [MacIdentity.new() for _ in range(5)]
        for mac in macs:
            client, _ = await connect_mac(edge, mac, headers=account.auth)
            await client.close()
        nc = await nats.connect(nats_url)
        try:
            registrations = await nc.jetstream().key_value(REGISTRATIONS_BUCKET)
            assert await get_present(registrations, room_claims_key(account.user_id)) is None
        finally:
            await nc.close()
        changed = subprocess.run(
            [sys.executable, "-m", "accounts.admin", "--nats-url", nats_url, "--tiers-file", str(tiers),
             "users", "set-tier", account.user_id, "free"],
            capture_output=True, text=True, timeout=30,
        )
        assert changed.returncode == 0, changed.stderr
        # Now free (4 rooms): its five registered rooms count, so a sixth is refused...
        assert await _upgrade_status(edge, MacIdentity.new().room_id, account.auth) == 403
        assert sorted(await _claims(nats_url, account.user_id)) == sorted(mac.room_id for mac in macs)
        # ...and a registered one is still let in.
        again, _ = await connect_mac(edge, macs[0], headers=account.auth)
        await again.close()


async def test_a_change_of_tier_drops_claims_an_unlimited_tier_left_behind(nats_url, tmp_path):
    import subprocess
    import sys

    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.team]\ncredits_per_window = -1\nmax_rooms = -1\nmax_sessions = -1\n")

    def set_tier(tier: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "accounts.admin", "--nats-url", nats_url, "--tiers-file", str(tiers),
             "users", "set-tier", account.user_id, tier],
            capture_output=True, text=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr

    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required", tiers_file=str(tiers)) as (edge,):
        macs = [MacIdentity.new() for _ in range(5)]
        for n, mac in enumerate(macs):
            if n == 2:
                set_tier("team")  # two rooms claimed under free; three more registered unclaimed
            client, _ = await connect_mac(edge, mac, headers=account.auth)
            await client.close()
        set_tier("free")
        assert await _upgrade_status(edge, MacIdentity.new().room_id, account.auth) == 403
        assert sorted(await _claims(nats_url, account.user_id)) == sorted(mac.room_id for mac in macs)
