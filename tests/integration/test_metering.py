"""Metering against real processes: edges, metering and a nats-server of the test's own.

Each test gets a nats-server of its own: the usage stream and metering's durable consumer
are shared by everything on a server, and a test's counts must be exactly its own.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from websockets.exceptions import ConnectionClosed

from metering.ledger import applied_through, window_of
from metering.service import Metering, MeteringSettings
from metering.stream import open_usage_stream
from metering.usage import open_usage_bucket
from metering.windows import WINDOW_MS, iso_ms, period_of, resets_at
from runtime.embedded_nats import EmbeddedNatsServer
from runtime.metrics import total
from schemas.metering import UsageBatch, UsageEntry
from schemas.records import BonusUsage, UsageLedger, UsageWindow, WelcomeBonus
from schemas.subjects import (
    QUOTA_CHECK_SUBJECT,
    USAGE_PARTITIONS,
    legacy_usage_events_subject,
    partition_consumer,
    usage_events_subject,
    usage_ledger_key,
    usage_partition,
)
from tests.harness import (
    Account,
    Client,
    EdgeProcess,
    MacIdentity,
    MeteringProcess,
    body_of_json,
    connect_ios,
    connect_mac,
    http_get,
    make_account,
    metrics,
    read_ledger,
    running_edges,
    running_metering,
)

# Edges publish often so that tests wait little; no per-socket rate limit (10,000 frames).
FAST = {"usage_flush_interval_ms": 50, "socket_rate_limit_per_s": 0, "quota_check_timeout_ms": 3_000}


@pytest.fixture
def own_nats() -> Iterator[str]:
    with EmbeddedNatsServer() as server:
        yield server.url


def now_ms() -> int:
    return int(time.time() * 1000)


async def ledger_when(url: str, user_id: str, ready: Callable[[UsageLedger], bool], timeout: float = 10.0) -> UsageLedger:
    """The user's ledger once `ready(ledger)` holds (or the last one read, after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        ledger = await read_ledger(url, user_id)
        if ready(ledger) or time.monotonic() > deadline:
            return ledger
        await asyncio.sleep(0.05)


def totals(ledger: UsageLedger) -> tuple[int, int]:
    """(message credits, duration credits) over every window, the bonus's share included."""
    messages = sum(w.message_tokens for w in ledger.windows)
    duration = sum(w.duration_tokens for w in ledger.windows)
    return messages, duration


def charged(ledger: UsageLedger) -> int:
    """Every credit charged: counted against windows plus covered by the bonus."""
    return sum(w.total_tokens + w.bonus_tokens for w in ledger.windows)


async def put_ledger(url: str, ledger: UsageLedger) -> None:
    nc = await nats.connect(url)
    try:
        kv = await open_usage_bucket(nc.jetstream(), 1)
        await kv.put(usage_ledger_key(ledger.user_id), msgspec.json.encode(ledger))
    finally:
        await nc.close()


async def pair(edge_mac: Any, edge_ios: Any, mac_account: Account, ios_account: Account | None = None) -> tuple[Client, Client]:
    """A Mac and an iPhone in one room, each with its account's key, both told of the other."""
    ios_account = ios_account or mac_account
    identity = MacIdentity.new()
    mac, _ = await connect_mac(edge_mac, identity, mac_account.auth)
    ios, _ = await connect_ios(edge_ios, identity, ios_account.auth)
    expected = {"peer_joined"} | ({"error"} if ios_account is not mac_account else set())
    assert {(await ios.recv())["type"] for _ in expected} == expected  # another account: flagged
    await mac.expect("peer_joined")
    return mac, ios


async def receive_relays(client: Client, count: int) -> int:
    """Read until `count` relayed frames arrived (skipping heartbeat acks); returns the payloads seen."""
    frames = payloads = 0
    while frames < count:
        message = await client.recv(10)
        if message["type"] == "relay":
            frames, payloads = frames + 1, payloads + 1
        elif message["type"] == "relay_batch":
            frames, payloads = frames + 1, payloads + len(message["payloads"])
        else:
            assert message["type"] == "heartbeat_ack", message
    return payloads


async def expect_quota_exceeded(client: Client) -> dict[str, Any]:
    """The relay's `quota_exceeded` (skipping what came before it), then its close 1000."""
    while True:
        message = await client.recv(10)
        if message["type"] == "quota_exceeded":
            break
    assert await client.expect_close() == (1000, "quota exceeded")
    return message


# --- counting ---------------------------------------------------------------------------------


