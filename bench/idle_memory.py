"""Edge RSS per idle connection: N paired Macs and iPhones on one `relay-edge` process.

    .venv/bin/python -m bench.idle_memory 1000

A quick probe, run by hand (never in CI); the full load benchmark is its own issue.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile

from runtime.embedded_nats import EmbeddedNatsServer
from tests.harness import EdgeProcess, MacIdentity, connect_ios, connect_mac


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def measure(pairs: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with EmbeddedNatsServer() as nats_server, tempfile.NamedTemporaryFile("w", suffix=".toml") as tiers:
        # One local user owns every room here: lift its tier's room limit.
        tiers.write("[tiers.premium]\nmax_rooms = -1\n")
        tiers.flush()
        async with EdgeProcess(nats_server.url, tiers_file=tiers.name) as edge:
            await asyncio.sleep(0.5)
            before = rss_kib(edge.process.pid)
            clients = []
            for _ in range(pairs):
                mac = MacIdentity.new()
                mac_client, _ = await connect_mac(edge, mac)
                ios_client, _ = await connect_ios(edge, mac)
                await ios_client.expect("peer_joined")
                await mac_client.expect("peer_joined")
                clients += [mac_client, ios_client]
            await asyncio.sleep(2)
            after = rss_kib(edge.process.pid)
            per = (after - before) / (2 * pairs)
            print(f"{pairs} idle pairs: edge RSS {before} -> {after} KiB, {per:.1f} KiB per connection")

if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
