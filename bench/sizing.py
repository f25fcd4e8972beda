"""What 1,000 connected TermOnMac pairs cost: the numbers behind the README's Sizing section.

    .venv/bin/python -m bench.sizing [--pairs 1000] [--idle-macs-per-pair 1] [--duration 30]
    .venv/bin/python -m bench.sizing --kv-capacity   # writes/s one KV bucket takes, 1 node and R3

Starts a nats-server of its own (with its monitoring port), relay-metering and one edge
(auth required, as in production), then the load generator in `realistic` mode
(protocol.md §5, §9: the Mac's heartbeat every 1 s while paired and 30 s otherwise, the
iPhone's every 3 s, three keystrokes a second answered by batches, output bursts) with
`--pairs` active pairs and `--idle-macs-per-pair` Macs with no iPhone beside each. While
every socket is connected it samples, every second: nats-server's /varz (core NATS
messages in and out) and /jsz (JetStream API requests; each bucket's and stream's
sequence, i.e. its writes), and the CPU and RSS of the edge, nats-server and metering.
Prints JSON: rates per second over the steady window, scaled to 1,000 active pairs.
Everything it starts, it stops (by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.run import TIERS_TOML, Children, _wait_http_ok, _wait_log_line
from runtime.embedded_nats import EmbeddedNatsServer, free_port
from runtime.service import raise_open_files_limit

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return json.loads(answer.read())


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _edge_connections(port: int) -> int:
    """Sockets open on the edge (its gauge is by role: summed)."""
    total = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("relay_connections{") or line.startswith("relay_connections "):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _sample(monitor: int, pids: dict[str, int]) -> dict[str, Any]:
    varz = _get_json(monitor, "/varz")
    jsz = _get_json(monitor, "/jsz?streams=true")
    sequences: dict[str, int] = {}
    for account in jsz.get("account_details", []):
        for stream in account.get("stream_detail", []):
            sequences[stream["name"]] = stream["state"]["last_seq"]
    return {
        "t": time.monotonic(),
        "in_msgs": varz["in_msgs"],
        "out_msgs": varz["out_msgs"],
        "js_api": jsz.get("api", {}).get("total", 0),
        "sequences": sequences,
        "cpu": {name: _cpu_s(pid) for name, pid in pids.items()},
        "rss": {name: _rss_bytes(pid) for name, pid in pids.items()},
    }


def _rates(first: dict[str, Any], last: dict[str, Any], per: float) -> dict[str, Any]:
    """Rates per second over [first, last], times `per` (scaling to 1,000 pairs)."""
    span = last["t"] - first["t"]

    def rate(a: float, b: float) -> float:
        return round((b - a) / span * per, 1)

    writes = {
        name: rate(first["sequences"].get(name, 0), seq)
        for name, seq in sorted(last["sequences"].items())
        if seq != first["sequences"].get(name, 0)
    }
    return {
        "window_s": round(span, 1),
        "core_nats_msgs_in_per_s": rate(first["in_msgs"], last["in_msgs"]),
        "core_nats_msgs_out_per_s": rate(first["out_msgs"], last["out_msgs"]),
        "jetstream_api_requests_per_s": rate(first["js_api"], last["js_api"]),
        "stream_writes_per_s": writes,  # KV_<bucket>: that bucket's writes; relay_usage_events: usage batches
        "cpu_cores": {name: round((last["cpu"][name] - first["cpu"][name]) / span * per, 3) for name in last["cpu"]},
    }


def measure(pairs: int, idle_macs_per_pair: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    raise_open_files_limit(logging.getLogger("bench.sizing"))
    workdir = Path(tempfile.mkdtemp(prefix="termrelay-sizing-"))
    monitor = free_port()
    children = Children()
    with EmbeddedNatsServer(store_dir=workdir / "nats", extra_args=["-m", str(monitor)]) as server:
        try:
            tiers = workdir / "tiers.toml"
            tiers.write_text(TIERS_TOML)
            from tests.harness import make_account

            account = asyncio.run(make_account(server.url, tier="bench"))
            metering_log = workdir / "metering.log"
            metering = children.start(
                "metering", [sys.executable, "-m", "metering.cli", "--nats-url", server.url, "--tiers-file", str(tiers)], metering_log, None
            )
            _wait_log_line(metering_log, "metering ready", metering, "metering")
            edge_port, metrics_port = free_port(), free_port()
            edge_log = workdir / "edge.log"
            edge = children.start(
                "edge",
                [
                    sys.executable, "-m", "edge.cli", "--nats-url", server.url, "--port", str(edge_port),
                    "--edge-id", "sizing-edge", "--metrics-port", str(metrics_port), "--auth", "required",
                    "--tiers-file", str(tiers), "--socket-rate-limit-per-s", "0",
                    "--address-socket-limit", "0", "--address-upgrades-per-s", "0",
                ],
                edge_log,
                None,
            )  # fmt: skip
            _wait_http_ok(edge_port, "/readyz", edge, "the edge", edge_log)
            pids = {"edge": edge.pid, "nats_server": server.process.pid, "metering": metering.pid}
            before = _sample(monitor, pids)  # RSS with no socket
            sockets = pairs * (2 + idle_macs_per_pair)
            load_log = workdir / "loadgen.log"
            with open(load_log, "w") as log:
                load = subprocess.Popen(
                    [
                        sys.executable, "-W", "ignore", "-m", "bench.loadgen", "--url", f"ws://127.0.0.1:{edge_port}",
                        "--pairs", str(pairs), "--mode", "realistic", "--idle-macs-per-pair", str(idle_macs_per_pair),
                        "--duration", str(duration_s), "--warmup", str(warmup_s), "--api-key", account.api_key,
                        "--json", str(workdir / "loadgen.json"),
                    ],
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            steady: list[dict[str, Any]] = []
            try:
                while load.poll() is None:
                    time.sleep(1.0)
                    try:
                        if _edge_connections(metrics_port) >= sockets:
                            steady.append(_sample(monitor, pids))
                        elif steady:
                            break  # the load generator is closing its sockets
                    except OSError:  # a scrape that timed out on a busy machine: the next one counts
                        continue
            finally:
                if load.poll() is None:
                    load.wait(timeout=duration_s + warmup_s + 120)
            if len(steady) < 5:
                raise RuntimeError(f"fewer than 5 s with all {sockets} sockets connected; see {load_log}")
            first, last = steady[1], steady[-1]  # the first second may still see set-up
            report = json.loads((workdir / "loadgen.json").read_text()) if (workdir / "loadgen.json").exists() else {}
            per_1000 = 1000 / pairs
            result = {
                "pairs": pairs,
                "idle_macs_per_pair": idle_macs_per_pair,
                "sockets": sockets,
                "per_1000_pairs": _rates(first, last, per_1000),
                "edge_rss_per_socket_kib": round((last["rss"]["edge"] - before["rss"]["edge"]) / sockets / 1024, 1),
                "loadgen": {k: report.get(k) for k in ("p50_ms", "p99_ms", "frames_per_s", "failed_pairs") if k in report},
            }
            return result
        finally:
            children.stop_all()


async def kv_write_capacity(seconds: float, writers: int, replicas: int) -> dict[str, Any]:
    """Writes/s one KV bucket takes (puts of 200 bytes from `writers` at once, as edges
    write lastSeen and room records), on a three-node cluster at `replicas` (1: one node)."""
    import nats

    from runtime.embedded_nats import EmbeddedNatsCluster
    from nats.js.api import KeyValueConfig

    cluster = EmbeddedNatsCluster(size=3) if replicas > 1 else None
    single = None if cluster else EmbeddedNatsServer(store_dir=Path(tempfile.mkdtemp(prefix="termrelay-kv-")))
    with cluster or single:  # type: ignore[union-attr]
        urls = cluster.urls if cluster else [single.url]  # type: ignore[union-attr]
        nc = await nats.connect(servers=urls)
        try:
            js = nc.jetstream(timeout=10)
            for attempt in range(100):
                try:
                    kv = await js.create_key_value(KeyValueConfig(bucket="capacity", history=1, replicas=replicas))
                    break
                except Exception:
                    if attempt == 99:
                        raise
                    await asyncio.sleep(0.2)
            value = b"x" * 200
            done = 0
            stop_at = time.monotonic() + seconds

            async def writer(n: int) -> None:
                nonlocal done
                key = 0
                while time.monotonic() < stop_at:
                    key += 1
                    await kv.put(f"w{n}.k{key % 1000}", value)
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(writer(n) for n in range(writers)))
            return {"replicas": replicas, "writers": writers, "kv_writes_per_s": round(done / (time.monotonic() - started))}
        finally:
            await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--idle-macs-per-pair", type=int, default=1)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--kv-capacity", action="store_true", help="instead: how many writes/s one KV bucket takes (one node, and three at R3)"
    )
    args = parser.parse_args()
    if args.kv_capacity:
        for replicas in (1, 3):
            print(json.dumps(asyncio.run(kv_write_capacity(10.0, 128, replicas))), flush=True)
        return
    print(json.dumps(measure(args.pairs, args.idle_macs_per_pair, args.duration, args.warmup), indent=2))


if __name__ == "__main__":
    main()
