"""Room state in JetStream KV: compare-and-set, no write per frame, idle cleanup."""

from __future__ import annotations

import asyncio
import secrets
import time

import nats
import nats.errors
import pytest

from schemas.subjects import PRESENCE_BUCKET, ROOMS_BUCKET
from tests.harness import Client, MacIdentity, connect_ios, connect_mac, paired, running_edges, sha256_hex, until


async def stream_last_seq(nats_url: str, bucket: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
        return info.state.last_seq
    finally:
        await nc.close()


async def test_no_kv_write_per_relayed_frame(nats_url):
    async with running_edges(nats_url, last_seen_interval_ms=200) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        rooms_before = await stream_last_seq(nats_url, ROOMS_BUCKET)
        presence_before = await stream_last_seq(nats_url, PRESENCE_BUCKET)
        for n in range(500):
            await mac_client.send(type="relay", payload=f"f{n}")
        for _ in range(500):
            await ios_client.expect("relay")
        assert await stream_last_seq(nats_url, ROOMS_BUCKET) == rooms_before
        # lastSeen: at most one write per socket per interval, whatever the frame count.
        # (The presence bucket is shared with leases renewed by the edges of other tests.)
        assert await stream_last_seq(nats_url, PRESENCE_BUCKET) - presence_before < 20


async def test_connected_sockets_last_seen_reaches_kv_while_they_stay_connected(nats_url):
    # Sixty sockets on one edge: the flush writes them in slices spread over half the
    # interval. KV's copy is what /status falls back on when an edge dies.
    async with running_edges(nats_url, count=1, last_seen_interval_ms=400) as (edge,):
        pairs = [await paired(edge, edge) for _ in range(30)]
        await asyncio.sleep(0.5)  # whatever the set-up left to flush
        spoke_at = int(time.time() * 1000)
        for mac_client, ios_client, _ in pairs:
            await mac_client.heartbeat()
            await ios_client.heartbeat()
        rooms = [mac.room_id for _, _, mac in pairs]
        deadline = time.monotonic() + 3
        while True:
            seen = await asyncio.gather(*(edge.ctx.presence.get_room_last_seen(room) for room in rooms))
            if all(mac_seen and ios_seen and min(mac_seen, ios_seen) >= spoke_at for mac_seen, ios_seen in seen):
                break
            assert time.monotonic() < deadline, f"lastSeen not flushed: {seen}"
            await asyncio.sleep(0.05)


async def test_an_unforeseen_error_in_the_last_seen_flush_is_logged_and_the_flush_goes_on(nats_url, monkeypatch, caplog):
    # Upkeep must not end the edge, and with it every socket, over one bad write.
    async with running_edges(nats_url, count=1, last_seen_interval_ms=200) as (edge,):
        mac_client, ios_client, mac = await paired(edge, edge)
        real_spread, failures = edge.upkeep.spread, []

        async def pass_failing_once(*args):
            if not failures:
                failures.append(args)
                raise RuntimeError("a bug")
            return await real_spread(*args)

        monkeypatch.setattr(edge.upkeep, "spread", pass_failing_once)
        spoke_at = int(time.time() * 1000)
        await mac_client.heartbeat()
        await ios_client.heartbeat()
        await until(lambda: failures)
        deadline = time.monotonic() + 5
        while True:
            mac_seen, ios_seen = await edge.ctx.presence.get_room_last_seen(mac.room_id)
            if mac_seen and ios_seen and min(mac_seen, ios_seen) >= spoke_at:
                break
            assert time.monotonic() < deadline, "the flush did not go on"
            await asyncio.sleep(0.05)
        assert (await mac_client.heartbeat())["mac_connected"] is True  # the edge still serves
        assert any("lastSeen flush failed" in r.getMessage() for r in caplog.records)


async def test_a_spread_pass_asks_whether_a_socket_is_due_just_before_its_slice(nats_url):
    # A pass takes its sockets when it begins and works through them for up to minutes:
    # one that stopped being due meanwhile (its room deleted, say) must be left alone.
    async with running_edges(nats_url, count=1) as (edge,):
        for _ in range(3):
            await paired(edge, edge)
        conns = list(edge.connections.values())
        stopped: set[str] = set()
        done = []

        async def work(conn):
            done.append(conn)
            stopped.add(conns[-1].session.socket_id)  # the last one stops being due

        socket_ids = [conn.session.socket_id for conn in conns]
        assert not await edge.upkeep.spread(socket_ids, 0.3, work, lambda c: c.session.socket_id not in stopped)
        assert done == conns[:-1]


async def test_one_sockets_error_in_a_spread_pass_leaves_the_others_done_and_storage_errors_stop_it(nats_url, caplog):
    async with running_edges(nats_url, count=1) as (edge,):
        for _ in range(2):
            await paired(edge, edge)
        socket_ids = list(edge.connections)
        done = []

        async def work_failing_on_the_first(conn):
            if conn.session.socket_id == socket_ids[0]:
                raise RuntimeError("a bug about this socket")
            done.append(conn.session.socket_id)

        def due(conn):
            if conn.session.socket_id == socket_ids[1]:
                raise RuntimeError("a bug in the predicate")
            return True

        assert not await edge.upkeep.spread(socket_ids, 0.0, work_failing_on_the_first, due)
        assert done == socket_ids[2:]  # the others are done; the two failures are logged
        logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("a bug about this socket" in m for m in logged)
        assert any("cannot tell whether it is due" in m for m in logged)

        async def storage_trouble(conn):
            raise nats.errors.TimeoutError

        with pytest.raises(nats.errors.TimeoutError):  # the pass's caller waits storage out
            await edge.upkeep.spread(socket_ids, 0.0, storage_trouble, lambda c: True)


async def test_racing_registers_on_two_edges_leave_exactly_one_mac_in_the_slot(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        await (await connect_mac(a, mac))[0].close()
        clients = [await Client.connect(edge, mac.room_id, "mac") for edge in (a, b, a, b)]
        await asyncio.gather(*(c.send(**mac.register_message()) for c in clients))
        for client in clients:
            await client.expect("room_registered")
        closed = 0
        for client in clients:
            try:
                code, _ = await client.expect_close(timeout=1)
                assert code == 4001
                closed += 1
            except asyncio.TimeoutError:
                pass
        assert closed == 3
        record, _ = await a.ctx.rooms.get(mac.room_id)
        survivors = [c for c in clients if c.ws.state.name == "OPEN"]
        assert len(survivors) == 1 and record.mac is not None


async def test_idle_room_drops_connection_state_and_keeps_its_identity(nats_url):
    async with running_edges(nats_url, room_idle_timeout_ms=1000) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("idle-pairing-token")
        mac_client, _ = await connect_mac(a, mac, pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) + 300)
        await mac_client.close()
        await asyncio.sleep(1.3)
        # The pairing token went with the per-connection state.
        ios_client, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        await ios_client.expect_error("AUTH_FAILED")
        # The identity stayed: another secret cannot claim the room id.
        intruder = await Client.connect(b, mac.room_id, "mac")
        await intruder.send(**{**mac.register_message(), "secret_hash": sha256_hex("other")})
        await intruder.expect_error("AUTH_FAILED")
        # What is stored was cleaned up too, identity kept.
        record, _ = await a.ctx.rooms.get(mac.room_id)
        assert record is not None
        assert (record.pairing_token_hash, record.mac_session_nonce, record.mac_ephemeral_key) == ("", "", "")
        assert (record.secret_hash, record.mac_public_key) == (mac.secret_hash, mac.public_key)
        assert record.mac is None and record.ios is None
        # The owner's secret still registers.
        await connect_mac(a, mac)


def lose_write_acks(edge, count: int = 1) -> None:
    """Fault: the edge's next `count` room writes commit in JetStream, but their answers never arrive."""
    store = edge.ctx.rooms
    real_write = store.write
    left = [count]

    async def write(room_id, record, revision):
        revision = await real_write(room_id, record, revision)
        left[0] -= 1
        if left[0] <= 0:
            store.write = real_write
        raise nats.errors.TimeoutError

    store.write = write


async def test_a_release_whose_answer_was_lost_still_tells_the_peer(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, _ = await paired(a, b)
        lose_write_acks(a)
        await mac_client.close()
        assert await ios_client.expect("peer_disconnected") == {"type": "peer_disconnected", "reason": "client_left"}
        assert (await ios_client.heartbeat())["mac_connected"] is False


async def test_a_join_whose_answer_was_lost_is_retried_and_pairs_once(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        lose_write_acks(b)
        ios_client, join = await connect_ios(b, mac)
        assert (await ios_client.expect("peer_joined"))["public_key"] == mac.public_key
        assert (await mac_client.expect("peer_joined"))["public_key"] == join["public_key"]
        await ios_client.expect_silence()


async def test_a_pairing_join_whose_answer_was_lost_does_not_burn_its_own_token(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac = MacIdentity.new()
        token_hash = sha256_hex("lost-ack-pairing-token")
        mac_client, _ = await connect_mac(a, mac, pairing_token_hash=token_hash, pairing_token_expires_at=int(time.time()) + 300)
        lose_write_acks(b)
        ios_client, _ = await connect_ios(b, mac, secret_hash=None, pairing_token_hash=token_hash)
        await ios_client.expect("peer_joined")  # not "Pairing token already used"
        await mac_client.expect("peer_joined")


async def test_a_register_whose_answer_was_lost_still_tells_both_sides(nats_url):
    async with running_edges(nats_url) as (a, b):
        mac_client, ios_client, mac = await paired(a, b)
        await mac_client.close()
        await ios_client.expect("peer_disconnected")
        lose_write_acks(a)
        mac_again, register = await connect_mac(a, mac)
        await mac_again.expect("peer_joined")  # the retry is a first register, not a rotation
        assert (await ios_client.expect("peer_joined"))["ephemeral_key"] == register["ephemeral_key"]


async def test_a_join_that_cannot_be_confirmed_gets_1011_and_leaves_no_phantom_iphone(nats_url):
    async with running_edges(nats_url, storage_retry_budget_ms=300) as (a, b):
        mac = MacIdentity.new()
        mac_client, _ = await connect_mac(a, mac)
        lose_write_acks(b, count=100)  # every answer lost, past the retry budget
        ios_client, _ = await connect_ios(b, mac)
        assert (await ios_client.expect_close())[0] == 1011  # a transient failure, never AUTH_FAILED
        b.ctx.rooms.write = type(b.ctx.rooms).write.__get__(b.ctx.rooms)  # storage answers again
        # The join did land; the edge releases the slot as the socket goes.
        deadline = time.monotonic() + 5
        while (await a.ctx.rooms.get(mac.room_id))[0].ios is not None:
            assert time.monotonic() < deadline, "the failed join's slot was never released"
            await asyncio.sleep(0.02)
        await mac_client.close()
        # The Mac comes back while the iPhone is still in its backoff: nobody is there.
        mac_again, _ = await connect_mac(a, mac)
        await mac_again.expect_silence()
        await mac_again.send(type="relay", payload="eA==")
        await mac_again.expect_error("NO_PEER")


async def test_a_room_request_whose_storage_call_never_returns_is_closed_1011_within_its_bound(nats_url):
    # Seen once after a NATS node was cut off without a word: a register never answered,
    # its socket waiting for ever. The request is bounded as a whole.
    async with running_edges(nats_url, 1, storage_retry_budget_ms=300, jetstream_timeout_ms=300) as (a,):
        never = asyncio.Event()

        async def hangs(*args, **kwargs):
            await never.wait()

        a.room_requests._with_retries = hangs
        identity = MacIdentity.new()
        mac = await Client.connect(a, identity.room_id, "mac")
        started = time.monotonic()
        await mac.send(**identity.register_message())
        assert (await mac.expect_close(timeout=5))[0] == 1011
        assert time.monotonic() - started < 4  # the bound: 0.3 s + 3 × 0.3 s, and the close


async def test_a_register_whose_socket_closed_while_it_waited_for_storage_leaves_the_slot_to_the_newer_socket(nats_url):
    # After a whole NATS cluster restart: a Mac socket's register waited for storage while
    # the edge closed the socket (1001) and the Mac came back on a new one, which
    # registered. The old request then landed and took the slot: the new socket was
    # closed 4001, replaced by a socket that was gone.
    async with running_edges(nats_url, 2) as (a, b):
        identity = MacIdentity.new()
        first_read, go_on = asyncio.Event(), asyncio.Event()
        transact = a.ctx.rooms.transact

        async def waits_for_storage(room_id, decide, extra=None):
            if not first_read.is_set():
                first_read.set()
                await go_on.wait()
            return await transact(room_id, decide, extra)

        a.ctx.rooms.transact = waits_for_storage
        old = await Client.connect(a, identity.room_id, "mac")
        await old.send(**identity.register_message())
        await asyncio.wait_for(first_read.wait(), 5)
        (old_conn,) = a.connections.values()
        a.ctx.spawn(a.carrier.close(old_conn, 1001, "relay reconnected to NATS"), "close as a reconnect does")
        assert (await old.expect_close())[0] == 1001
        new, _ = await connect_mac(a, identity)
        go_on.set()  # the old socket's request goes on
        await until(lambda: len(a.connections) == 1, timeout=5)
        await new.expect_silence(0.5)  # not replaced
        ios, _ = await connect_ios(b, identity)
        await ios.expect("peer_joined")
        await new.expect("peer_joined")
        record, _ = await a.ctx.rooms.get(identity.room_id)
        (new_conn,) = a.connections.values()
        assert record.mac.socket_id == new_conn.session.socket_id


# --- listings and watchers (edge/kv.py) -------------------------------------------------


async def _scratch_bucket(nc):
    from nats.js.api import KeyValueConfig

    return await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"scratch_{secrets.token_hex(4)}"))


async def test_a_listing_holds_every_present_key_and_no_deleted_or_purged_one(nats_url):
    from runtime.kv import present_values

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        for n in range(300):
            await kv.put(f"k.{n}", b"v%d" % n)
        for n in range(0, 50):
            await kv.delete(f"k.{n}")
        for n in range(50, 70):
            await kv.purge(f"k.{n}")
        expected = {f"k.{n}": b"v%d" % n for n in range(70, 300)}
        for _ in range(10):
            assert await present_values(kv, "k.>") == expected
        assert await present_values(kv, "none.>") == {}
    finally:
        await nc.close()


async def test_a_values_watch_marks_the_start_once_then_follows_changes(nats_url):
    from runtime.kv import ValuesWatch

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        for n in range(5):
            await kv.put(f"k.{n}", b"v")
        await kv.delete("k.4")
        watch = await ValuesWatch.start(kv, "k.>")
        seen: list = []

        async def follow() -> None:
            async for entry in watch:
                seen.append(entry if entry is None else (entry.key, entry.operation))

        following = asyncio.create_task(follow())
        await until(lambda: None in seen)
        assert seen[:5] == [("k.0", None), ("k.1", None), ("k.2", None), ("k.3", None), ("k.4", "DEL")]
        assert seen[5] is None
        await kv.put("k.9", b"later")
        await until(lambda: len(seen) == 7)
        assert seen[6] == ("k.9", None)  # and no second start marker
        await watch.stop()
        await asyncio.wait_for(following, 2)
    finally:
        await nc.close()


async def _entries_until_the_start_marker(watch) -> list:
    entries: list = []
    async with asyncio.timeout(3):
        async for entry in watch:
            entries.append(entry)
            if entry is None:
                return entries
    return entries


async def test_a_values_watch_without_the_watchers_subscription_trusts_nats_pys_start_marker(nats_url, monkeypatch):
    # The fallback for a nats-py release whose watcher has no `_sub`: its own marker is used.
    from runtime.kv import ValuesWatch

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        for n in range(3):
            await kv.put(f"k.{n}", b"v")
        real_watch = kv.watch

        async def watch_without_subscription(*args, **kwargs):
            watcher = await real_watch(*args, **kwargs)
            watcher.subscription, watcher._sub = watcher._sub, None
            return watcher

        monkeypatch.setattr(kv, "watch", watch_without_subscription)
        watch = await ValuesWatch.start(kv, "k.>")
        assert watch.initial is None
        # nats-py's marker, passed on where nats-py puts it: after the three values, or, on
        # a busy machine, before some of them (nats-io/nats.py#842, the bug the counting
        # path exists for); the values all come either way.
        seen: list = []
        async with asyncio.timeout(3):
            async for entry in watch:
                seen.append(entry)
                if None in seen and len([e for e in seen if e is not None]) == 3:
                    break
        assert seen.count(None) == 1, seen
        assert [e.key for e in seen if e is not None] == ["k.0", "k.1", "k.2"]
        watch.watcher._sub = watch.watcher.subscription
        await watch.stop()
    finally:
        await nc.close()


async def test_a_values_watch_whose_counted_values_do_not_all_come_marks_the_start_after_a_grace(nats_url):
    # As when a value counted at the start expires before it is delivered: the watch goes on.
    from runtime.kv import ValuesWatch

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        for n in range(3):
            await kv.put(f"k.{n}", b"v")
        started = await ValuesWatch.start(kv, "k.>")
        watch = ValuesWatch(started.watcher, started.initial + 1, grace_s=0.2)  # one more than will come
        entries = await _entries_until_the_start_marker(watch)
        assert [e.key for e in entries[:-1]] == ["k.0", "k.1", "k.2"] and entries[-1] is None
        await watch.stop()
    finally:
        await nc.close()


async def test_a_lost_compare_and_set_frees_its_callers_at_once_without_waiting_for_the_garbage_collector(nats_url):
    # Thousands of concurrent claims on one user's record lose races all the time: had the
    # error a reference cycle, each loser's frames (its decoded claims) would pile up in RSS.
    import gc
    import weakref

    import nats.js.errors

    from runtime import kv

    class CallerState:
        pass

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        bucket = f"scratch_{secrets.token_hex(4)}"
        await kv.open_bucket(js, kv.durable_bucket(bucket, 1))
        await kv.write(js, bucket, "k", b"v", last=0)

        async def losing_caller() -> weakref.ref:
            held = CallerState()
            try:
                await kv.write(js, bucket, "k", b"w", last=0)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            return weakref.ref(held)

        gc.collect()
        gc.disable()
        try:
            refs = [await losing_caller() for _ in range(5)]
            assert [ref() for ref in refs] == [None] * 5
        finally:
            gc.enable()
    finally:
        await nc.close()


async def _answer(get, kv, key):
    """What a get says of `key`: the entry's fields, or the error with what it carries."""
    try:
        entry = await get(kv, key)
    except Exception as exc:  # compared as they are: type, entry, operation
        entry = getattr(exc, "entry", None)
        return type(exc), getattr(exc, "op", None), entry and (entry.key, entry.value, entry.revision, entry.operation)
    return "entry", entry.bucket, entry.key, entry.value, entry.revision, entry.operation, entry.delta, entry.created


async def test_get_entry_answers_as_nats_pys_get_does_for_values_absent_deleted_purged_removed_and_expired_keys(nats_url):
    from nats.js.api import KeyValueConfig

    from runtime import kv as kvs
    from runtime.kv import get_entry, get_entry_is_fast

    async def nats_py_get(kv, key):
        return await kv.get(key)

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        assert get_entry_is_fast(kv), "nats-py changed: get_entry falls back to its slow get"
        await kv.put("value", b'{"a":1}')
        await kv.put("empty", b"")
        await kv.put("deleted", b"x")
        await kv.delete("deleted")
        await kv.put("purged", b"x")
        await kv.purge("purged")
        bucket = f"t{secrets.token_hex(4)}"
        marked = await nc.jetstream().create_key_value(KeyValueConfig(bucket=bucket, history=2, limit_marker_ttl=1))
        await kvs.write(nc.jetstream(), bucket, "removed", b"x")
        await kvs.remove(nc.jetstream(), bucket, "removed")
        await kvs.put_with_ttl(nc.jetstream(), bucket, "expires", b"x", 1)
        await asyncio.sleep(1.5)  # NATS's shortest message TTL is a second
        for bucket_kv, key in [(kv, k) for k in ("value", "empty", "deleted", "purged", "never")] + [
            (marked, k) for k in ("removed", "expires", "never")
        ]:
            assert await _answer(get_entry, bucket_kv, key) == await _answer(nats_py_get, bucket_kv, key), key
        assert (await get_entry(kv, "value")).value == b'{"a":1}'
    finally:
        await nc.close()


async def test_get_entry_raises_what_nats_py_raises_when_jetstream_does_not_answer(nats_url):
    from runtime.kv import get_entry

    nc = await nats.connect(nats_url)
    try:
        kv = await _scratch_bucket(nc)
        kv._js._prefix = "$JS.nobody.API"  # no server answers there: as with JetStream away
        with pytest.raises(nats.js.errors.ServiceUnavailableError):
            await get_entry(kv, "k")
        with pytest.raises(nats.js.errors.ServiceUnavailableError):
            await kv.get("k")
    finally:
        await nc.close()
