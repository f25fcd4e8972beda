"""Registering, joining, pairing, rotation and replacement — Mac and iPhone on different edges.

Each test is named after the protocol.md rule it proves.
"""

from __future__ import annotations

import asyncio
import time

from tests.harness import (
    Client,
    MacIdentity,
    b64_key,
    connect_ios,
    connect_mac,
    join_message,
    paired,
    running_edges,
    sha256_hex,
)


async def test_register_room_replies_room_registered_with_room_id_and_max_sessions(nats_url):
    # max_sessions is the user's tier's: pro allows 16 (protocol.md §12 item 22).
    async with running_edges(nats_url, count=1, local_user_tier="pro") as (edge,):
        mac = MacIdentity.new()
        client = await Client.connect(edge, mac.room_id, "mac")
        await client.send(**mac.register_message())
        assert await client.expect("room_registered") == {
            "type": "room_registered",
            "room_id": mac.room_id,
            "max_sessions": 16,
        }


async def test_join_room_sends_peer_joined_to_both_sides_with_the_other_sides_keys(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client, register = await connect_mac(a, mac)
        ios_client, join = await connect_ios(b, mac)
        to_ios = await ios_client.expect("peer_joined")
        to_mac = await mac_client.expect("peer_joined")
        assert to_ios == {
            "type": "peer_joined",
            "public_key": register["public_key"],
            "session_nonce": register["session_nonce"],
            "ephemeral_key": register["ephemeral_key"],
        }
        assert to_mac == {
            "type": "peer_joined",
            "public_key": join["public_key"],
            "session_nonce": join["session_nonce"],
            "ephemeral_key": join["ephemeral_key"],
        }


async def test_peer_joined_passes_empty_and_absent_keys_through_as_empty_strings(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        ios_client = await Client.connect(b, mac.room_id, "ios")
        # A legacy peer: empty nonce, no ephemeral key at all.
        await ios_client.send(type="join_room", room_id=mac.room_id, public_key="IOSKEY", secret_hash=mac.secret_hash, session_nonce="")
        await ios_client.expect("peer_joined")
        assert await mac_client.expect("peer_joined") == {
            "type": "peer_joined",
            "public_key": "IOSKEY",
            "session_nonce": "",
            "ephemeral_key": "",
        }


async def test_join_before_mac_registers_gets_peer_joined_when_mac_registers(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        first_mac, _ = await connect_mac(a, mac)
        await first_mac.close()
        ios_client, join = await connect_ios(b, mac)
        await ios_client.expect_silence()
        mac_client = await Client.connect(a, mac.room_id, "mac")
        register = mac.register_message()
        await mac_client.send(**register)
        await mac_client.expect("room_registered")
        assert (await mac_client.expect("peer_joined"))["ephemeral_key"] == join["ephemeral_key"]
        assert (await ios_client.expect("peer_joined"))["ephemeral_key"] == register["ephemeral_key"]


async def test_mac_register_from_new_socket_while_ios_joined_renotifies_both(nats_url):
    async with running_edges(nats_url) as (a, b):
        old_mac, ios_client, mac = await paired(a, b)
        new_mac = await Client.connect(b, mac.room_id, "mac")
        register = mac.register_message()
        await new_mac.send(**register)
        await new_mac.expect("room_registered")
        await new_mac.expect("peer_joined")
        renotified = await ios_client.expect("peer_joined")
        assert renotified["session_nonce"] == register["session_nonce"]
        assert renotified["ephemeral_key"] == register["ephemeral_key"]
        code, _ = await old_mac.expect_close()
        assert code == 4001


async def test_repeated_join_room_on_same_socket_resends_peer_joined_to_both(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        again = join_message(mac)
        await ios_client.send(**again)
        await ios_client.expect("peer_joined")
        assert (await mac_client.expect("peer_joined"))["ephemeral_key"] == again["ephemeral_key"]
        await ios_client.expect_silence()  # a repeated join replaces nobody


async def test_secret_rotation_on_same_socket_is_accepted_without_peer_joined(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        first = mac.register_message()
        old_secret_hash = mac.secret_hash
        mac.secret = "rotated-secret-0123456789abcdef"
        # The Mac's post-rotation re-register: same key and nonce, empty ephemeral key, no pairing.
        await mac_client.send(**{**mac.register_message(), "session_nonce": first["session_nonce"], "ephemeral_key": ""})
        await mac_client.expect("room_registered")
        await mac_client.expect_silence()
        await ios_client.expect_silence()

        # The new secret works and the old one does not.
        newcomer, _ = await connect_ios(b, mac)
        await newcomer.expect("peer_joined")
        stale, _ = await connect_ios(b, mac, secret_hash=old_secret_hash)
        assert (await stale.expect_error("AUTH_FAILED"))
        assert (await stale.expect_close())[0] == 4003


async def test_secret_rotation_keeps_stored_ephemeral_key_for_later_joins(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client, register = await connect_mac(a, mac)
        mac.secret = "rotated-secret-0123456789abcdef"
        await mac_client.send(**{**mac.register_message(), "session_nonce": "", "ephemeral_key": ""})
        await mac_client.expect("room_registered")
        ios_client, _ = await connect_ios(b, mac)
        to_ios = await ios_client.expect("peer_joined")
        assert to_ios["ephemeral_key"] == register["ephemeral_key"]
        assert to_ios["session_nonce"] == register["session_nonce"]


async def test_register_with_other_secret_gives_auth_failed_and_socket_stays_open(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        owner, _ = await connect_mac(a, mac)
        intruder = await Client.connect(b, mac.room_id, "mac")
        await intruder.send(**{**mac.register_message(), "secret_hash": sha256_hex("guess")})
        error = await intruder.expect_error("AUTH_FAILED")
        assert error["message"] == "Room secret mismatch"
        assert (await intruder.heartbeat())["mac_connected"] is False  # still open, not registered
        await owner.expect_silence()  # the owner keeps its slot
        assert (await owner.heartbeat())["mac_connected"] is True


async def test_register_with_changed_public_key_and_matching_secret_is_accepted(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        first, _ = await connect_mac(a, mac)
        await first.close()
        mac.public_key = b64_key()
        second, _ = await connect_mac(a, mac)
        ios_client, _ = await connect_ios(b, mac)
        assert (await ios_client.expect("peer_joined"))["public_key"] == mac.public_key


async def test_pairing_token_joins_once_then_auth_failed_and_close_4003(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("pairing-token-0123456789abcdefgh")
        mac_client, _ = await connect_mac(
            a, mac, pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) + 300
        )
        first, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        await first.expect("peer_joined")
        await mac_client.expect("peer_joined")
        second, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        error = await second.expect_error("AUTH_FAILED")
        assert error["message"] == "Pairing token already used"
        code, reason = await second.expect_close()
        assert (code, reason) == (4003, "pairing token already used")
        await first.expect_silence()  # the failed join evicted nobody


async def test_expired_pairing_token_gives_auth_failed_and_close_4003(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("pairing-token-expired")
        await connect_mac(a, mac, pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) - 1)
        ios_client, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        assert (await ios_client.expect_error("AUTH_FAILED"))["message"] == "Pairing token expired"
        assert (await ios_client.expect_close())[0] == 4003


async def test_register_from_new_socket_without_pairing_fields_clears_pairing_token(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("pairing-token-cleared")
        first, _ = await connect_mac(a, mac, pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) + 300)
        await first.close()
        await connect_mac(a, mac)  # a new socket, no pairing fields
        ios_client, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        assert (await ios_client.expect_error("AUTH_FAILED"))["message"] == "Invalid pairing token"
        assert (await ios_client.expect_close())[0] == 4003


async def test_register_with_new_pairing_hash_resets_the_used_flag(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        expires = int(time.time()) + 300
        first_hash, second_hash = sha256_hex("token-one"), sha256_hex("token-two")
        mac_client, _ = await connect_mac(a, mac, pairing_token_hash=first_hash, pairing_token_expires_at=expires)
        used, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=first_hash)
        await used.expect("peer_joined")
        await mac_client.close()
        await connect_mac(a, mac, pairing_token_hash=second_hash, pairing_token_expires_at=expires)
        fresh, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=second_hash)
        await fresh.expect("peer_joined")


async def test_join_with_wrong_secret_gives_auth_failed_and_close_4003(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        await connect_mac(a, mac)
        ios_client, _ = await connect_ios(b, mac, secret_hash=sha256_hex("wrong"))
        assert (await ios_client.expect_error("AUTH_FAILED"))["message"] == "Room secret mismatch"
        assert (await ios_client.expect_close())[0] == 4003


async def test_join_unregistered_room_gives_room_not_found_and_socket_stays_open(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        ios_client, _ = await connect_ios(b, mac)
        await ios_client.expect_error("ROOM_NOT_FOUND")
        assert (await ios_client.heartbeat())["mac_connected"] is False
        # The Mac registers later; the iPhone retries on the same socket.
        await connect_mac(a, mac)
        await ios_client.send(**join_message(mac))
        await ios_client.expect("peer_joined")


async def test_register_room_from_ios_socket_and_join_room_from_mac_socket_give_bad_role(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        mac = MacIdentity.new()
        ios_client = await Client.connect(edge, mac.room_id, "ios")
        await ios_client.send(**mac.register_message())
        await ios_client.expect_error("BAD_ROLE")
        mac_client = await Client.connect(edge, mac.room_id, "mac")
        await mac_client.send(**join_message(mac))
        await mac_client.expect_error("BAD_ROLE")
        # Neither socket was closed.
        await ios_client.heartbeat()
        await mac_client.heartbeat()


async def test_role_inferred_from_first_message_when_role_missing(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client = await Client.connect(a, mac.room_id, role=None)
        await mac_client.send(**mac.register_message())
        await mac_client.expect("room_registered")
        ios_client = await Client.connect(b, mac.room_id, role=None)
        await ios_client.send(**join_message(mac))
        await ios_client.expect("peer_joined")
        await mac_client.expect("peer_joined")
        await mac_client.send(type="relay", payload="bWFj")
        assert (await ios_client.expect("relay"))["payload"] == "bWFj"
        # Once inferred, the role is fixed.
        await ios_client.send(**mac.register_message())
        await ios_client.expect_error("BAD_ROLE")


async def test_register_room_id_must_match_the_connection_room_id(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        mac = MacIdentity.new()
        client = await Client.connect(edge, "OTHERROOM1", "mac")
        await client.send(**mac.register_message())
        await client.expect_error("BAD_MESSAGE")


async def test_replacement_after_authentication_closes_old_mac_4001_across_edges(nats_url):
    async with running_edges(nats_url) as (a, b):
        old_mac, ios_client, mac = await paired(a, b)
        new_mac, _ = await connect_mac(b, mac)
        assert (await old_mac.expect_close())[0] == 4001
        await new_mac.expect("peer_joined")
        # The survivor gets the new peer_joined, not a peer_disconnected.
        assert (await ios_client.expect("peer_joined"))["type"] == "peer_joined"
        await ios_client.expect_silence()


async def test_replacement_after_authentication_closes_old_ios_4001_across_edges(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, old_ios, mac = await paired(a, b)
        new_ios, join = await connect_ios(a, mac)
        await new_ios.expect("peer_joined")
        assert (await old_ios.expect_close())[0] == 4001
        assert (await mac_client.expect("peer_joined"))["ephemeral_key"] == join["ephemeral_key"]
        await mac_client.expect_silence()


async def test_unauthenticated_newcomer_does_not_evict_the_slot_holder(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        impostor = await Client.connect(a, mac.room_id, "ios")
        await impostor.send(**join_message(mac, secret_hash=sha256_hex("nope")))
        await impostor.expect_error("AUTH_FAILED")
        assert (await impostor.expect_close())[0] == 4003
        await mac_client.send(type="relay", payload="c3RpbGwgaGVyZQ==")
        assert (await ios_client.expect("relay"))["payload"] == "c3RpbGwgaGVyZQ=="


async def test_frames_after_replacement_reach_only_the_new_socket(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, old_ios, mac = await paired(a, b)
        new_ios, _ = await connect_ios(a, mac)
        await new_ios.expect("peer_joined")
        await mac_client.expect("peer_joined")
        assert (await old_ios.expect_close())[0] == 4001
        for n in range(20):
            await mac_client.send(type="relay", payload=f"n{n}")
        got = [(await new_ios.expect("relay"))["payload"] for _ in range(20)]
        assert got == [f"n{n}" for n in range(20)]


async def test_peer_disconnected_client_left_when_peer_closes(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        await ios_client.close()
        assert await mac_client.expect("peer_disconnected") == {"type": "peer_disconnected", "reason": "client_left"}
        await mac_client.send(type="relay", payload="eA==")
        await mac_client.expect_error("NO_PEER")


async def test_racing_first_registers_with_different_secrets_have_exactly_one_winner(nats_url):
    async with running_edges(nats_url) as (a, b):
        mine, theirs = MacIdentity.new(), MacIdentity.new()
        theirs.room_id = mine.room_id
        clients = [await Client.connect(a, mine.room_id, "mac"), await Client.connect(b, mine.room_id, "mac")]
        await asyncio.gather(clients[0].send(**mine.register_message()), clients[1].send(**theirs.register_message()))
        replies = sorted([(await c.recv())["type"] for c in clients])
        assert replies == ["error", "room_registered"]


async def test_a_late_peer_joined_about_a_replaced_iphone_does_not_undo_the_newer_one(nats_url):
    from schemas.edge_events import PeerJoinedEvent

    async with running_edges(nats_url, count=3) as (a, b, c):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        publish = b.carrier.publish_event

        async def slow_publish(session, to, role, event):
            if isinstance(event, PeerJoinedEvent):
                await asyncio.sleep(0.1)  # fault: edge b is slow to tell the Mac about its iPhone
            await publish(session, to, role, event)

        b.carrier.publish_event = slow_publish
        first, second = await Client.connect(b, mac.room_id, "ios"), await Client.connect(c, mac.room_id, "ios")
        await first.send(**join_message(mac))
        await asyncio.sleep(0.02)
        second_join = join_message(mac)
        await second.send(**second_join)
        assert (await first.expect_close())[0] == 4001
        await second.expect("peer_joined")
        # The Mac hears of the second iPhone; the late news of the first is dropped.
        assert (await mac_client.expect("peer_joined"))["public_key"] == second_join["public_key"]
        await mac_client.expect_silence(within=0.3)
        await second.send(type="relay", payload="from-second")
        assert (await mac_client.expect("relay"))["payload"] == "from-second"
        await mac_client.send(type="relay", payload="from-mac")
        assert (await second.expect("relay"))["payload"] == "from-mac"
