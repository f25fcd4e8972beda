"""Accounts at the edge: the checks before the 101, rooms owned by accounts, deletion.

protocol.md §2.2, §2.3, §4.2, §7 and §12 items 2–6, 15, 16; real edges, real nats-server.
"""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
import nats
import pytest
from websockets.exceptions import InvalidStatus

from accounts.store import AccountStore
from tests.harness import (
    Client,
    MacIdentity,
    connect_ios,
    connect_mac,
    http_get,
    make_account,
    running_edges,
)

OPERATOR = "operator-secret-token"


async def upgrade_status(edge, room_id: str, role: str | None = "mac", headers=None, **query) -> int:
    """The HTTP status the upgrade gets (101 when it succeeds)."""
    try:
        client = await Client.connect(edge, room_id, role, headers, **query)
    except InvalidStatus as exc:
        return exc.response.status_code
    await client.close()
    return 101


async def delete_account(nats_url: str, user_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        store = await AccountStore.open(nc.jetstream())
        await store.update_user(user_id, lambda u: msgspec.structs.replace(u, deleted=True))
    finally:
        await nc.close()


# --- the upgrade (§2.3, §4.2) ---------------------------------------------------------


async def test_upgrade_without_an_api_key_is_refused_401(nats_url):
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert await upgrade_status(edge, "ROOM000001") == 401
        assert await upgrade_status(edge, "ROOM000001", headers={"Authorization": "Basic abc"}) == 401


async def test_upgrade_with_an_unknown_or_revoked_api_key_is_refused_401(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        unknown = {"Authorization": "Bearer rdkey_" + "0" * 32}
        assert await upgrade_status(edge, "ROOM000002", headers=unknown) == 401
        assert await upgrade_status(edge, "ROOM000002", headers={"Authorization": "Bearer not-a-key"}) == 401
        assert await upgrade_status(edge, "ROOM000002", headers=account.auth) == 101
        nc = await nats.connect(nats_url)
        await (await AccountStore.open(nc.jetstream())).revoke_key(account.api_key)
        await nc.close()
        assert await upgrade_status(edge, "ROOM000002", headers=account.auth) == 401


async def test_upgrade_of_a_deleted_account_is_refused_410(nats_url):
    account = await make_account(nats_url, deleted=True)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        assert await upgrade_status(edge, "ROOM000003", headers=account.auth) == 410
        assert await upgrade_status(edge, "ROOM000003", role="ios", headers=account.auth) == 410


async def test_sandbox_key_header_is_accepted_and_ignored(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        headers = {**account.auth, "X-Sandbox-Key": "anything"}
        assert await upgrade_status(edge, "ROOM000004", headers=headers) == 101
        assert await upgrade_status(edge, "ROOM000004", headers={"X-Sandbox-Key": "anything"}) == 401


async def test_failed_authentication_is_rate_limited_per_client_address_429(nats_url):
    account = await make_account(nats_url)
    async with running_edges(
        nats_url, count=1, auth="required", auth_failure_limit=3, client_ip_header="X-Forwarded-For"
    ) as (edge,):
        bad = {"Authorization": "Bearer rdkey_" + "1" * 32, "X-Forwarded-For": "10.0.0.1"}
        assert [await upgrade_status(edge, "ROOM000005", headers=bad) for _ in range(3)] == [401, 401, 401]
        assert await upgrade_status(edge, "ROOM000005", headers=bad) == 429
        # The guessing is locked out, not the owner (issue 16 item 6): a good key from the
        # same address still passes, as from another address.
        assert await upgrade_status(edge, "ROOM000005", headers={**account.auth, "X-Forwarded-For": "10.0.0.1"}) == 101
        assert await upgrade_status(edge, "ROOM000005", headers={**account.auth, "X-Forwarded-For": "10.0.0.2"}) == 101
        status, _ = await http_get(edge.port, "/profile", bad)
        assert status == 429


async def test_requests_without_a_key_do_not_count_as_failed_logins(nats_url):
    # Ten plain `curl`s on a local relay locked its loopback address, the owner's Mac too.
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", auth_failure_limit=3) as (edge,):
        for _ in range(10):
            assert (await http_get(edge.port, "/profile"))[0] == 401
            assert await upgrade_status(edge, "ROOM000007") == 401
        assert await upgrade_status(edge, "ROOM000007", headers=account.auth) == 101
        assert (await http_get(edge.port, "/profile", account.auth))[0] == 200


async def test_failed_authentication_limit_forgets_an_address_after_its_window(nats_url):
    async with running_edges(nats_url, count=1, auth="required", auth_failure_limit=1, auth_failure_window_s=1) as (edge,):
        bad = {"Authorization": "Bearer rdkey_" + "2" * 32}
        assert await upgrade_status(edge, "ROOM000006", headers=bad) == 401
        assert await upgrade_status(edge, "ROOM000006", headers=bad) == 429
        await asyncio.sleep(1.1)
        assert await upgrade_status(edge, "ROOM000006", headers=bad) == 401


async def test_auth_none_maps_every_connection_to_the_local_user(nats_url):
    async with running_edges(nats_url, count=1, auth="none", local_user_id="solo-user", local_user_tier="pro") as (edge,):
        mac = MacIdentity.new()
        client, _ = await connect_mac(edge, mac, headers={"Authorization": "Bearer whatever"})
        await client.close()
        status, body = await http_get(edge.port, "/profile")
        assert status == 200 and json.loads(body)["user_id"] == "solo-user"
        rooms = json.loads((await http_get(edge.port, "/api/rooms"))[1])
        assert [r["room_id"] for r in rooms["rooms"]] == [mac.room_id] and rooms["tier"] == "pro"


async def test_operator_token_acts_for_the_user_named_by_user_id(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", admin_token=OPERATOR) as (edge,):
        operator = {"Authorization": f"Bearer {OPERATOR}"}
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, "mac", operator, user_id=account.user_id)
        await client.send(**mac.register_message())
        await client.expect("room_registered")
        # The room belongs to that user: its own key sees it.
        rooms = json.loads((await http_get(edge.port, "/api/rooms", account.auth))[1])
        assert [r["room_id"] for r in rooms["rooms"]] == [mac.room_id]
        assert await upgrade_status(edge, "ROOM000007", headers=operator) == 400  # names no user
        assert await upgrade_status(edge, "ROOM000007", headers=operator, user_id="nobody-here") == 404


# --- room limit (§7) ---------------------------------------------------------------------


async def test_mac_over_its_tiers_room_limit_is_refused_403_before_the_upgrade(nats_url):
    account = await make_account(nats_url, tier="free")  # 4 rooms
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        for _ in range(4):
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
            await client.close()
        assert await upgrade_status(edge, MacIdentity.new().room_id, headers=account.auth) == 403


async def test_a_mac_reconnecting_to_its_own_registered_room_is_exempt_from_the_room_limit(nats_url):
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        macs = [MacIdentity.new() for _ in range(4)]
        for mac in macs:
            client, _ = await connect_mac(edge, mac, headers=account.auth)
            await client.close()
        client, _ = await connect_mac(edge, macs[0], headers=account.auth)  # no 403
        await client.close()


async def test_ios_connections_do_not_count_against_the_room_limit(nats_url):
    owner, phone_user = await make_account(nats_url, tier="pro"), await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        for _ in range(5):
            mac = MacIdentity.new()
            await connect_mac(edge, mac, headers=owner.auth)
            await (await connect_ios(edge, mac, headers=phone_user.auth))[0].expect("peer_joined")
        for _ in range(4):
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=phone_user.auth)
            await client.close()


async def test_a_registration_lives_while_its_mac_is_connected_and_lapses_after_room_reg_ttl(nats_url):
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required", room_reg_ttl_s=1) as (edge,):
        connected = MacIdentity.new()
        kept, _ = await connect_mac(edge, connected, headers=account.auth)
        for _ in range(3):
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
            await client.close()
        assert await upgrade_status(edge, MacIdentity.new().room_id, headers=account.auth) == 403
        await asyncio.sleep(2.2)  # twice the TTL: the three closed rooms lapsed, the connected one was refreshed
        rooms = json.loads((await http_get(edge.port, "/api/rooms", account.auth))[1])["rooms"]
        assert [r["room_id"] for r in rooms] == [connected.room_id]
        assert await upgrade_status(edge, MacIdentity.new().room_id, headers=account.auth) == 101
        await kept.close()


async def test_a_socket_without_role_that_registers_is_held_to_the_room_limit(nats_url):
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        for _ in range(4):
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
            await client.close()
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, None, account.auth)
        await client.send(**mac.register_message())
        assert (await client.expect_error("ROOM_LIMIT"))["message"].startswith("room limit reached")
        assert (await client.expect_close())[0] == 1008


async def test_room_registered_carries_the_tiers_max_sessions(nats_url):
    free, premium = await make_account(nats_url, tier="free"), await make_account(nats_url, tier="premium")
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        for account, expected in ((free, 4), (premium, -1)):
            mac = MacIdentity.new()
            client = await Client.connect(edge, mac.room_id, "mac", account.auth)
            await client.send(**mac.register_message())
            assert (await client.expect("room_registered"))["max_sessions"] == expected


async def test_tiers_file_overrides_the_room_limit_and_max_sessions(nats_url, tmp_path):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.free]\nmax_rooms = 1\nmax_sessions = 2\n")
    account = await make_account(nats_url, tier="free")
    async with running_edges(nats_url, count=1, auth="required", tiers_file=str(tiers)) as (edge,):
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, "mac", account.auth)
        await client.send(**mac.register_message())
        assert (await client.expect("room_registered"))["max_sessions"] == 2
        assert await upgrade_status(edge, MacIdentity.new().room_id, headers=account.auth) == 403