async def test_ten_thousand_frames_over_two_edges_are_counted_exactly_per_sender_and_no_peer_frames_and_heartbeats_are_free(own_nats):
    mac_account = await make_account(own_nats, tier="premium")
    ios_account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 2, auth="required", **FAST) as (edge_a, edge_b):
        identity = MacIdentity.new()
        mac, _ = await connect_mac(edge_a, identity, mac_account.auth)
        for _ in range(5):  # nobody there yet: NO_PEER, not charged
            await mac.send(type="relay", payload="early")
            await mac.expect_error("NO_PEER")
        ios, _ = await connect_ios(edge_b, identity, ios_account.auth)
        assert {(await ios.recv())["type"] for _ in range(2)} == {"peer_joined", "error"}
        await mac.expect("peer_joined")

        async def mac_sends() -> None:
            for i in range(3_000):
                await mac.send(type="relay", payload=f"m{i}")
                if i % 300 == 0:
                    await mac.send(type="heartbeat")
            for i in range(1_000):
                await mac.send(type="relay_batch", payloads=[f"b{i}a", f"b{i}b", f"b{i}c"])

        async def ios_sends() -> None:
            for i in range(6_000):
                await ios.send(type="relay", payload=f"i{i}")
                if i % 600 == 0:
                    await ios.send(type="heartbeat")

        _, _, to_ios, to_mac = await asyncio.gather(mac_sends(), ios_sends(), receive_relays(ios, 4_000), receive_relays(mac, 6_000))
        assert (to_ios, to_mac) == (6_000, 6_000)  # every frame arrived (the batches held 3 each)

        mac_ledger = await ledger_when(own_nats, mac_account.user_id, lambda l: totals(l)[0] >= 4_000)
        ios_ledger = await ledger_when(own_nats, ios_account.user_id, lambda l: totals(l)[0] >= 6_000)
        assert totals(mac_ledger)[0] == 4_000  # one credit per frame, a batch included
        assert totals(ios_ledger)[0] == 6_000
        await asyncio.sleep(0.5)  # ten more flushes: nothing counted twice
        assert totals(await read_ledger(own_nats, mac_account.user_id))[0] == 4_000
        assert totals(await read_ledger(own_nats, ios_account.user_id))[0] == 6_000


async def test_a_relay_batch_counts_one_credit_per_payload_when_the_operator_says_so(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", charge_per_payload=True, **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for _ in range(10):
            await mac.send(type="relay_batch", payloads=["a", "b", "c", "d"])
        await mac.send(type="relay", payload="e")
        assert await receive_relays(ios, 11) == 41
        ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 41)
        assert totals(ledger)[0] == 41


