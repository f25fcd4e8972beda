"""CPU per KV get in this process: nats-py's `KeyValue.get` against `runtime.kv.get_entry`.

    .venv/bin/python -m bench.kv_get

A value written as the edge writes one (a subject rollup, so the stored message has
headers), read 4,000 times by each, 200 at once, alternating twice; a nats-server of its
own. Prints the CPU microseconds of this process per get: compare the two within a run.
Runs by hand; never part of CI.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.js.api import KeyValueConfig

from runtime import kv as kvs
from runtime.embedded_nats import EmbeddedNatsServer
from runtime.kv import get_entry

ROUNDS, AT_ONCE = 20, 200


async def measure(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    bucket = await js.create_key_value(KeyValueConfig(bucket="bench_get", history=2))
    await kvs.write(js, "bench_get", "room", b'{"room_id":"r","secret_hash":"' + b"a" * 64 + b'"}')
    gets = {"nats-py KeyValue.get": lambda: bucket.get("room"), "runtime.kv.get_entry": lambda: get_entry(bucket, "room")}
    for name, get in [*gets.items()] * 2:
        cpu = time.process_time()
        for _ in range(ROUNDS):
            await asyncio.gather(*(get() for _ in range(AT_ONCE)))
        print(f"{name}: {(time.process_time() - cpu) / (ROUNDS * AT_ONCE) * 1e6:.0f} µs CPU per get")
    await nc.close()


def main() -> None:
    with EmbeddedNatsServer() as server:
        asyncio.run(measure(server.url))


if __name__ == "__main__":
    main()