# --- rooms belong to accounts (§12 item 15) -----------------------------------------------


async def test_register_by_another_account_gets_account_mismatch_and_changes_nothing(nats_url):
    owner, intruder = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, auth="required") as (a, b):
        mac = MacIdentity.new()
        owner_mac, _ = await connect_mac(a, mac, headers=owner.auth)
        client = await Client.connect(b, mac.room_id, "mac", intruder.auth)
        await client.send(**mac.register_message())
        await client.expect_error("ACCOUNT_MISMATCH")
        await owner_mac.expect_silence()  # not replaced
        ios, _ = await connect_ios(b, mac, headers=owner.auth)
        await ios.expect("peer_joined")
        await owner_mac.expect("peer_joined")


async def test_ios_join_from_another_account_is_allowed_and_flagged_with_both_emails(nats_url):
    owner, friend = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, auth="required") as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac, headers=owner.auth)
        ios, _ = await connect_ios(b, mac, headers=friend.auth)
        await ios.expect("peer_joined")
        error = await ios.expect_error("ACCOUNT_MISMATCH")
        assert error["mac_email"] == owner.email and error["ios_email"] == friend.email
        await mac_client.expect("peer_joined")
        assert (await ios.heartbeat())["account_match"] == "mismatch"
        assert (await mac_client.heartbeat())["account_match"] == "mismatch"
        # Frames flow all the same: the room secret is the credential.
        await mac_client.send(type="relay", payload="aGk=")
        assert (await ios.expect("relay"))["payload"] == "aGk="