async def test_with_metering_off_an_edge_counts_nothing_and_publishes_nothing(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_edges(own_nats, 1, auth="required", metering=False, **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for n in range(20):
            await mac.send(type="relay", payload=f"p{n}")
        assert await receive_relays(ios, 20) == 20
        await asyncio.sleep(0.3)  # several flush intervals of FAST
        counted = await metrics(edge)
        assert counted["relay_frames_forwarded_total"] == 20
        assert counted["relay_usage_unpublished_credits"] == 0
        assert counted["relay_usage_batches_published_total"] == 0


async def test_metering_killed_mid_traffic_and_restarted_counts_exactly(own_nats):
    account = await make_account(own_nats, tier="premium")
    settings = {"ack_wait_ms": 1_000}
    async with running_edges(own_nats, 2, auth="required", **FAST) as (edge_a, edge_b):
        metering = await MeteringProcess(own_nats, **settings).start()
        mac, ios = await pair(edge_a, edge_b, account)
        sent = 0
        for round_ in range(3):
            for _ in range(1_000):
                await mac.send(type="relay", payload="x" * 64)
            sent += 1_000
            await receive_relays(ios, 1_000)
            if round_ == 0:
                # Killed while batches flow: one may be applied and not yet acknowledged.
                await asyncio.sleep(0.07)
                assert await metering.stop(signal.SIGKILL) == -signal.SIGKILL
        async with MeteringProcess(own_nats, **settings) as restarted:
            ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= sent, timeout=20)
            assert totals(ledger)[0] == sent == 3_000
            await asyncio.sleep(1.5)  # past the ack wait: a redelivery would have come by now
            assert totals(await read_ledger(own_nats, account.user_id))[0] == 3_000
            assert "Traceback" not in restarted.log_text()


async def test_a_batch_redelivered_after_a_crash_between_applying_and_acknowledging_is_not_counted_again(own_nats):
    account = await make_account(own_nats, tier="premium")
    period = period_of(now_ms())
    partition = usage_partition(account.user_id)
    nc = await nats.connect(own_nats)
    try:
        js = nc.jetstream()
        await open_usage_stream(js, 1)
        batch = _batch(1, account.user_id, period, 7)
        again = _batch(2, account.user_id, period, 5)
        first = await publish_batch(js, batch)
        # As a metering process that died after writing the ledger leaves it: the first batch
        # applied (its stream sequence recorded for its partition), not acknowledged.
        applied = UsageLedger(
            user_id=account.user_id,
            partitions={partition_consumer(partition): first.seq},
            windows=[UsageWindow(user_id=account.user_id, period=period, message_tokens=7, total_tokens=7)],
        )
        await put_ledger(own_nats, applied)
        # The edge's retry of the first batch (its ack was lost) is stored once.
        assert (await publish_batch(js, batch)).duplicate
        await publish_batch(js, again)
        async with running_metering(own_nats) as metering:
            ledger = await ledger_when(own_nats, account.user_id, lambda l: applied_through(l, partition) > first.seq)
            assert window_of(ledger, period).message_tokens == 12  # 7 once, then 5
            assert metering.batches_applied == 2
            assert (await js.stream_info("relay_usage_events")).state.messages == 0  # both acknowledged
    finally:
        await nc.close()


async def test_batches_of_edges_from_before_partitions_are_applied_once_by_the_consumer_metering(own_nats):
    """An upgrade: batches an older edge published (one subject per edge, every user in one
    batch) are still applied, exactly once, beside the partitions' batches of the same user."""
    account = await make_account(own_nats, tier="premium")
    period = period_of(now_ms())
    nc = await nats.connect(own_nats)
    try:
        js = nc.jetstream()
        await open_usage_stream(js, 1)
        old = UsageBatch(edge_id="old", boot_id="b1", seq=1, at_ms=now_ms(), entries=[UsageEntry(account.user_id, period, 7, 0)])
        old_subject = legacy_usage_events_subject("old")
        first = await js.publish(old_subject, msgspec.json.encode(old), headers={"Nats-Msg-Id": old.msg_id})
        # Applied before a crash, not acknowledged: recorded as the ledger's `applied_seq`.
        await put_ledger(
            own_nats,
            UsageLedger(
                user_id=account.user_id,
                applied_seq=first.seq,
                windows=[UsageWindow(user_id=account.user_id, period=period, message_tokens=7, total_tokens=7)],
            ),
        )
        later = UsageBatch(edge_id="old", boot_id="b1", seq=2, at_ms=now_ms(), entries=[UsageEntry(account.user_id, period, 5, 0)])
        await js.publish(old_subject, msgspec.json.encode(later), headers={"Nats-Msg-Id": later.msg_id})
        await publish_batch(js, _batch(1, account.user_id, period, 100, edge_id="new"))
        async with running_metering(own_nats):
            ledger = await ledger_when(own_nats, account.user_id, lambda l: window_of(l, period).message_tokens >= 112)
            await asyncio.sleep(0.3)
            ledger = await read_ledger(own_nats, account.user_id)
            assert window_of(ledger, period).message_tokens == 112  # 7 once, 5, 100
            assert ledger.applied_seq > first.seq and applied_through(ledger, usage_partition(account.user_id)) > 0
            assert (await js.stream_info("relay_usage_events")).state.messages == 0
    finally:
        await nc.close()


def _batch(seq: int, user_id: str, period: str, messages: int, edge_id: str = "e1") -> UsageBatch:
    return UsageBatch(
        edge_id=edge_id, boot_id="b1", seq=seq, at_ms=now_ms(), entries=[UsageEntry(user_id, period, messages, 0)],
        partition=usage_partition(user_id),
    )


async def test_an_edge_stopped_with_sigterm_mid_traffic_hands_over_its_usage(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (ios_edge,):
        # No periodic flush in the test's time: all it publishes, it publishes at exit.
        async with EdgeProcess(own_nats, auth="required", usage_flush_interval_ms=600_000, socket_rate_limit_per_s=0) as mac_edge:
            mac, ios = await pair(mac_edge, ios_edge, account)

            async def mac_sends() -> None:
                try:
                    while True:
                        await mac.send(type="relay", payload="y" * 32)
                        await asyncio.sleep(0)
                except ConnectionClosed:
                    return  # the edge went away

            async def ios_counts() -> int:
                frames = 0
                while True:
                    message = await ios.recv(10)
                    if message["type"] == "peer_disconnected":
                        return frames
                    frames += message["type"] == "relay"

            sending = asyncio.create_task(mac_sends())
            counting = asyncio.create_task(ios_counts())
            await asyncio.sleep(0.5)
            assert await mac_edge.stop(signal.SIGTERM) == 0
            delivered = await counting
            await sending
        assert delivered > 100
        ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= delivered)
        assert totals(ledger)[0] == delivered


async def test_duration_credits_accrue_while_both_sides_are_connected_and_are_charged_to_the_room_owner(own_nats):
    owner = await make_account(own_nats, tier="premium")
    guest = await make_account(own_nats, tier="premium")
    ms_per_credit = 100  # the "minute" shortened: 2 credits per 200 ms
    async with running_metering(own_nats), running_edges(
        own_nats, 2, auth="required", session_ms_per_credit=ms_per_credit, **FAST
    ) as (edge_a, edge_b):
        identity = MacIdentity.new()
        mac, _ = await connect_mac(edge_a, identity, owner.auth)
        await asyncio.sleep(1.0)  # the Mac alone: no session
        assert totals(await read_ledger(own_nats, owner.user_id))[1] == 0
        ios, _ = await connect_ios(edge_b, identity, guest.auth)
        assert {(await ios.recv())["type"] for _ in range(2)} == {"peer_joined", "error"}
        await mac.expect("peer_joined")
        started = time.monotonic()
        await asyncio.sleep(2.0)
        await ios.close()
        await mac.expect("peer_disconnected")
        lasted_ms = (time.monotonic() - started) * 1000
        await asyncio.sleep(0.5)  # the Mac alone again: nothing more
        ledger = await ledger_when(own_nats, owner.user_id, lambda l: totals(l)[1] >= 15)
        duration = totals(ledger)[1]
        # Sampled every flush (50 ms): each end of the session may miss one interval.
        assert lasted_ms / ms_per_credit - 2 <= duration <= lasted_ms / ms_per_credit + 1, (duration, lasted_ms)
        assert totals(ledger)[0] == 0
        assert totals(await read_ledger(own_nats, guest.user_id)) == (0, 0)


# --- quota --------------------------------------------------------------------------------------


async def test_quota_exceeded_at_connect_gets_the_message_with_every_field_then_close_1000(own_nats):
    grant = WelcomeBonus(credits=100, created_at=now_ms() - 1_000, expires_at=now_ms() + 86_400_000)
    account = await make_account(own_nats, tier="free", welcome_bonus=grant)
    now = now_ms()
    await put_ledger(
        own_nats,
        UsageLedger(
            user_id=account.user_id,
            applied_seq=1,
            windows=[UsageWindow(user_id=account.user_id, period=period_of(now), message_tokens=1_000, total_tokens=1_000)],
            bonus=BonusUsage(used=100, grant_created_at=grant.created_at),
        ),
    )
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        for role in ("mac", "ios"):  # every connection's own user is checked (§12 item 5)
            client = await Client.connect(edge, MacIdentity.new().room_id, role, account.auth)
            message = await expect_quota_exceeded(client)
            assert message == {
                "type": "quota_exceeded",
                "usage": 1_000,
                "limit": 1_000,
                "period": period_of(now),
                "resets_at": resets_at(now),
                "extra_quota_used": 100,
                "extra_quota_limit": 100,
                "extra_quota_expires_at": iso_ms(grant.expires_at),
            }
            assert message["resets_at"].endswith(".000Z")


async def test_quota_crossed_mid_session_closes_the_users_sockets_on_every_edge(own_nats):
    account = await make_account(own_nats, tier="free", credits_per_window=50)
    bystander = await make_account(own_nats, tier="free")
    async with running_metering(own_nats), running_edges(own_nats, 2, auth="required", **FAST) as (edge_a, edge_b):
        mac, ios = await pair(edge_a, edge_b, account)
        other_mac, other_ios = await pair(edge_a, edge_b, bystander)
        for i in range(60):
            await mac.send(type="relay", payload=f"p{i}")
        for client in (mac, ios):
            message = await expect_quota_exceeded(client)
            assert message["limit"] == 50 and message["usage"] >= 50  # the override, not the tier's 1000
            assert "extra_quota_used" not in message  # no welcome bonus, no bonus fields
        await other_mac.send(type="relay", payload="still here")
        assert (await other_ios.expect("relay"))["payload"] == "still here"
        # And the next connection of that user is refused at connect.
        again = await Client.connect(edge_b, MacIdentity.new().room_id, "mac", account.auth)
        await expect_quota_exceeded(again)


async def test_quota_checks_and_over_limit_announcements_work_whichever_metering_process_owns_the_users_partition(own_nats):
    """With two metering processes each owning half the partitions: the user's partition's
    owner announces the crossing, and either process answers the check at connect."""
    lease = {"partition_lease_ms": 1500}
    async with running_metering(own_nats, **lease) as first, running_metering(own_nats, **lease) as second:
        assert await wait_for(lambda: _owning((8, 8), first, second), 10), _owned(first, second)
        by_owner: dict[bool, list[Account]] = {True: [], False: []}  # owned by `first`?
        while min(len(found) for found in by_owner.values()) < 2:
            account = await make_account(own_nats, tier="free", credits_per_window=20)
            by_owner[usage_partition(account.user_id) in first.partitions()].append(account)
        accounts = by_owner[True][:2] + by_owner[False][:2]
        async with running_edges(own_nats, 2, auth="required", **FAST) as (edge_a, edge_b):
            for account in accounts:
                mac, ios = await pair(edge_a, edge_b, account)
                for i in range(30):
                    await mac.send(type="relay", payload=f"p{i}")
                for client in (mac, ios):
                    assert (await expect_quota_exceeded(client))["limit"] == 20
                for _ in range(4):  # the checks go to either process (a queue group)
                    again = await Client.connect(edge_b, MacIdentity.new().room_id, "mac", account.auth)
                    await expect_quota_exceeded(again)
        announced = [total(m.metrics.over_limit_announcements) for m in (first, second)]
        checks = [_exceeded_answers(m) for m in (first, second)]
        assert all(n > 0 for n in announced), announced  # each owner announced its users
        assert all(n > 0 for n in checks), checks


def _exceeded_answers(metering: Metering) -> float:
    """The quota checks a metering process answered "exceeded", read as a scrape reads them."""
    return sum(
        sample.value
        for family in metering.metrics.quota_checks.collect()
        for sample in family.samples
        if sample.labels.get("result") == "exceeded" and not sample.name.endswith("_created")
    )


async def test_the_welcome_bonus_is_consumed_before_the_window_quota(own_nats):
    grant = WelcomeBonus(credits=30, created_at=now_ms() - 1_000, expires_at=now_ms() + 86_400_000)
    account = await make_account(own_nats, tier="free", credits_per_window=10, welcome_bonus=grant)
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for _ in range(35):
            await mac.send(type="relay", payload="z")
        await receive_relays(ios, 35)
        ledger = await ledger_when(own_nats, account.user_id, lambda l: charged(l) >= 35)
        window = window_of(ledger, period_of(now_ms()))
        assert ledger.bonus.used == 30 and window.bonus_tokens == 30
        assert window.total_tokens == 5  # below the limit of 10: still allowed
        await mac.heartbeat()
        usage = body_of_json(await http_get(edge.port, "/usage", account.auth))
        assert usage["total_tokens"] == 5 and usage["remaining"] == 5
        assert usage["extra_quota"]["remaining"] == 0 and usage["extra_quota"]["limit"] == 30
        for _ in range(6):
            await mac.send(type="relay", payload="z")
        message = await expect_quota_exceeded(mac)
        assert message["usage"] >= 10 and message["extra_quota_used"] == 30 and message["extra_quota_limit"] == 30


async def test_usage_of_the_previous_window_does_not_count_in_this_one_and_resets_at_is_the_next_boundary(own_nats):
    account = await make_account(own_nats, tier="free")
    now = now_ms()
    previous = period_of(now - WINDOW_MS)
    await put_ledger(
        own_nats,
        UsageLedger(
            user_id=account.user_id,
            applied_seq=1,
            windows=[UsageWindow(user_id=account.user_id, period=previous, message_tokens=5_000, total_tokens=5_000)],
        ),
    )
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, _ = await connect_mac(edge, MacIdentity.new(), account.auth)
        await mac.heartbeat()  # let in: the new window is empty
        usage = body_of_json(await http_get(edge.port, "/usage", account.auth))
        assert usage["total_tokens"] == 0 and usage["resets_at"] == resets_at(now_ms())
        history = body_of_json(await http_get(edge.port, "/usage/history", account.auth))["history"]
        assert [(h["period"], h["total_tokens"]) for h in history] == [(period_of(now_ms()), 0), (previous, 5_000)]


async def test_usage_charged_is_reported_by_get_usage_and_relay_admin_usage(own_nats):
    import json
    import subprocess
    import sys

    account = await make_account(own_nats, tier="pro")
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for _ in range(25):
            await ios.send(type="relay", payload="q")
        await receive_relays(mac, 25)
        await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 25)
        usage = body_of_json(await http_get(edge.port, "/usage", account.auth))
        assert (usage["message_tokens"], usage["total_tokens"], usage["limit"], usage["remaining"]) == (25, 25, 10_000, 9_975)
        admin = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "accounts.admin", "--nats-url", own_nats, "usage", account.user_id],
            capture_output=True, text=True, timeout=30,
        )
        assert admin.returncode == 0, admin.stderr
        assert json.loads(admin.stdout)["message_tokens"] == 25


