"""One edge id, one running process (issue 16 item 11).

A second edge started with the id of a running one refuses to start (one line, exit 1);
an edge restarted after a crash takes its old lease over at once; an incarnation that holds
the lease without answering is waited for until its lease goes; an edge whose id was taken
by a newer process while it could not renew stops instead of taking the id back.

The "other incarnation" of some tests is a plain NATS client doing what an edge does for its
lease (the lease in KV, the incarnation subject): a real server, nothing mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator

import nats
import pytest

from edge.server import CannotServe, Edge
from edge.settings import EdgeSettings
from edge.store import Presence, open_buckets
from runtime.clock import now_ms
from schemas.records import EdgeLease
from schemas.subjects import edge_incarnation_subject
from tests.harness import TEST_USER, EdgeProcess, MacIdentity, connect_ios, connect_mac, paired, running_edges


def error_line(process: EdgeProcess) -> str:
    """The one line `relay-edge` ends with when it cannot start."""
    lines = [line for line in process.log_text().splitlines() if line.startswith("relay-edge: error:")]
    assert len(lines) == 1, process.log_text()[-2000:]
    return lines[0]


@contextlib.asynccontextmanager
async def other_incarnation(
    nats_url: str, edge_id: str, answer: bytes | None, ttl_s: float, renew_every_s: float | None = None
) -> AsyncIterator[str]:
    """An incarnation of `edge_id` in another "process": its lease (TTL `ttl_s`, renewed every
    `renew_every_s` if given) and its incarnation subject, answered with `answer` (None: the
    subscription is there and never answers, as a stalled process's). Yields its boot id."""
    boot_id = secrets.token_hex(8)
    nc = await nats.connect(nats_url)
    renewing: asyncio.Task[None] | None = None
    try:
        js = nc.jetstream()
        _, presence_kv = await open_buckets(js, 1)
        presence = Presence(js, presence_kv, nc)

        async def respond(msg) -> None:
            if answer is not None:
                await msg.respond(answer)

        await nc.subscribe(edge_incarnation_subject(edge_id, boot_id), cb=respond)
        await nc.flush()
        lease = EdgeLease(edge_id=edge_id, boot_id=boot_id, started_at=now_ms())
        revision = await presence.put_lease(lease, ttl_s)

        async def renew() -> None:
            nonlocal revision
            while True:
                await asyncio.sleep(renew_every_s)
                revision = await presence.renew_lease(lease, ttl_s, revision)

        if renew_every_s is not None:
            renewing = asyncio.create_task(renew())
        yield boot_id
    finally:
        if renewing is not None:
            renewing.cancel()
        await nc.close()


async def lease_holder(nats_url: str, edge_id: str) -> str | None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        _, presence_kv = await open_buckets(js, 1)
        lease, _ = await Presence(js, presence_kv, nc).read_lease(edge_id)
        return lease.boot_id if lease is not None else None
    finally:
        await nc.close()


async def test_a_second_edge_with_the_id_of_a_running_edge_refuses_to_start_and_the_first_keeps_its_sockets(nats_url):
    async with EdgeProcess(nats_url, edge_lease_ttl_ms=1500) as first:
        async with running_edges(nats_url, count=1) as (other,):
            mac, ios, _ = await paired(first, other)
            first_boot = await lease_holder(nats_url, first.edge_id)
            second = EdgeProcess(nats_url, edge_id=first.edge_id, edge_lease_ttl_ms=1500)
            try:
                with pytest.raises(RuntimeError, match="exited with 1"):
                    await second.start(timeout=10)
            finally:
                await second.stop(signal.SIGKILL)
            assert error_line(second) == (
                f"relay-edge: error: edge id {first.edge_id} is in use by a running edge (its incarnation "
                f"{first_boot} holds the lease and answers); give this edge its own --edge-id / "
                "RELAY_EDGE_ID, or stop the other first"
            )
            # The first edge never noticed: its pair relays on, past two of its lease's lifetimes.
            deadline = time.monotonic() + 3.5
            n = 0
            while time.monotonic() < deadline:
                await mac.send(type="relay", payload=f"p{n}")
                assert (await ios.expect("relay"))["payload"] == f"p{n}"
                await ios.send(type="relay", payload=f"q{n}")
                assert (await mac.expect("relay"))["payload"] == f"q{n}"
                n += 1
                await asyncio.sleep(0.1)
            assert "lost its lease" not in first.log_text()


async def test_an_edge_restarted_at_once_after_a_crash_takes_its_old_lease_over_without_waiting(nats_url):
    async with running_edges(nats_url, count=1) as (other,):
        async with EdgeProcess(nats_url) as crashed:  # a lease of 15 s, the default
            mac_identity = MacIdentity.new()
            mac, _ = await connect_mac(crashed, mac_identity)
            ios, _ = await connect_ios(other, mac_identity)
            await ios.expect("peer_joined")
            await mac.expect("peer_joined")
            old_boot = await lease_holder(nats_url, crashed.edge_id)
            await crashed.stop(signal.SIGKILL)
        started = time.monotonic()
        async with EdgeProcess(nats_url, edge_id=crashed.edge_id) as restarted:
            assert time.monotonic() - started < 8  # not the old lease's 15 s
            assert f"its incarnation {old_boot} holds the lease but is gone from NATS (crashed?); taking the lease over" in restarted.log_text()
            # Other edges see the old incarnation's lease replaced: its peers are told now.
            assert await ios.expect("peer_disconnected", timeout=5) == {"type": "peer_disconnected", "reason": "timeout"}
            mac_again, _ = await connect_mac(restarted, mac_identity)
            await mac_again.expect("peer_joined")
            await ios.expect("peer_joined")


async def test_an_edge_id_held_by_an_incarnation_that_does_not_answer_is_waited_for_until_its_lease_expires(nats_url):
    edge_id = f"silent-{secrets.token_hex(3)}"
    async with other_incarnation(nats_url, edge_id, answer=None, ttl_s=3):
        started = time.monotonic()
        async with EdgeProcess(nats_url, edge_id=edge_id, edge_lease_ttl_ms=3000) as edge:
            waited = time.monotonic() - started
            assert 2 <= waited < 10, waited
            assert "holds the lease and does not answer; waiting for the lease to go (up to 3s)" in edge.log_text()


async def test_an_edge_id_held_by_a_silent_incarnation_that_renews_its_lease_is_refused(nats_url):
    edge_id = f"renewing-{secrets.token_hex(3)}"
    async with other_incarnation(nats_url, edge_id, answer=None, ttl_s=2, renew_every_s=0.5) as boot_id:
        edge = EdgeProcess(nats_url, edge_id=edge_id, edge_lease_ttl_ms=2000)
        try:
            with pytest.raises(RuntimeError, match="exited with 1"):
                await edge.start(timeout=15)
        finally:
            await edge.stop(signal.SIGKILL)
        assert f"edge id {edge_id} is in use by a running edge (its incarnation {boot_id} holds" in error_line(edge)
        assert await lease_holder(nats_url, edge_id) == boot_id


async def test_an_edge_whose_id_was_taken_while_it_could_not_renew_stops_instead_of_taking_it_back(nats_url):
    edge = Edge(EdgeSettings(nats_url=nats_url, port=0, edge_id=f"taken-{secrets.token_hex(3)}", auth="none", local_user_id=TEST_USER.get(), edge_lease_ttl_ms=1500))
    run = asyncio.create_task(edge.run())
    try:
        await asyncio.wait_for(edge.ready.wait(), 15)
        async with running_edges(nats_url, count=1) as (other,):
            mac, ios, _ = await paired(edge, other)
            # A newer process took the id (as one does from an edge cut off from NATS for
            # longer than its lease): the edge's next renewal finds it.
            async with other_incarnation(nats_url, edge.settings.edge_id, answer=b"running", ttl_s=10) as newer:
                with pytest.raises(BaseExceptionGroup) as ended:
                    await asyncio.wait_for(run, 10)
                assert ended.group_contains(CannotServe, match=f"edge id {edge.settings.edge_id} was taken by another running edge")
                assert (await mac.expect_close())[0] == 1001
                assert await ios.expect("peer_disconnected") == {"type": "peer_disconnected", "reason": "timeout"}
                assert await lease_holder(nats_url, edge.settings.edge_id) == newer  # neither taken back nor dropped
    finally:
        edge.stop()
        with contextlib.suppress(BaseException):
            await run
