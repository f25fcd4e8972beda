"""The end-to-end flows of protocol.md §10, as the real Mac agent and iOS app run them."""

from __future__ import annotations

import time

from tests.harness import Client, MacIdentity, connect_ios, join_message, paired, running_edges, sha256_hex


async def test_first_pairing_by_qr_then_secret_rotation_then_normal_reconnect(nats_url):
    """§10.1 then §10.2: pair with a one-time token, rotate the secret, reconnect with it."""
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("qr-pairing-token-0123456789abcdef")
        mac_client = await Client.connect(a, mac.room_id, "mac")
        register = mac.register_message(pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) + 300)
        await mac_client.send(**register)
        await mac_client.expect("room_registered")

        ios_client, join = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        assert (await ios_client.expect("peer_joined"))["public_key"] == mac.public_key
        assert (await mac_client.expect("peer_joined"))["public_key"] == join["public_key"]

        # The encrypted handshake, opaque to the relay, both ways and in order.
        steps = [
            (mac_client, ios_client, "challenge"),
            (ios_client, mac_client, "challenge_response"),
            (mac_client, ios_client, "auth_ok"),
            (mac_client, ios_client, "pairing_credentials"),
            (ios_client, mac_client, "reverse_challenge"),
            (mac_client, ios_client, "reverse_response"),
            (mac_client, ios_client, "rotate_secret"),
            (ios_client, mac_client, "rotate_secret_ack"),
        ]
        for sender, receiver, step in steps:
            await sender.send(type="relay", payload=step)
            assert (await receiver.expect("relay"))["payload"] == step

        # The Mac re-registers on the same socket with the rotated secret.
        mac.secret = "rotated-secret-after-pairing-0001"
        await mac_client.send(
            **{**mac.register_message(), "session_nonce": register["session_nonce"], "ephemeral_key": ""}
        )
        await mac_client.expect("room_registered")
        await mac_client.expect_silence()

        # The token is spent; the iPhone reconnects with the rotated secret.
        await ios_client.close()
        assert (await mac_client.expect("peer_disconnected"))["reason"] == "client_left"
        replay, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        await replay.expect_error("AUTH_FAILED")
        assert (await replay.expect_close())[0] == 4003
        ios_again, _ = await connect_ios(a, mac)
        to_ios = await ios_again.expect("peer_joined")
        assert to_ios["ephemeral_key"] == register["ephemeral_key"]  # kept through the rotation
        await mac_client.expect("peer_joined")


async def test_mac_restart_while_ios_stays_connected(nats_url):
    """§10.3: the old Mac socket goes, iOS hears it; the new one registers and both are re-notified."""
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        await mac_client.close()
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"
        restarted = await Client.connect(b, mac.room_id, "mac")
        register = mac.register_message()
        await restarted.send(**register)
        await restarted.expect("room_registered")
        await restarted.expect("peer_joined")
        assert (await ios_client.expect("peer_joined"))["session_nonce"] == register["session_nonce"]
        await restarted.send(type="relay", payload="challenge")
        assert (await ios_client.expect("relay"))["payload"] == "challenge"


async def test_mac_rejecting_an_untrusted_ios_key_drops_its_socket_and_ios_hears_peer_disconnected(nats_url):
    """§4.4 note: the Mac enforces trust by dropping its own socket; the relay tells iOS."""
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        await mac_client.ws.close(1001)  # the Mac's own closes use 1001
        assert (await ios_client.expect("peer_disconnected"))["reason"] == "client_left"
        await ios_client.send(**join_message(mac))  # the app retries; the Mac is away
        await ios_client.expect_silence()