# --- metering away ------------------------------------------------------------------------------


async def test_with_metering_down_connections_are_still_accepted_and_the_misses_are_counted(own_nats):
    account = await make_account(own_nats, tier="free")
    async with running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, _ = await connect_mac(edge, MacIdentity.new(), account.auth)
        await mac.heartbeat()
        assert (await metrics(edge))["relay_quota_checks_unanswered_total"] == 1


async def test_a_metering_that_does_not_answer_in_time_does_not_keep_connections_out(own_nats):
    account = await make_account(own_nats, tier="free")
    silent = await nats.connect(own_nats)

    async def never_answer(msg: Any) -> None:
        pass

    try:
        await silent.subscribe(QUOTA_CHECK_SUBJECT, queue="metering", cb=never_answer)
        await silent.flush()
        settings = {**FAST, "quota_check_timeout_ms": 200}
        async with running_edges(own_nats, 1, auth="required", **settings) as (edge,):
            started = time.monotonic()
            mac, _ = await connect_mac(edge, MacIdentity.new(), account.auth)
            await mac.heartbeat()
            assert time.monotonic() - started < 5
            assert (await metrics(edge))["relay_quota_checks_unanswered_total"] == 1
    finally:
        await silent.close()


async def test_usage_published_while_metering_is_down_is_applied_when_it_starts(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for _ in range(40):
            await mac.send(type="relay", payload="w")
        await receive_relays(ios, 40)
        await asyncio.sleep(0.3)  # published to the stream, nobody consuming
        assert totals(await read_ledger(own_nats, account.user_id))[0] == 0
        async with running_metering(own_nats):
            ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 40)
            assert totals(ledger)[0] == 40


