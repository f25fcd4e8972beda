"""Ledger updates per second with 1, 2, 4 … metering processes on a three-node NATS cluster.

    .venv/bin/python -m bench.metering_scaling [--processes 1,2,4] [--edges 4] [--users 4000] [--flushes 200]

For each count of processes: starts a three-node JetStream cluster of its own (free
ports, temporary folders; the usage stream and buckets at R3), creates `--users`
accounts spread over `--edges` edges, publishes `--flushes` flushes of every edge as an
edge does (a batch per usage partition holding that edge's users of it), then starts the
metering processes (`relay-metering`, each its own OS process) and reads their /metrics
every 0.25 s. The rate counts from the moment every process holds its share of the
partitions until the backlog is applied: "ledger updates" are users' usage in one batch
applied (what one ledger write was before groups), "ledger writes" the compare-and-sets.
Prints JSON, one object per count. Everything it starts, it stops (by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import msgspec
import nats
import nats.errors
from prometheus_client.parser import text_string_to_metric_families

from accounts.store import AccountStore
from metering.stream import open_usage_stream
from metering.windows import period_of
from runtime.embedded_nats import EmbeddedNatsCluster
from schemas.metering import UsageBatch, UsageEntry
from schemas.records import User
from schemas.subjects import USAGE_PARTITIONS, USAGE_STREAM, usage_events_subject, usage_partition


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        body = answer.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in (
                "relay_metering_user_batches_applied_total",
                "relay_metering_ledger_updates_total",
                "relay_metering_partitions_owned",
                "process_cpu_seconds_total",
            ):
                found[sample.name] = sample.value
    return found


async def _fill(urls: list[str], edges: int, users: int, flushes: int) -> int:
    """Accounts, and the usage stream full of what `edges` edges flushed; returns the entries."""
    nc = await nats.connect(servers=urls)
    try:
        js = nc.jetstream(timeout=20)
        for attempt in range(100):  # the cluster elects its JetStream leader first
            try:
                store = await AccountStore.open(js, replicas=3)
                break
            except (nats.errors.Error, asyncio.TimeoutError):
                if attempt == 99:
                    raise
                await asyncio.sleep(0.2)
        now = int(time.time() * 1000)
        user_ids = [f"bench{i}" for i in range(users)]
        for start in range(0, users, 500):
            await asyncio.gather(
                *(store.create_user(User(user_id=u, email=f"{u}@x", tier="pro", created_at=now)) for u in user_ids[start : start + 500])
            )
        await open_usage_stream(js, 3)
        period = period_of(now)
        per_edge: list[dict[int, list[str]]] = [{} for _ in range(edges)]
        for n, user_id in enumerate(user_ids):
            per_edge[n % edges].setdefault(usage_partition(user_id), []).append(user_id)
        entries = 0
        for flush in range(flushes):
            acks = []
            for edge, partitions in enumerate(per_edge):
                for partition, users_of in partitions.items():
                    batch = UsageBatch(
                        edge_id=f"edge{edge}", boot_id="b", seq=flush * USAGE_PARTITIONS + partition + 1, at_ms=now,
                        entries=[UsageEntry(u, period, 3, 1) for u in users_of], partition=partition,
                    )  # fmt: skip
                    acks.append(
                        js.publish(
                            usage_events_subject(batch.edge_id, partition),
                            msgspec.json.encode(batch),
                            headers={"Nats-Msg-Id": batch.msg_id},
                        )
                    )
                    entries += len(users_of)
            await asyncio.gather(*acks)
        return entries
    finally:
        await nc.close()


async def _stream_messages(urls: list[str]) -> int:
    nc = await nats.connect(servers=urls)
    try:
        return (await nc.jetstream(timeout=10).stream_info(USAGE_STREAM)).state.messages
    finally:
        await nc.close()


async def measure(processes: int, edges: int, users: int, flushes: int) -> dict[str, float]:
    with EmbeddedNatsCluster(size=3) as cluster:
        entries = await _fill(cluster.urls, edges, users, flushes)
        ports = [_free_port() for _ in range(processes)]
        env = {
            **os.environ, "RELAY_KV_REPLICAS": "3", "RELAY_NATS_URL": cluster.url, "RELAY_LOG_LEVEL": "warning",
            "RELAY_PARTITION_LEASE_MS": "3000",  # shared out within a few seconds of the start
        }  # fmt: skip
        children = []
        with tempfile.TemporaryDirectory() as logs:
            try:
                for n, port in enumerate(ports):
                    log = open(os.path.join(logs, f"m{n}.log"), "w")
                    children.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "metering.cli", "--metrics-port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                        )  # fmt: skip
                    )
                return await _watch(cluster.urls, children, ports, entries, processes)
            finally:
                for child in children:
                    child.terminate()
                for child in children:
                    try:
                        child.wait(20)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()


async def _watch(urls: list[str], children: list[subprocess.Popen], ports: list[int], entries: int, processes: int) -> dict[str, float]:
    share = -(-USAGE_PARTITIONS // processes)
    settled: tuple[float, float, float, float] | None = None  # (time, applied, writes, cpu)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"a metering process exited with {child.returncode}")
        try:
            scrapes = [_scrape(port) for port in ports]
        except OSError:
            continue  # not serving yet
        now = time.monotonic()
        applied = sum(s.get("relay_metering_user_batches_applied_total", 0) for s in scrapes)
        writes = sum(s.get("relay_metering_ledger_updates_total", 0) for s in scrapes)
        cpu = sum(s.get("process_cpu_seconds_total", 0) for s in scrapes)
        owned = [s.get("relay_metering_partitions_owned", 0) for s in scrapes]
        if os.environ.get("BENCH_DEBUG"):
            print(round(now, 2), owned, applied, writes, file=sys.stderr)
        if settled is None and sum(owned) == USAGE_PARTITIONS and max(owned) <= share:
            settled = (now, applied, writes, cpu)
        if applied >= entries:
            if settled is None or applied - settled[1] < entries / 4:
                raise RuntimeError("the backlog was applied before the partitions were shared out: raise --flushes")
            elapsed = now - settled[0]
            return {
                "processes": processes,
                "entries": entries,
                "measured_entries": int(applied - settled[1]),
                "ledger_updates_per_s": round((applied - settled[1]) / elapsed),
                "ledger_writes_per_s": round((writes - settled[2]) / elapsed),
                "metering_cpu_cores": round((cpu - settled[3]) / elapsed, 2),
                "backlog_left": await _stream_messages(urls),
            }
    raise RuntimeError("the backlog was not applied within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4", help="counts of metering processes, comma-separated")
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--flushes", type=int, default=200, help="flushes of every edge in the backlog")
    args = parser.parse_args()
    for count in (int(c) for c in args.processes.split(",")):
        result = asyncio.run(measure(count, args.edges, args.users, args.flushes))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
