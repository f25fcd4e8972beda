"""Usage is durable (issue 17): on a three-node cluster that fsyncs every write (as
deploy/nats.conf does), usage batches are published while every node is SIGKILLed at
once; after the restart, every credit whose publish was acknowledged is counted. Real
nats-servers killed by PID, a real metering service. A SIGKILL keeps the page cache: this
proves the acknowledgement and replay path, not the fsync (no test here can cut power)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import nats
import nats.errors

from metering.service import Metering, MeteringSettings
from metering.stream import open_usage_stream
from metering.usage import UsageReader, open_usage_bucket
from metering.windows import period_of
from runtime.clock import now_ms
from runtime.embedded_nats import EmbeddedNatsCluster
from schemas.metering import UsageBatch, UsageEntry
from schemas.subjects import usage_events_subject, usage_partition
from tests.harness import make_account, until


async def _once_jetstream_answers(attempt):
    """`attempt()` once a cluster just started has elected its JetStream leaders."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await attempt()
        except (nats.errors.Error, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_every_acknowledged_credit_is_counted_after_every_node_is_killed_at_once():
    with EmbeddedNatsCluster(size=3, sync_always=True) as cluster:
        account = await _once_jetstream_answers(lambda: make_account(cluster.urls[0]))
        period = period_of(now_ms())
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream(timeout=2)
            await _once_jetstream_answers(lambda: open_usage_stream(js, 3))
            acknowledged = 0

            async def publish_usage() -> None:
                nonlocal acknowledged
                for seq in range(1, 100_000):
                    partition = usage_partition(account.user_id)
                    batch = UsageBatch(
                        edge_id="e1", boot_id="b1", seq=seq, at_ms=now_ms(), entries=[UsageEntry(account.user_id, period, 3, 0)],
                        partition=partition,
                    )
                    try:
                        subject = usage_events_subject("e1", partition)
                        await js.publish(subject, msgspec.json.encode(batch), headers={"Nats-Msg-Id": batch.msg_id})
                    except (nats.errors.Error, asyncio.TimeoutError):
                        return  # the cluster is gone: what was acknowledged is what counts
                    acknowledged += 3

            publishing = asyncio.create_task(publish_usage())
            await until(lambda: acknowledged >= 300, timeout=20)
            for node in cluster.nodes:  # all at once, as a power loss of every node would
                node.kill()
            await asyncio.wait_for(publishing, 10)
            for node in cluster.nodes:
                node.start()
            metering = Metering(MeteringSettings(nats_url=cluster.url, kv_replicas=3))
            running = asyncio.create_task(metering.run())
            try:
                reader = None
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                        reader = reader or UsageReader(await open_usage_bucket(js, 3))
                        windows = (await reader.ledger(account.user_id)).windows
                        counted = sum(w.message_tokens for w in windows)
                        if counted >= acknowledged:
                            break
                    assert not running.done(), running.exception()
                    await asyncio.sleep(0.3)
                # Every acknowledged credit, and at most the one batch in flight besides.
                assert acknowledged <= counted <= acknowledged + 3, (acknowledged, counted)
            finally:
                metering.stop()
                await asyncio.gather(running, return_exceptions=True)
        finally:
            await nc.close()