async def test_two_metering_processes_share_the_partitions_and_count_exactly_while_one_stops(own_nats):
    """Each usage partition is owned by one process; a process that stops hands its share
    over (after its groups in hand), and every credit counts once."""
    nc, rounds = await open_usage_rounds(own_nats, 24)
    users, period = rounds.users, rounds.period
    assert len({usage_partition(u) for u in users}) > 8  # spread over most partitions
    try:
        publish_round = rounds.publish

        async with running_metering(own_nats, partition_lease_ms=1500) as first:
            async with running_metering(own_nats, partition_lease_ms=1500) as second:
                assert await wait_for(lambda: _owning((8, 8), first, second), 10), _owned(first, second)
                assert set(first.partitions()).isdisjoint(second.partitions())
                for _ in range(5):
                    await publish_round(3)
                    await asyncio.sleep(0.05)
                assert await wait_for(lambda: _all_have(own_nats, users, period, 15), 10)
                for _ in range(5):
                    await publish_round(1)  # while the second stops
            assert await wait_for(lambda: _owning((16, 0), first, second), 10), _owned(first, second)
            await publish_round(2)
            assert await wait_for(lambda: _all_have(own_nats, users, period, 22), 10)
            await asyncio.sleep(0.5)  # a batch counted twice would show by now
            assert await _all_have(own_nats, users, period, 22)
            assert first.batches_applied > 0 and second.batches_applied > 0
            assert first.batches_applied + second.batches_applied == rounds.published
    finally:
        await nc.close()


