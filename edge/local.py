"""`make run`: a whole relay on this machine — nats-server, one edge, metering — until Ctrl-C.

JetStream data lives in `.local/nats` (git ignores it), so rooms survive a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge.cli import configure_logging, run_event_loop, serve_until_signalled
from edge.embedded_nats import EmbeddedNatsServer
from edge.server import Edge
from edge.settings import EdgeSettings, load_settings
from metering.service import Metering, MeteringSettings


async def _run(settings: EdgeSettings) -> None:
    edge = Edge(settings)
    # Metering in the same process: it shares nothing with the edge but the NATS server.
    metering = Metering(MeteringSettings(nats_url=settings.nats_url, tiers_file=settings.tiers_file))
    metering_task = asyncio.create_task(metering.run())
    metering_task.add_done_callback(_report_metering_end)
    try:
        await _run_edge(edge, settings)
    finally:
        metering.stop()
        await asyncio.gather(metering_task, return_exceptions=True)


def _report_metering_end(task: asyncio.Task[None]) -> None:
    """Metering shares this process: should it end early, say so (the edge serves on)."""
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("metering").error(
            "metering stopped: %r; usage is not applied and quotas are not checked until a restart", task.exception()
        )


async def _run_edge(edge: Edge, settings: EdgeSettings) -> None:
    runner = asyncio.create_task(serve_until_signalled(edge))
    ready = asyncio.create_task(edge.ready.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if edge.ready.is_set():
        host = _reachable_host(settings.host)
        url = f"ws://{host}:{edge.port}"
        reach = (
            "  Listening on 127.0.0.1 only: an iPhone cannot reach it. For a phone on your network:\n"
            "  make run RELAY_HOST=0.0.0.0\n"
            if settings.host in ("127.0.0.1", "localhost", "::1")
            else ""
        )
        if settings.auth == "none":
            auth = (
                f"  Authentication is OFF (RELAY_AUTH=none): every connection acts as user "
                f"'{settings.local_user_id}'. Keep this on a trusted network.\n"
            )
        else:
            auth = (
                "  Authentication is ON: create a user and an API key (the key is the last line):\n"
                f"    .venv/bin/relay-admin --nats-url {settings.nats_url} users add alice --email alice@example.com --tier pro\n"
                f"    .venv/bin/relay-admin --nats-url {settings.nats_url} keys create alice\n"
            )
        print(
            "\n"
            f"  termrelay is running.\n"
            f"  Point the TermOnMac Mac agent at it:  RELAY_SERVER_URL={url}\n"
            f"{reach}"
            f"{auth}"
            f"  Metering runs here too: usage and quotas per user (RELAY_METERING=0 turns both off).\n"
            f"  Health: http://{host}:{edge.port}/healthz   Ctrl-C stops everything.\n",
            flush=True,
        )
    else:
        ready.cancel()
    await runner


def _reachable_host(host: str) -> str:
    """The address to print for a wildcard listener: this machine's name as the network knows it."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True, kw_only=True)
class LocalSettings:
    """What `make run` adds to the edge's settings (environment only: flags go to the edge)."""

    local_data: str = field(default=".local", metadata={"help": "folder for the embedded nats-server's data"})
    local_nats_port: int = field(default=0, metadata={"help": "port of the embedded nats-server (0: a free one)"})


def main() -> None:
    configure_logging()
    local: LocalSettings = load_settings(LocalSettings, [], prog="relay-local")
    # The quick start is one person's relay: no keys unless asked for (RELAY_AUTH=required).
    local_defaults = {"RELAY_AUTH": "none", **os.environ}
    edge_settings: EdgeSettings = load_settings(EdgeSettings, sys.argv[1:], local_defaults, prog="relay-local")
    data = Path(local.local_data) / "nats"
    nats_server = EmbeddedNatsServer(store_dir=data, port=local.local_nats_port or None)
    nats_server.start()
    logging.getLogger("edge").info("nats-server on %s (data in %s)", nats_server.url, data)
    try:
        run_event_loop(_run(dataclasses.replace(edge_settings, nats_url=nats_server.url)), edge_settings.uvloop)
    except KeyboardInterrupt:
        pass
    finally:
        nats_server.stop()


if __name__ == "__main__":
    main()