async def test_heartbeat_ack_says_account_match_for_the_owners_own_devices(nats_url):
    owner = await make_account(nats_url)
    async with running_edges(nats_url, auth="required") as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac, headers=owner.auth)
        ios, _ = await connect_ios(b, mac, headers=owner.auth)
        await ios.expect("peer_joined")
        await mac_client.expect("peer_joined")
        assert (await ios.heartbeat())["account_match"] == "match"
        assert (await mac_client.heartbeat())["account_match"] == "match"
        await ios.expect_silence()  # no ACCOUNT_MISMATCH error


async def test_refuse_cross_account_refuses_such_joins_with_4003(nats_url):
    owner, friend = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, auth="required", refuse_cross_account=True) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac, headers=owner.auth)
        ios, _ = await connect_ios(b, mac, headers=friend.auth)
        await ios.expect_error("ACCOUNT_MISMATCH")
        assert (await ios.expect_close())[0] == 4003
        await mac_client.expect_silence()
        own_ios, _ = await connect_ios(b, mac, headers=owner.auth)
        await own_ios.expect("peer_joined")


# --- account deletion (§12 item 16) ----------------------------------------------------------


async def test_deleting_an_account_closes_its_sockets_after_an_account_deleted_ack(nats_url):
    owner, other = await make_account(nats_url), await make_account(nats_url)
    async with running_edges(nats_url, auth="required") as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac, headers=owner.auth)
        ios, _ = await connect_ios(b, mac, headers=owner.auth)
        await ios.expect("peer_joined")
        await mac_client.expect("peer_joined")
        bystander, _ = await connect_mac(b, MacIdentity.new(), headers=other.auth)
        await delete_account(nats_url, owner.user_id)
        for client in (mac_client, ios):
            ack = await client.expect("heartbeat_ack")
            assert ack["account_deleted"] is True
            code, reason = await client.expect_close()
            assert (code, reason) == (1008, "account deleted")
        await bystander.heartbeat()  # another account is untouched
        assert await upgrade_status(a, mac.room_id, headers=owner.auth) == 410


# --- abuse limits (§12 item 6) -----------------------------------------------------------------


async def test_sustained_inbound_excess_closes_the_socket_1008(nats_url):
    async with running_edges(nats_url, count=1, socket_rate_limit_per_s=20, socket_rate_burst=10) as (edge,):
        client = await Client.connect(edge, "RATEROOM01", "mac")
        for _ in range(30):
            await client.send(type="heartbeat")
        messages = []
        with pytest.raises(Exception):
            while True:
                messages.append(await client.recv(timeout=2))
        assert messages[-1] == {"type": "error", "code": "RATE_LIMITED", "message": "Too many messages; slow down"}
        assert client.ws.protocol.close_rcvd.code == 1008


async def test_heartbeats_at_the_clients_own_pace_are_never_rate_limited(nats_url):
    async with running_edges(nats_url, count=1, socket_rate_limit_per_s=20, socket_rate_burst=10) as (edge,):
        client = await Client.connect(edge, "RATEROOM02", "mac")
        for _ in range(40):  # 2 s at 20/s, the limit's own rate
            await client.heartbeat()
            await asyncio.sleep(0.05)