async def test_a_metering_process_killed_holding_partitions_is_taken_over_after_its_claims_expire_and_counts_exactly(own_nats):
    nc, rounds = await open_usage_rounds(own_nats, 24)
    users, period = rounds.users, rounds.period
    lease = {"partition_lease_ms": 1500}
    try:
        publish_round = rounds.publish

        async with running_metering(own_nats, **lease) as survivor:
            async with MeteringProcess(own_nats, **lease) as doomed:
                assert await wait_for(lambda: _owning((8,), survivor), 10), _owned(survivor)
                await publish_round(2)
                assert await wait_for(lambda: _all_have(own_nats, users, period, 2), 10)
                for round_ in range(4):
                    await publish_round(1)
                    if round_ == 1:  # killed while its partitions' batches flow
                        assert await doomed.stop(signal.SIGKILL) == -signal.SIGKILL
                        killed_at = time.monotonic()
            assert await wait_for(lambda: _owning((16,), survivor), 10), _owned(survivor)
            taken_over_s = time.monotonic() - killed_at
            assert taken_over_s < 1.5 + 1.0  # the claim's TTL and a round of the survivor
            assert await wait_for(lambda: _all_have(own_nats, users, period, 6), 10)
            await asyncio.sleep(0.5)  # a batch counted twice would show by now
            assert await _all_have(own_nats, users, period, 6)
    finally:
        await nc.close()


