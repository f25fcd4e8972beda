"""The HTTP API with Bearer keys (protocol.md §8, §12 items 23–24), on the edge's one port."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import nats

from metering.usage import open_usage_bucket
from metering.windows import period_of
from runtime import kv
from schemas.records import BonusUsage, UsageLedger, UsageWindow
from schemas.subjects import usage_ledger_key
from tests.harness import (
    MacIdentity,
    body_of_json,
    connect_ios,
    connect_mac,
    http_get,
    http_request,
    make_account,
    running_edges,
)

OPERATOR = "operator-secret-token"


body_of = body_of_json


# --- rooms ------------------------------------------------------------------------------


async def test_api_rooms_lists_the_users_rooms_with_connection_flags_last_seen_limit_and_tier(nats_url):
    account, other = await make_account(nats_url, tier="pro"), await make_account(nats_url)
    async with running_edges(nats_url, auth="required") as (a, b):
        online, offline = MacIdentity.new(), MacIdentity.new()
        before = int(time.time() * 1000)
        mac_client, _ = await connect_mac(a, online, headers=account.auth)
        ios, _ = await connect_ios(b, online, headers=account.auth)
        await ios.expect("peer_joined")
        gone, _ = await connect_mac(b, offline, headers=account.auth)
        await gone.close()
        await connect_mac(a, MacIdentity.new(), headers=other.auth)  # someone else's room
        listing = body_of(await http_get(b.port, "/api/rooms", account.auth))
        assert listing["limit"] == 32 and listing["tier"] == "pro"
        rooms = {r["room_id"]: r for r in listing["rooms"]}
        assert set(rooms) == {online.room_id, offline.room_id}
        assert rooms[online.room_id]["mac_connected"] is True and rooms[online.room_id]["ios_connected"] is True
        assert rooms[offline.room_id]["mac_connected"] is False and rooms[offline.room_id]["ios_connected"] is False
        assert all(before <= r["last_seen"] <= int(time.time() * 1000) for r in rooms.values())


async def test_api_rooms_without_a_key_is_401(nats_url):
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert (await http_get(edge.port, "/api/rooms"))[0] == 401


async def test_delete_room_frees_the_registration_and_the_room(nats_url):
    account, newcomer = await make_account(nats_url, tier="free"), await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        macs = [MacIdentity.new() for _ in range(4)]
        for mac in macs:
            client, _ = await connect_mac(edge, mac, headers=account.auth)
            await client.close()
        status, body = await http_request(edge.port, "DELETE", f"/api/rooms/{macs[0].room_id}", account.auth)
        assert (status, json.loads(body)) == (200, {"deleted": macs[0].room_id})
        assert macs[0].room_id not in [r["room_id"] for r in body_of(await http_get(edge.port, "/api/rooms", account.auth))["rooms"]]
        # The slot is free again (a fifth room fits) and so is the room id (anyone may claim it).
        client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
        claimed = MacIdentity.new()
        claimed.room_id = macs[0].room_id
        await connect_mac(edge, claimed, headers=newcomer.auth)


async def test_a_deleted_room_is_not_registered_again_by_a_refresh_pass_that_began_before(nats_url):
    # The refresh pass spreads its writes over minutes: it lists the Macs when it begins.
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        mac = MacIdentity.new()
        client, _ = await connect_mac(edge, mac, headers=account.auth)
        (listed,) = [c for c in edge.connections.values() if c.session.room_id == mac.room_id]
        await client.close()  # the Mac leaves after the pass listed it
        while edge.connections:
            await asyncio.sleep(0.01)
        status, _ = await http_request(edge.port, "DELETE", f"/api/rooms/{mac.room_id}", account.auth)
        assert status == 200
        await edge.upkeep.registration_pass([listed.session.socket_id], 0.0)  # the pass reaches it
        rooms = body_of(await http_get(edge.port, "/api/rooms", account.auth))["rooms"]
        assert mac.room_id not in [r["room_id"] for r in rooms]


async def test_delete_room_is_409_while_its_mac_is_connected(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        mac = MacIdentity.new()
        client, _ = await connect_mac(edge, mac, headers=account.auth)
        assert (await http_request(edge.port, "DELETE", f"/api/rooms/{mac.room_id}", account.auth))[0] == 409
        await client.heartbeat()  # untouched
        await client.close()
        await client.ws.wait_closed()
        for _ in range(50):  # the slot is released just after the close
            status, _ = await http_request(edge.port, "DELETE", f"/api/rooms/{mac.room_id}", account.auth)
            if status != 409:
                break
        assert status == 200


async def test_delete_room_of_another_account_is_404_as_of_no_room(nats_url):
    owner, other = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        mac = MacIdentity.new()
        client, _ = await connect_mac(edge, mac, headers=owner.auth)
        await client.close()
        # The same answer as for a room that does not exist: room ids cannot be probed (issue 16, item 12).
        theirs = await http_request(edge.port, "DELETE", f"/api/rooms/{mac.room_id}", other.auth)
        nobodys = await http_request(edge.port, "DELETE", "/api/rooms/NOSUCHROOM", owner.auth)
        assert theirs[0] == nobodys[0] == 404 and theirs[1] == nobodys[1]
        assert (await http_get(edge.port, f"/status?room_id={mac.room_id}", owner.auth))[1] != '{"exists":false}'  # still there
        assert (await http_request(edge.port, "DELETE", "/api/rooms/a.b", owner.auth))[0] == 400


# --- account ------------------------------------------------------------------------------


async def test_profile_answers_the_keys_user(nats_url):
    account = await make_account(nats_url, tier="premium", name="Ada")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        profile = body_of(await http_get(edge.port, "/profile", account.auth))
        assert profile == {"user_id": account.user_id, "email": account.email, "tier": "premium", "name": "Ada"}


async def refresh(edge, token: str) -> tuple[int, str]:
    return await http_request(edge.port, "POST", "/auth/refresh", {}, json.dumps({"refresh_token": token}).encode())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_auth_refresh_rotates_both_tokens_and_the_old_ones_stop_working(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", refresh_grace_s=0) as (edge,):
        fresh = body_of(await refresh(edge, account.refresh_token))
        assert fresh["api_key"].startswith("rdkey_") and fresh["refresh_token"].startswith("rdrt_")
        assert fresh["api_key"] != account.api_key and fresh["refresh_token"] != account.refresh_token
        assert (await refresh(edge, account.refresh_token))[0] == 401  # used
        assert (await http_get(edge.port, "/profile", account.auth))[0] == 401  # the old key too
        assert (await http_get(edge.port, "/profile", bearer(fresh["api_key"])))[0] == 200
        assert (await refresh(edge, fresh["refresh_token"]))[0] == 200


async def test_auth_refresh_retried_within_the_grace_replaces_the_lost_pair_and_stops_after_it(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", refresh_grace_s=1) as (edge,):
        lost = body_of(await refresh(edge, account.refresh_token))  # the answer the Mac never saw
        retried = body_of(await refresh(edge, account.refresh_token))
        assert (await http_get(edge.port, "/profile", bearer(retried["api_key"])))[0] == 200
        # The lost pair is revoked: the old token never has two live successors.
        assert (await http_get(edge.port, "/profile", bearer(lost["api_key"])))[0] == 401
        assert (await refresh(edge, lost["refresh_token"]))[0] == 401
        assert (await http_get(edge.port, "/profile", account.auth))[0] == 401
        await asyncio.sleep(1.1)
        assert (await refresh(edge, account.refresh_token))[0] == 401  # past the grace
        assert (await http_get(edge.port, "/profile", bearer(retried["api_key"])))[0] == 200


async def test_concurrent_uses_of_one_refresh_token_have_one_winner_without_grace(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", refresh_grace_s=0) as (edge,):
        results = await asyncio.gather(*(refresh(edge, account.refresh_token) for _ in range(8)))
        assert sorted(status for status, _ in results) == [200] + [401] * 7


async def test_a_storage_failure_after_the_rotation_does_not_lose_the_new_pair(nats_url, monkeypatch):
    import nats.errors

    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        remove = kv.remove

        async def failing_remove(js, bucket, key, *, last=None):
            if key.startswith("apikey."):  # tidying up the old key fails
                raise nats.errors.TimeoutError
            return await remove(js, bucket, key, last=last)

        monkeypatch.setattr(kv, "remove", failing_remove)
        fresh = body_of(await refresh(edge, account.refresh_token))
        monkeypatch.setattr(kv, "remove", remove)
        assert (await http_get(edge.port, "/profile", bearer(fresh["api_key"])))[0] == 200


async def test_auth_refresh_with_a_bad_body_is_400_and_for_a_deleted_account_410(nats_url):
    deleted = await make_account(nats_url, deleted=True)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert (await http_request(edge.port, "POST", "/auth/refresh", {}, b"not json"))[0] == 400
        assert (await http_request(edge.port, "POST", "/auth/refresh", {}, b'{"token": 1}'))[0] == 400
        body = json.dumps({"refresh_token": deleted.refresh_token}).encode()
        assert (await http_request(edge.port, "POST", "/auth/refresh", {}, body))[0] == 410


async def test_auth_revoke_stops_the_calling_key(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert body_of(await http_request(edge.port, "POST", "/auth/revoke", account.auth)) == {"revoked": True}
        assert (await http_get(edge.port, "/profile", account.auth))[0] == 401
        refresh = json.dumps({"refresh_token": account.refresh_token}).encode()
        assert (await http_request(edge.port, "POST", "/auth/refresh", {}, refresh))[0] == 401


# --- /status (§12 item 23) -------------------------------------------------------------------


async def test_status_answers_the_room_owners_key_and_the_operator_token_and_others_as_if_no_room(nats_url):
    owner, other = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", admin_token=OPERATOR) as (edge,):
        mac = MacIdentity.new()
        await connect_mac(edge, mac, headers=owner.auth)
        path = f"/status?room_id={mac.room_id}"
        assert body_of(await http_get(edge.port, path, owner.auth))["mac_connected"] is True
        assert body_of(await http_get(edge.port, path, {"Authorization": f"Bearer {OPERATOR}"}))["exists"] is True
        assert (await http_get(edge.port, path))[0] == 401
        assert (await http_get(edge.port, path, {"Authorization": "Bearer wrong"}))[0] == 401
        # Another account learns nothing: the answer for a room that does not exist.
        assert await http_get(edge.port, path, other.auth) == await http_get(edge.port, "/status?room_id=NOSUCHROOM", other.auth)
        assert body_of(await http_get(edge.port, "/status?room_id=NOSUCHROOM", other.auth)) == {"exists": False}


# --- usage (§8.2) ------------------------------------------------------------------------------


async def test_usage_reports_the_current_windows_records_limit_and_welcome_bonus(nats_url):
    from schemas.records import WelcomeBonus

    now = int(time.time() * 1000)
    bonus = WelcomeBonus(credits=10_000, created_at=now, expires_at=now + 7 * 86_400_000)
    account = await make_account(nats_url, tier="free", welcome_bonus=bonus)
    period = period_of(now)
    # What metering writes, written here directly.
    nc = await nats.connect(nats_url)
    usage_kv = await open_usage_bucket(nc.jetstream(), 1)
    window = UsageWindow(user_id=account.user_id, period=period, message_tokens=30, duration_tokens=12, total_tokens=42, last_updated=now)
    older = UsageWindow(user_id=account.user_id, period="5h-1", message_tokens=5, total_tokens=5)
    ledger = UsageLedger(
        user_id=account.user_id, applied_seq=7, windows=[older, window], bonus=BonusUsage(used=100, grant_created_at=now)
    )
    await usage_kv.put(usage_ledger_key(account.user_id), msgspec.json.encode(ledger))
    await nc.close()
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        usage = body_of(await http_get(edge.port, "/usage", account.auth))
        assert usage["period"] == period and usage["total_tokens"] == 42 and usage["message_tokens"] == 30
        assert usage["limit"] == 1000 and usage["remaining"] == 958 and usage["last_updated"] == now
        assert usage["resets_at"].endswith(".000Z") and "–" in usage["period_label"]
        assert usage["extra_quota"] == {
            "active": True,
            "remaining": 9_900,
            "limit": 10_000,
            "expires_at": usage["extra_quota"]["expires_at"],
        }
        history = body_of(await http_get(edge.port, "/usage/history", account.auth))["history"]
        assert [h["period"] for h in history] == [period, "5h-1"]
        assert history[0] == {
            "period": period,
            "period_label": usage["period_label"],
            "message_tokens": 30,
            "duration_tokens": 12,
            "total_tokens": 42,
        }


async def test_usage_of_a_user_without_records_is_zero_and_history_holds_the_current_window(nats_url):
    account = await make_account(nats_url, tier="pro", credits_per_window=777)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        usage = body_of(await http_get(edge.port, "/usage", account.auth))
        assert (usage["total_tokens"], usage["limit"], usage["remaining"]) == (0, 777, 777)
        assert "extra_quota" not in usage
        history = body_of(await http_get(edge.port, "/usage/history", account.auth))["history"]
        assert [h["period"] for h in history] == [period_of(int(time.time() * 1000))]


# --- the HTTP front -------------------------------------------------------------------------------


async def test_a_method_a_route_does_not_take_is_405_and_an_unknown_path_404(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert (await http_request(edge.port, "POST", "/profile", account.auth, b"{}"))[0] == 405
        assert (await http_request(edge.port, "GET", "/auth/refresh", account.auth))[0] == 405
        assert (await http_request(edge.port, "GET", "/api/rooms/ABC", account.auth))[0] == 405
        assert (await http_request(edge.port, "POST", "/ws?room_id=A&role=mac", account.auth, b"x"))[0] == 405
        assert (await http_request(edge.port, "PUT", "/nowhere", account.auth, b"x"))[0] == 404


async def test_a_request_body_over_64_kib_is_413(nats_url):
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert (await http_request(edge.port, "POST", "/auth/refresh", {}, b"x" * (64 * 1024 + 1)))[0] == 413


async def test_a_deleted_room_leaves_no_marker_behind(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        mac = MacIdentity.new()
        client, _ = await connect_mac(edge, mac, headers=account.auth)
        await client.close()
        await client.ws.wait_closed()
        for _ in range(50):
            status, _ = await http_request(edge.port, "DELETE", f"/api/rooms/{mac.room_id}", account.auth)
            if status != 409:
                break
        assert status == 200
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            subject = f"$KV.relay_rooms.{mac.room_id}"
            deadline = time.monotonic() + 5
            while (await js.stream_info("KV_relay_rooms", subjects_filter=subject)).state.subjects:
                assert time.monotonic() < deadline, "the room's delete marker stayed"
                await asyncio.sleep(0.2)
        finally:
            await nc.close()
