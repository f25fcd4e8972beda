"""How fast one metering process applies usage batches and answers quota checks.

    .venv/bin/python -m bench.metering_throughput [--users 1000] [--batches 20] [--checks 4000] [--sync-always]

Starts its own nats-server (free port, temporary folder), creates `--users` accounts,
publishes `--batches` rounds that each charge every user (a batch per usage partition,
as an edge's flush), then runs one metering process (in this process) and times how
long it takes to apply them all ("ledger updates": a user's usage in one batch; with
batches taken in groups, several are one ledger write); then times
`--checks` quota checks sent at once (a reconnect storm asks one per socket). Prints
JSON. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import msgspec
import nats

from accounts.store import AccountStore
from metering.service import Metering, MeteringSettings
from metering.stream import open_usage_stream
from metering.windows import period_of
from runtime.embedded_nats import EmbeddedNatsServer
from schemas.metering import QuotaCheck, UsageBatch, UsageEntry
from schemas.records import User
from runtime.metrics import total
from schemas.subjects import QUOTA_CHECK_SUBJECT, USAGE_STREAM, usage_events_subject, usage_partition


async def measure(users: int, batches: int, checks: int, sync_always: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data, EmbeddedNatsServer(store_dir=data, sync_always=sync_always) as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream(timeout=10)
        store = await AccountStore.open(js)
        now = int(time.time() * 1000)
        user_ids = [f"bench{i}" for i in range(users)]
        await asyncio.gather(*(store.create_user(User(user_id=u, email=f"{u}@x", tier="pro", created_at=now)) for u in user_ids))
        await open_usage_stream(js, 1)
        period = period_of(now)
        by_partition: dict[int, list[str]] = {}
        for u in user_ids:
            by_partition.setdefault(usage_partition(u), []).append(u)
        seq = 0
        for _ in range(batches):  # each round charges every user, a batch per partition, as an edge's flush
            for partition, users_of in sorted(by_partition.items()):
                seq += 1
                batch = UsageBatch(
                    edge_id="bench", boot_id="b", seq=seq, at_ms=now, entries=[UsageEntry(u, period, 3, 1) for u in users_of],
                    partition=partition,
                )
                subject = usage_events_subject("bench", partition)
                await js.publish(subject, msgspec.json.encode(batch), headers={"Nats-Msg-Id": batch.msg_id})
        published = seq

        metering = Metering(MeteringSettings(nats_url=server.url))
        task = asyncio.create_task(metering.run())
        started = time.perf_counter()
        await metering.ready.wait()
        while metering.batches_applied < published:
            await asyncio.sleep(0.01)
        applied_s = time.perf_counter() - started
        for _ in range(100):  # the last acknowledgements may still be on their way
            if (await js.stream_info(USAGE_STREAM)).state.messages == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("batches were left in the usage stream")

        payloads = [msgspec.json.encode(QuotaCheck(user_id=user_ids[i % users])) for i in range(checks)]
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(nc.request(QUOTA_CHECK_SUBJECT, p, timeout=30) for p in payloads), return_exceptions=True
        )
        checks_s = time.perf_counter() - started
        failed = sum(isinstance(a, Exception) for a in answers)
        metering.stop()
        await task
        await nc.close()
    return {
        "users": users,
        "batches": batches,
        "apply_s": round(applied_s, 3),
        "batches_per_s": round(published / applied_s, 1),
        "ledger_updates_per_s": round(batches * users / applied_s),
        "ledger_writes": int(total(metering.metrics.ledger_updates)),
        "ms_per_batch": round(applied_s / published * 1000, 2),
        "quota_checks": checks,
        "quota_checks_s": round(checks_s, 3),
        "quota_checks_per_s": round(checks / checks_s),
        "quota_checks_failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--checks", type=int, default=4000)
    parser.add_argument("--sync-always", action="store_true", help="nats-server fsyncs every write (deploy/nats.conf)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.users, args.batches, args.checks, args.sync_always)), indent=2))


if __name__ == "__main__":
    main()