async def test_a_metering_process_stalled_past_its_claims_and_resumed_counts_nothing_twice_and_loses_nothing(own_nats):
    """SIGSTOP: the process neither dies nor renews. Its claims expire, the other process
    takes its partitions over (making their consumers afresh); then it resumes, maybe with
    a group in hand, finds its claims gone and takes no more batches; the two share the
    partitions again. Every credit counts once (metering.partitions: the fencing)."""
    nc, rounds = await open_usage_rounds(own_nats, 24)
    users, period = rounds.users, rounds.period
    lease = {"partition_lease_ms": 1500}
    try:
        async with running_metering(own_nats, **lease) as steady:
            async with MeteringProcess(own_nats, **lease) as stalled:
                assert await wait_for(lambda: _owning((8,), steady), 10), _owned(steady)
                done = asyncio.Event()
                publishing = asyncio.create_task(_keep_publishing(rounds, done))
                try:
                    await asyncio.sleep(0.5)
                    stalled.process.send_signal(signal.SIGSTOP)
                    assert await wait_for(lambda: _owning((16,), steady), 10), _owned(steady)
                    await asyncio.sleep(0.5)
                    stalled.process.send_signal(signal.SIGCONT)
                    assert await wait_for(lambda: _owning((8,), steady), 10), _owned(steady)  # shared again
                    await asyncio.sleep(0.5)
                finally:
                    done.set()
                    await publishing
                expected = rounds.published // len(users)
                assert rounds.published == expected * len(users)
                assert await wait_for(lambda: _all_have(own_nats, users, period, expected), 15)
                await asyncio.sleep(0.5)  # a batch counted twice would show by now
                assert await _all_have(own_nats, users, period, expected)
                assert "lost" in stalled.log_text() or "expired" in stalled.log_text()
    finally:
        await nc.close()


async def _keep_publishing(rounds: UsageRounds, done: asyncio.Event) -> None:
    """A round of one credit each every 20 ms, until `done` (never stopping mid-round)."""
    while not done.is_set():
        await rounds.publish(1)
        await asyncio.sleep(0.02)


async def open_usage_rounds(url: str, users: int) -> tuple[Any, UsageRounds]:
    """`users` new accounts, the usage stream, and a connection to publish their rounds on
    (the caller closes it)."""
    user_ids = [(await make_account(url, tier="premium")).user_id for _ in range(users)]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await open_usage_stream(js, 1)
    return nc, UsageRounds(js, user_ids, period_of(now_ms()))


class UsageRounds:
    """Batches as edges publish them: a round charges every user, a batch each."""

    def __init__(self, js: Any, users: list[str], period: str) -> None:
        self.js, self.users, self.period = js, users, period
        self.published = 0

    async def publish(self, credits: int) -> None:
        for user_id in self.users:
            self.published += 1
            await publish_batch(self.js, _batch(self.published, user_id, self.period, credits))


def _owned(*processes: Metering) -> tuple[int, ...]:
    """How many partitions each process owns."""
    return tuple(len(p.partitions()) for p in processes)


async def _owning(expected: tuple[int, ...], *processes: Metering) -> bool:
    return _owned(*processes) == expected


async def _all_have(url: str, users: list[str], period: str, credits: int) -> bool:
    ledgers = await asyncio.gather(*(read_ledger(url, u) for u in users))
    return all(window_of(ledger, period).message_tokens == credits for ledger in ledgers)


# --- batches metering cannot apply, storage that refuses writes ----------------------------


async def start_metering(url: str, **overrides: Any) -> tuple[Metering, asyncio.Task[None]]:
    """A metering service in this process, ready; the caller watches its task."""
    metering = Metering(MeteringSettings(nats_url=url, **overrides))
    task = asyncio.create_task(metering.run())
    ready = asyncio.create_task(metering.ready.wait())
    done, _ = await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, f"metering did not become ready: {task.exception() if task.done() else 'timeout'}"
    return metering, task


async def stop_metering(metering: Metering, task: asyncio.Task[None]) -> None:
    metering.stop()
    await asyncio.gather(task, return_exceptions=True)


async def publish_batch(js: Any, batch: UsageBatch) -> Any:
    """Publish `batch` as an edge does, to its partition's subject (all its users are in one)."""
    partition = usage_partition(batch.entries[0].user_id)
    assert all(usage_partition(e.user_id) == partition for e in batch.entries)
    batch.partition = partition
    subject = usage_events_subject(batch.edge_id, partition)
    return await js.publish(subject, msgspec.json.encode(batch), headers={"Nats-Msg-Id": batch.msg_id})