async def test_api_keys_never_appear_in_the_edges_logs(nats_url, caplog):
    account = await make_account(nats_url)
    caplog.set_level(logging.DEBUG)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        await connect_mac(edge, MacIdentity.new(), headers=account.auth)
        await upgrade_status(edge, "ROOM000008", headers={"Authorization": "Bearer rdkey_" + "3" * 32})
        await http_get(edge.port, "/profile", account.auth)
    # Everything but the test's own client (whose websockets logs its own request at DEBUG).
    edge_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
    assert "Authorization" in edge_log  # the handshake was logged, headers included...
    assert account.api_key[6:] not in edge_log and "3" * 32 not in edge_log  # ...but not the keys


# --- found in review: each fails on the code before its fix ---------------------------------


async def test_macs_opened_side_by_side_cannot_register_past_the_room_limit(nats_url):
    account = await make_account(nats_url, tier="free")  # 4 rooms
    async with running_edges(nats_url, auth="required") as (a, b):
        # All six pass the upgrade's count (nothing is registered yet)...
        macs = [MacIdentity.new() for _ in range(6)]
        clients = [await Client.connect((a, b)[n % 2], mac.room_id, "mac", account.auth) for n, mac in enumerate(macs)]
        answers = []
        for client, mac in zip(clients, macs):
            await client.send(**mac.register_message())
            answers.append((await client.recv())["type"])
        # ...but the register is checked again.
        assert answers == ["room_registered"] * 4 + ["error"] * 2
        assert (await clients[-1].expect_close())[0] == 1008


async def test_duplicate_authorization_headers_are_refused_401_not_500(nats_url):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        for path in ("/api/rooms", "/ws?room_id=DUPHEADER1&role=mac"):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {account.api_key}\r\nAuthorization: Bearer {account.api_key}\r\n\r\n".encode()
            )
            status_line = (await asyncio.wait_for(reader.readline(), 5)).decode()
            writer.close()
            assert status_line.split()[1] == "401", (path, status_line)


async def test_a_repeated_client_ip_header_counts_its_last_entry(nats_url):
    account = await make_account(nats_url)
    async with running_edges(
        nats_url, count=1, auth="required", auth_failure_limit=1, client_ip_header="X-Forwarded-For"
    ) as (edge,):
        from tests.harness import http_request

        bad = f"Authorization: Bearer rdkey_{'4' * 32}"
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(f"GET /profile HTTP/1.1\r\nHost: r\r\n{bad}\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-For: 10.1.1.1\r\n\r\n".encode())
            status = (await asyncio.wait_for(reader.readline(), 5)).decode().split()[1]
            writer.close()
        assert status == "429"  # both counted against 10.1.1.1
        assert (await http_request(edge.port, "GET", "/profile", {**account.auth, "X-Forwarded-For": "10.9.9.9"}))[0] == 200


async def test_a_storage_failure_at_the_registers_room_limit_check_closes_1011_not_room_limit(nats_url):
    import nats.errors

    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required") as (edge,):
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, None, account.auth)

        async def storage_down(*args, **kwargs):
            raise nats.errors.TimeoutError

        edge.ctx.access.store.get_registration = storage_down
        await client.send(**mac.register_message())
        assert (await client.expect_close())[0] == 1011


async def test_storage_too_slow_before_the_upgrade_answers_503_in_time(nats_url, monkeypatch):
    account = await make_account(nats_url)
    async with running_edges(nats_url, count=1, auth="required", request_budget_ms=300) as (relay,):
        store = relay.ctx.access.store
        find_key = store.find_key

        async def slow_find_key(*args, **kwargs):
            await asyncio.sleep(1)
            return await find_key(*args, **kwargs)

        store.find_key = slow_find_key
        assert await upgrade_status(relay, "SLOWROOM01", headers=account.auth) == 503
        assert (await http_get(relay.port, "/profile", account.auth))[0] == 503


async def test_deleting_an_account_right_after_a_nats_restart_closes_its_sockets_at_once(tmp_path):
    from runtime.embedded_nats import EmbeddedNatsServer

    server = EmbeddedNatsServer(store_dir=tmp_path / "nats").start()
    try:
        account = await make_account(server.url)
        async with running_edges(server.url, count=1, auth="required") as (edge,):
            server.kill()
            await asyncio.sleep(0.5)
            server.start()
            for _ in range(100):
                if edge.ctx.nc.is_connected and edge.ready.is_set():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the account watcher is recreated after the reconnect
            client, _ = await connect_mac(edge, MacIdentity.new(), headers=account.auth)
            await delete_account(server.url, account.user_id)
            assert (await client.expect("heartbeat_ack", timeout=3))["account_deleted"] is True
    finally:
        server.stop()
