"""A removal stays removed across crashes of the NATS servers (issue 16, item 1).

Revoked API keys, used refresh tokens, deleted registrations and deleted rooms, on one
nats-server and on a three-node cluster with R3 buckets, each server SIGKILLed (by PID,
its data kept) and started again on the same store. Before the kill each test waits
until the removals' purge markers have expired: that is when nats-server 2.15 used to
bring the removed values back (see edge/kv.py). Each test also keeps something alive,
to show that the restarted store is the same store and not an empty one.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from accounts.store import AccountStore
from edge.store import RoomStore, open_buckets
from runtime import kv
from runtime.embedded_nats import EmbeddedNatsCluster, EmbeddedNatsServer
from schemas.records import Registration, RoomRecord, User
from schemas.subjects import (
    ACCOUNTS_BUCKET,
    PRESENCE_BUCKET,
    REGISTRATIONS_BUCKET,
    ROOMS_BUCKET,
    api_key_key,
    kv_stream,
    kv_subject,
    refresh_token_key,
    registration_key,
    room_key,
)
from tests.harness import http_get, new_room_id, running_edges

T = TypeVar("T")

KEY_TTL_S = 30 * 86_400
REFRESH_TTL_S = 180 * 86_400
DAY_MS = 86_400_000
# How long a test waits for markers and TTLs to run out, and for a restarted server.
PATIENCE_S = 15.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- servers --------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """One nats-server of this test's own, on a free port, its store in `tmp_path`."""
    node = EmbeddedNatsServer(store_dir=tmp_path / "nats").start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(size=3) as nats_cluster:
        yield nats_cluster


def crash_and_restart(*nodes: EmbeddedNatsServer) -> None:
    """SIGKILL every node (by PID; the data stays), then start each again on its store."""
    for node in nodes:
        node.kill()
    for node in nodes:
        node.start()


