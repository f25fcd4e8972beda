"""`make run` (relay-local): nats-server, an edge and metering in one command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

from runtime.embedded_nats import free_port
from tests.harness import paired, http_get


async def test_make_run_serves_the_relay_and_meters_its_usage(tmp_path):
    port = free_port()
    env = {**os.environ, "RELAY_PORT": str(port), "RELAY_LOCAL_DATA": str(tmp_path), "RELAY_USAGE_FLUSH_INTERVAL_MS": "50"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.local", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        banner = ""
        while "Ctrl-C" not in banner:
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert line, "relay-local exited before it printed its banner"
            banner += line.decode()
        assert f"RELAY_SERVER_URL=ws://127.0.0.1:{port}" in banner
        assert re.search(r"Metering runs here too", banner)
        edge = SimpleNamespace(port=port)
        mac, ios, _ = await paired(edge, edge)
        for _ in range(12):
            await mac.send(type="relay", payload="p")
        for _ in range(12):
            await ios.expect("relay")
        deadline = time.monotonic() + 10
        while True:  # metering, in the same process, applies what the edge published
            usage = json.loads((await http_get(port, "/usage"))[1])
            if usage["message_tokens"] >= 12 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert usage["message_tokens"] == 12 and usage["user_id"] == "local"
        # The banner names the status page, open to this machine with no token; metering
        # in the same process answers it too.
        assert f"Status page: http://127.0.0.1:{port}/admin/status" in banner
        status = json.loads((await http_get(port, "/admin/status.json"))[1])
        assert [entry["stats"]["paired_rooms"] for entry in status["edges"]] == [1] and len(status["metering"]) == 1
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # by PID: ours alone
        assert await asyncio.wait_for(process.wait(), 20) in (0, -signal.SIGINT)