async def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_storage_error_while_applying_a_batch_is_waited_out_not_fatal(own_nats):
    """Found in review: the per-user writes run in a TaskGroup, whose ExceptionGroup the
    storage-error retry did not catch, so one refused write ended the whole process."""
    account = await make_account(own_nats, tier="premium")
    nc = await nats.connect(own_nats)
    try:
        js = nc.jetstream()
        # The usage bucket as an operator (or a full disk / a leader election) makes it refuse
        # writes for a while: here, values over 16 bytes are refused (a JetStream API error).
        from nats.js.api import KeyValueConfig

        from metering.ledger import USAGE_TTL_MS
        from schemas.subjects import USAGE_BUCKET

        await js.create_key_value(KeyValueConfig(bucket=USAGE_BUCKET, history=1, ttl=USAGE_TTL_MS / 1000, max_value_size=16))
        await open_usage_stream(js, 1)
        period = period_of(now_ms())
        await publish_batch(js, UsageBatch(edge_id="e1", boot_id="b1", seq=1, at_ms=now_ms(), entries=[UsageEntry(account.user_id, period, 7, 0)]))
        metering, task = await start_metering(own_nats)
        try:
            await asyncio.sleep(1.5)  # metering tries to write the ledger, and is refused
            assert not task.done(), f"metering stopped on a storage error: {task.exception()!r}"
            # The trouble ends: the batch (still metering's) is applied.
            info = await js.stream_info(f"KV_{USAGE_BUCKET}")
            info.config.max_msg_size = -1
            await js.update_stream(info.config)
            assert await wait_for(lambda: _has(own_nats, account.user_id, 7), 8)
        finally:
            await stop_metering(metering, task)
    finally:
        await nc.close()


async def _has(url: str, user_id: str, credits: int) -> bool:
    ledger = await read_ledger(url, user_id)
    return sum(w.message_tokens for w in ledger.windows) == credits


async def test_a_batch_that_decodes_but_cannot_be_applied_is_dropped_and_the_next_is_applied(own_nats):
    """Found in review: a batch naming a period that is not `5h-N` ended every metering process
    that took it, and stayed first in the stream (a poison message)."""
    account = await make_account(own_nats, tier="premium")
    nc = await nats.connect(own_nats)
    try:
        js = nc.jetstream()
        await open_usage_stream(js, 1)
        period = period_of(now_ms())
        await publish_batch(js, UsageBatch(edge_id="e1", boot_id="b1", seq=1, at_ms=now_ms(), entries=[UsageEntry(account.user_id, "5h-soon", 3, 0)]))
        await publish_batch(js, UsageBatch(edge_id="e1", boot_id="b1", seq=2, at_ms=now_ms(), entries=[UsageEntry(account.user_id, period, 5, 0)]))
        for attempt in range(2):  # a restarted metering fares no better
            metering, task = await start_metering(own_nats)
            try:
                await asyncio.sleep(1.0)
                assert not task.done(), f"metering (start {attempt + 1}) ended on a bad batch: {task.exception()!r}"
            finally:
                await stop_metering(metering, task)
        ledger = await read_ledger(own_nats, account.user_id)
        assert window_of(ledger, period).message_tokens == 5
    finally:
        await nc.close()


async def test_a_usage_stream_deleted_by_hand_is_made_again_and_later_usage_still_counts(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_metering(own_nats), running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        for _ in range(30):
            await mac.send(type="relay", payload="before")
        await receive_relays(ios, 30)
        assert totals(await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 30))[0] == 30
        nc = await nats.connect(own_nats)
        try:
            await nc.jetstream().delete_stream("relay_usage_events")
        finally:
            await nc.close()
        for _ in range(20):
            await mac.send(type="relay", payload="after")
        await receive_relays(ios, 20)
        # The edge makes the stream again (starting above every sequence the old one had, so
        # the ledger, which has batch sequences of the old stream, skips none), metering its
        # consumer: the usage after the deletion counts, once.
        ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 50, timeout=15)
        assert totals(ledger)[0] == 50
        await asyncio.sleep(0.5)
        assert totals(await read_ledger(own_nats, account.user_id))[0] == 50


async def test_an_edge_makes_a_deleted_usage_stream_again_without_metering_running(own_nats):
    account = await make_account(own_nats, tier="premium")
    async with running_edges(own_nats, 1, auth="required", **FAST) as (edge,):
        mac, ios = await pair(edge, edge, account)
        nc = await nats.connect(own_nats)
        try:
            js = nc.jetstream()
            await js.delete_stream("relay_usage_events")
            for _ in range(10):
                await mac.send(type="relay", payload="kept")
            await receive_relays(ios, 10)
            deadline = time.monotonic() + 10
            while True:  # the edge's next publish finds no stream, makes it, and publishes
                try:
                    if (await js.stream_info("relay_usage_events")).state.messages >= 1:
                        break
                except nats.js.errors.NotFoundError:
                    pass
                assert time.monotonic() < deadline, "the usage stream was not made again"
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
        async with running_metering(own_nats):
            ledger = await ledger_when(own_nats, account.user_id, lambda l: totals(l)[0] >= 10)
            assert totals(ledger)[0] == 10