async def retrying(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` once it stops failing for want of a (restarted) server or stream leader."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            return await attempt()
        except (nats.errors.Error, asyncio.TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Stores:
    """The stores of the relay, over one NATS connection."""

    def __init__(self, nc: nats.NATS, accounts: AccountStore, rooms: RoomStore) -> None:
        self.nc, self.accounts, self.rooms = nc, accounts, rooms
        self.js = nc.jetstream(timeout=5)


@asynccontextmanager
async def stores(urls: list[str], replicas: int = 1) -> AsyncIterator[Stores]:
    """The stores, once the (restarted) servers have their buckets' streams led and current."""
    nc = await retrying(lambda: nats.connect(servers=urls, connect_timeout=1, max_reconnect_attempts=-1))
    try:
        probe = nc.jetstream(timeout=1)  # a restarted cluster elects its leaders in ~5 s: ask often
        await retrying(lambda: AccountStore.open(probe, replicas))
        await retrying(lambda: open_buckets(probe, replicas))
        await retrying(lambda: until_led(probe))
        js = nc.jetstream(timeout=5)
        rooms_kv, _ = await open_buckets(js, replicas)
        yield Stores(nc, await AccountStore.open(js, replicas), RoomStore(rooms_kv, js))
    finally:
        await nc.close()


async def until_led(js) -> None:
    """Wait until each bucket's stream has a leader and every replica is current."""
    deadline = time.monotonic() + PATIENCE_S
    for bucket in (ACCOUNTS_BUCKET, REGISTRATIONS_BUCKET, ROOMS_BUCKET, PRESENCE_BUCKET):
        while True:
            info = await js.stream_info(kv_stream(bucket))
            replicas = (info.cluster.replicas or []) if info.cluster else []
            if info.cluster is None or (info.cluster.leader and all(p.current and not p.offline for p in replicas)):
                break
            assert time.monotonic() < deadline, f"{bucket} has no leader or a replica behind"
            await asyncio.sleep(0.1)


async def until_gone(js, bucket: str, *keys: str) -> None:
    """Wait until the bucket holds no message at all for `keys`: their markers have expired."""
    subjects = {kv_subject(bucket, key) for key in keys}
    deadline = time.monotonic() + PATIENCE_S
    while True:
        info = await js.stream_info(kv_stream(bucket), subjects_filter=kv_subject(bucket, ">"))
        left = subjects & set(info.state.subjects or {})
        if not left:
            return
        assert time.monotonic() < deadline, f"still in {bucket}: {sorted(left)}"
        await asyncio.sleep(0.1)


# --- what is removed, and what stays -----------------------------------------------------


def a_room(room_id: str, owner: str) -> RoomRecord:
    return RoomRecord(
        room_id=room_id, owner_user_id=owner, secret_hash="ab" * 32, mac_public_key="key", created_at=1, last_activity_at=1
    )


class Removals:
    """One of each removal the relay makes, each on a key written more than once before
    (a slid key, a refreshed registration, an updated room), and one live value of each."""

    async def make(self, s: Stores, grace_s: float = 2) -> None:
        store, now = s.accounts, now_ms()
        self.user = f"u{secrets.token_hex(5)}"
        await store.create_user(User(user_id=self.user, email=f"{self.user}@example.com", tier="free", created_at=now))
        # relay-admin keys revoke (and /auth/revoke): a key slid forward once, then revoked.
        self.revoked_key, self.revoked_refresh = await store.issue_key(self.user, now, KEY_TTL_S, REFRESH_TTL_S)
        slid = await store.find_key(self.revoked_key, now + 2 * DAY_MS, KEY_TTL_S)
        assert slid is not None and slid.expires_at > now + KEY_TTL_S * 1000  # a second revision
        assert await store.revoke_key(self.revoked_key)
        # /auth/refresh without grace: the old key and the old refresh token are removed.
        self.old_key, self.old_refresh = await store.issue_key(self.user, now, KEY_TTL_S, REFRESH_TTL_S)
        rotated = await store.rotate(self.old_refresh, now, KEY_TTL_S, REFRESH_TTL_S, grace_s=0)
        assert rotated is not None
        _, self.live_key, self.live_refresh = rotated
        # /auth/refresh with a grace: the used token is kept marked as used, for the grace.
        self.used_key, self.used_refresh = await store.issue_key(self.user, now, KEY_TTL_S, REFRESH_TTL_S)
        assert await store.rotate(self.used_refresh, now_ms(), KEY_TTL_S, REFRESH_TTL_S, grace_s=grace_s) is not None
        # DELETE /api/rooms/{id}: a refreshed registration and an updated room record.
        self.room, self.live_room = new_room_id(), new_room_id()
        for room in (self.room, self.live_room):
            await store.put_registration(self.user, room, now_ms(), 900)
            await store.put_registration(self.user, room, now_ms(), 900)
            revision = await s.rooms.write(room, a_room(room, self.user), 0)
            await s.rooms.write(room, a_room(room, self.user), revision)
        _, revision = await s.rooms.get(self.room)
        await s.rooms.delete(self.room, revision)
        await store.delete_registration(self.user, self.room)

    def removed_account_keys(self) -> list[str]:
        hashes = [(self.revoked_key, self.revoked_refresh), (self.old_key, self.old_refresh), (self.used_key, self.used_refresh)]
        return [k for key, refresh in hashes for k in (api_key_key(_hash(key)), refresh_token_key(_hash(refresh)))]

    async def until_markers_are_gone(self, s: Stores) -> None:
        await until_gone(s.js, ACCOUNTS_BUCKET, *self.removed_account_keys())
        await until_gone(s.js, REGISTRATIONS_BUCKET, registration_key(self.user, self.room))
        await until_gone(s.js, ROOMS_BUCKET, room_key(self.room))

    async def check(self, s: Stores, reuse_the_room_id: bool = True) -> None:
        """Everything live is there, and nothing removed came back (then, if told, the
        deleted room's id is taken again, as a new room)."""
        store, now = s.accounts, now_ms()
        # Alive: the store came back with its data.
        assert await retrying(lambda: store.find_key(self.live_key, now, KEY_TTL_S)) is not None
        assert await store.find_refresh(self.live_refresh, now) is not None
        assert (await store.get_registration(self.user, self.live_room)) is not None
        assert (await s.rooms.get(self.live_room))[0] is not None
        # Removed: each that came back is named.
        back = []
        for name, api_key in (("revoked key", self.revoked_key), ("old key", self.old_key), ("used key", self.used_key)):
            if await store.find_key(api_key, now, KEY_TTL_S) is not None:
                back.append(name)
        for name, refresh in (
            ("revoked key's refresh token", self.revoked_refresh),
            ("old refresh token", self.old_refresh),
            ("used refresh token", self.used_refresh),
        ):
            if await store.find_refresh(refresh, now) is not None:
                back.append(name)
            elif await store.rotate(refresh, now, KEY_TTL_S, REFRESH_TTL_S, grace_s=2) is not None:
                back.append(f"{name} (rotated again)")
        if await store.get_registration(self.user, self.room) is not None:
            back.append("registration")
        if [r.room_id for r in await store.registrations(self.user)] != [self.live_room]:
            back.append("registration (listed)")
        if await store.count_registrations(self.user) != 1:
            back.append("registration (counted)")
        record, revision = await s.rooms.get(self.room)
        if record is not None:
            back.append("room")
        assert back == [], f"came back: {', '.join(back)}"
        if reuse_the_room_id:
            await s.rooms.write(self.room, a_room(self.room, "someone-else"), revision)


def _hash(token: str) -> str:
    from accounts.tokens import token_hash

    return token_hash(token)


# --- one node ------------------------------------------------------------------------------


async def test_revoked_keys_used_refresh_tokens_deleted_rooms_and_registrations_stay_removed_after_a_sigkill(server):
    removals = Removals()
    async with stores([server.url]) as s:
        await removals.make(s)
        await removals.until_markers_are_gone(s)  # and the used token's grace is over
    crash_and_restart(server)
    async with stores([server.url]) as s:
        await removals.check(s)


async def test_removals_stay_removed_when_their_markers_are_cleaned_up_at_once(server):
    # What `nats kv compact` and nats-py's purge_deletes do: purge the marker's subject.
    # The removed value must not depend on its marker staying.
    removals = Removals()
    async with stores([server.url]) as s:
        await removals.make(s)
        for bucket, keys in (
            (ACCOUNTS_BUCKET, removals.removed_account_keys()),
            (REGISTRATIONS_BUCKET, [registration_key(removals.user, removals.room)]),
            (ROOMS_BUCKET, [room_key(removals.room)]),
        ):
            for key in keys:
                await s.js.purge_stream(kv_stream(bucket), subject=kv_subject(bucket, key))
        await removals.until_markers_are_gone(s)
    crash_and_restart(server)
    async with stores([server.url]) as s:
        await removals.check(s)


async def test_a_revoked_key_answers_401_on_profile_after_nats_is_killed_and_restarted(server):
    # The report's reproduction, through an edge: revoke, 401, wait, SIGKILL, restart, 401.
    async with stores([server.url]) as s:
        user = f"u{secrets.token_hex(5)}"
        await s.accounts.create_user(User(user_id=user, email=f"{user}@example.com", tier="free", created_at=now_ms()))
        api_key, _ = await s.accounts.issue_key(user, now_ms(), KEY_TTL_S, REFRESH_TTL_S)
        live_key, _ = await s.accounts.issue_key(user, now_ms(), KEY_TTL_S, REFRESH_TTL_S)
    auth, live_auth = ({"Authorization": f"Bearer {key}"} for key in (api_key, live_key))
    async with running_edges(server.url, count=1, auth="required") as (edge,):
        assert (await http_get(edge.port, "/profile", auth))[0] == 200
        async with stores([server.url]) as s:
            assert await s.accounts.revoke_key(api_key)
            assert (await http_get(edge.port, "/profile", auth))[0] == 401
            await until_gone(s.js, ACCOUNTS_BUCKET, api_key_key(_hash(api_key)))
        crash_and_restart(server)
        deadline = time.monotonic() + PATIENCE_S
        while (await http_get(edge.port, "/profile", live_auth))[0] != 200:  # the edge is back on NATS
            assert time.monotonic() < deadline, "the edge did not serve again"
            await asyncio.sleep(0.2)
        assert (await http_get(edge.port, "/profile", auth))[0] == 401


async def test_a_bucket_made_with_one_message_per_key_is_raised_to_two_and_its_removals_hold(server):
    # Buckets made before removals were durable kept one message per key; opening them
    # now raises that, or their removals would still come back.
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        for bucket in (ACCOUNTS_BUCKET, REGISTRATIONS_BUCKET, ROOMS_BUCKET):
            await js.create_key_value(KeyValueConfig(bucket=bucket, history=1))
    finally:
        await nc.close()
    removals = Removals()
    async with stores([server.url]) as s:
        for bucket in (ACCOUNTS_BUCKET, REGISTRATIONS_BUCKET, ROOMS_BUCKET):
            info = await s.js.stream_info(kv_stream(bucket))
            assert info.config.max_msgs_per_subject == kv.DURABLE_HISTORY
        await removals.make(s)
        await removals.until_markers_are_gone(s)
    crash_and_restart(server)
    async with stores([server.url]) as s:
        await removals.check(s)


async def test_a_registration_past_its_own_expiry_reads_as_absent_while_the_store_still_holds_it(nats_url):
    # Whatever brings a value back (a server that lost a tombstone), a record that is dead
    # by its own fields is not believed. API keys and refresh tokens check expires_at too.
    async with stores([nats_url]) as s:
        user, room, now = f"u{secrets.token_hex(5)}", new_room_id(), now_ms()
        stale = Registration(user_id=user, room_id=room, created_at=now - 2000, last_seen=now - 2000, expires_at=now - 1)
        await kv.write(s.js, REGISTRATIONS_BUCKET, registration_key(user, room), msgspec.json.encode(stale), ttl_s=3600)
        assert await s.accounts.get_registration(user, room) is None
        assert await s.accounts.registrations(user) == []
        await s.accounts.put_registration(user, room, now, 900)
        assert [r.room_id for r in await s.accounts.registrations(user)] == [room]


async def test_a_write_that_lost_its_compare_and_set_changes_nothing(nats_url):
    # The rollup every write now carries must not weaken compare-and-set.
    async with stores([nats_url]) as s:
        room = new_room_id()
        revision = await s.rooms.write(room, a_room(room, "owner"), 0)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await s.rooms.write(room, a_room(room, "intruder"), 0)
        with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
            await s.rooms.delete(room, revision - 1)
        record, now_at = await s.rooms.get(room)
        assert record is not None and record.owner_user_id == "owner" and now_at == revision


# --- a three-node cluster --------------------------------------------------------------------


async def test_removals_stay_removed_when_every_node_of_a_three_node_cluster_is_sigkilled(cluster):
    removals = Removals()
    async with stores(cluster.urls, replicas=3) as s:
        await removals.make(s)
        await removals.until_markers_are_gone(s)
    crash_and_restart(*cluster.nodes)
    async with stores(cluster.urls, replicas=3) as s:
        await removals.check(s)


async def test_removals_stay_removed_when_one_node_of_a_three_node_cluster_is_sigkilled_and_then_leads(cluster):
    # The restarted node rebuilds its own store; made the leader of every bucket, it is the
    # one that answers listings and counts (and direct gets, to a client connected to it).
    removals = Removals()
    async with stores(cluster.urls, replicas=3) as s:
        await removals.make(s)
        await removals.until_markers_are_gone(s)
    victim, name = cluster.nodes[1], "n1"
    crash_and_restart(victim)
    async with stores([victim.url], replicas=3) as s:
        await lead_everything(s, name)
        await removals.check(s)


async def lead_everything(s: Stores, server_name: str) -> None:
    """Make `server_name` the leader of every bucket's stream."""
    streams = [kv_stream(bucket) for bucket in (ACCOUNTS_BUCKET, REGISTRATIONS_BUCKET, ROOMS_BUCKET)]
    placement = b'{"placement": {"preferred": "%s"}}' % server_name.encode()
    deadline, asked = time.monotonic() + PATIENCE_S, 0.0
    while True:
        elsewhere = []
        for stream in streams:
            try:
                if (await s.js.stream_info(stream)).cluster.leader != server_name:
                    elsewhere.append(stream)
            except nats.errors.TimeoutError:  # the restarted node's JetStream still recovering: ask again
                elsewhere.append(stream)
        if not elsewhere:
            break
        assert time.monotonic() < deadline, f"{server_name} did not become the leader of {elsewhere}"
        if time.monotonic() - asked > 3:  # an election takes a moment; ask again if it went elsewhere
            asked = time.monotonic()
            for stream in elsewhere:
                with contextlib.suppress(nats.errors.Error):
                    await s.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", placement, timeout=2)
        await asyncio.sleep(0.1)
    await until_led(s.js)
