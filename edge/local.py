"""`make run`: a whole relay on this machine — nats-server, one edge, metering — until Ctrl-C.

JetStream data lives in `.local/nats` (git ignores it), so rooms survive a restart. The
data folder is locked while the relay runs (one relay per folder), and the lock file
records the NATS URL so that `relay-admin` finds this relay without being told.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge.server import Edge
from edge.settings import EdgeSettings
from metering.service import Metering, MeteringSettings
from runtime.embedded_nats import EmbeddedNatsServer
from runtime.local_lock import AlreadyRunning, LocalRelayLock
from runtime.service import configure_logging, exit_if_start_fails, fail, run_event_loop, serve_until_signalled
from runtime.settings import OneLineErrorParser, add_setting_flags, settings_from_args

log = logging.getLogger("edge")


@dataclass(frozen=True, kw_only=True)
class LocalSettings:
    """What `make run` adds to the edge's settings."""

    local_data: str = field(default=".local", metadata={"help": "folder for the embedded nats-server's data and the run's lock"})
    local_nats_port: int = field(default=0, metadata={"help": "port of the embedded nats-server (0: a free one)", "port": True})
    local_stop_with_parent: bool = field(
        default=False,
        metadata={"help": "stop when the process that started this one stops (make run sets it: `kill -INT` of make's PID then ends the relay too)"},
    )


async def _run(settings: EdgeSettings, local: LocalSettings) -> None:
    edge = Edge(settings)
    # Metering in the same process: it shares nothing with the edge but the NATS server.
    metering = Metering(MeteringSettings(nats_url=settings.nats_url, tiers_file=settings.tiers_file))
    metering_task = asyncio.create_task(metering.run())
    metering_task.add_done_callback(_report_metering_end)
    watcher = asyncio.create_task(_stop_with_parent(edge)) if local.local_stop_with_parent else None
    try:
        await _run_edge(edge, settings)
    finally:
        if watcher is not None:
            watcher.cancel()
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
        print(banner(settings, edge.port, banner_hosts(settings.host, _interface_addresses())), flush=True)
    else:
        ready.cancel()
    await runner


def banner(settings: EdgeSettings, port: int, hosts: list[str]) -> str:
    """What `make run` prints once the relay serves: where to point the Mac agent, how to sign in."""
    urls = [f"ws://{host}:{port}" for host in hosts]
    lines = ["", "  termrelay is running.", f"  Point the TermOnMac Mac agent at it:  RELAY_SERVER_URL={urls[0]}"]
    lines += [f"  (or, where that address is not the phone's network:  RELAY_SERVER_URL={url})" for url in urls[1:]]
    if settings.host in ("127.0.0.1", "localhost", "::1"):
        lines += ["  Listening on 127.0.0.1 only: an iPhone cannot reach it. For a phone on your network:", "  make run RELAY_HOST=0.0.0.0"]
    elif hosts == ["127.0.0.1"]:
        lines += ["  No network address found on this machine: give the Mac agent the address the phone can reach."]
    if settings.auth == "none":
        lines += [
            f"  Authentication is OFF (RELAY_AUTH=none): every connection acts as user '{settings.local_user_id}'. "
            "Keep this on a trusted network."
        ]
    else:
        lines += [
            "  Authentication is ON. In another terminal, in this folder, create a user and an API key",
            "  (relay-admin finds this relay by itself; the key is the last line):",
            "    .venv/bin/relay-admin users add alice --email alice@example.com --tier pro",
            "    .venv/bin/relay-admin keys create alice",
            "  (If alice exists already, skip the first line; `.venv/bin/relay-admin users list` shows who exists.)",
        ]
    local = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else hosts[0]
    lines += ["  Metering runs here too: usage and quotas per user (RELAY_METERING=0 turns both off)."]
    if settings.status_open_on_loopback or settings.admin_token:
        how = "open to this machine" if settings.status_open_on_loopback else "the admin token as password"
        lines += [f"  Status page: http://{local}:{port}/admin/status   ({how})"]
    lines += [f"  Health: http://{local}:{port}/healthz   Ctrl-C stops everything.", ""]
    return "\n".join(lines)


# --- which address to print --------------------------------------------------------


def banner_hosts(listen_host: str, interface_addresses: Iterable[str]) -> list[str]:
    """The addresses to print for a listener on `listen_host`, best first.

    A specific address is itself. A wildcard (0.0.0.0, ::) is every address of this
    machine's interfaces that another device can reach: not loopback, not link-local;
    private LAN addresses first (a phone at home is on one), in the order found (the
    first found is the one with the default route). Only loopback found: 127.0.0.1.
    """
    if listen_host not in ("0.0.0.0", "::", ""):
        return [listen_host]
    usable: list[ipaddress.IPv4Address] = []
    for text in interface_addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast:
            continue
        if address not in usable:
            usable.append(address)
    # Stable sort: private (and carrier-grade NAT, as VPN meshes use) before public.
    cgnat = ipaddress.IPv4Network("100.64.0.0/10")
    usable.sort(key=lambda a: 0 if a.is_private else 1 if a in cgnat else 2)
    return [str(a) for a in usable] or ["127.0.0.1"]


_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}.get(sys.platform)


def _interface_addresses() -> list[str]:
    """The IPv4 addresses of this machine's interfaces, the default route's first."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        # Connecting a UDP socket sends nothing; it picks the address of the default route.
        probe.connect(("192.0.2.1", 9))
        found.append(probe.getsockname()[0])
    if _SIOCGIFADDR is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
            for _, name in socket.if_nameindex():
                with contextlib.suppress(OSError):  # an interface without an IPv4 address
                    answer = fcntl.ioctl(query.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                    found.append(socket.inet_ntoa(answer[20:24]))
    with contextlib.suppress(OSError):
        found += socket.gethostbyname_ex(socket.gethostname())[2]
    return found


# --- stopping with make ------------------------------------------------------------


def _catches(pid: int, signals: Sequence[int]) -> bool | None:
    """Whether process `pid` has a handler for every one of `signals` (None: cannot tell)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            caught = int(line.split()[1], 16)
            return all(caught & (1 << (sig - 1)) for sig in signals)
    return None


async def _stop_with_parent(edge: Edge, interval_s: float = 0.25) -> None:
    """Stop the edge gracefully once the process that started us is gone or going.

    `kill -INT` of make's PID reaches make alone. GNU make then resets its handler and
    waits for its children, expecting them to have had the signal too (as with Ctrl-C,
    which goes to the whole process group): it would wait forever. So we watch make:
    when it stops catching SIGINT (it is handling one), or when we are orphaned, we stop.
    """
    parent = os.getppid()
    watched = (signal.SIGINT, signal.SIGTERM)
    catching_at_start = _catches(parent, watched)
    while True:
        await asyncio.sleep(interval_s)
        if os.getppid() != parent or (catching_at_start and _catches(parent, watched) is False):
            log.info("the process that started this relay (pid %d) is stopping; stopping too", parent)
            if edge.serving:
                edge.stop()
            return


# --- the command -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="relay-local",
        usage="%(prog)s [options]   (or: make run [RELAY_X=...])",
        description="A whole relay on this machine: nats-server, one edge and metering, until Ctrl-C.",
        epilog="Each option can also be set by the environment variable named beside it; a flag wins over the variable.",
    )
    add_setting_flags(parser.add_argument_group("make run"), LocalSettings)
    add_setting_flags(parser.add_argument_group("the edge (see relay-edge --help; auth defaults to none here)"), EdgeSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    local: LocalSettings = settings_from_args(LocalSettings, parser, args)
    # The quick start is one person's relay: no keys unless asked for (RELAY_AUTH=required),
    # and the status page open to this machine.
    edge_settings: EdgeSettings = settings_from_args(EdgeSettings, parser, args, {"RELAY_AUTH": "none", "RELAY_DRAIN_GRACE_MS": "0", "RELAY_DRAIN_MS": "0", "RELAY_STATUS_OPEN_ON_LOOPBACK": "true", **os.environ})
    configure_logging(edge_settings.log_format, edge_settings.log_level)
    lock = LocalRelayLock(local.local_data)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        fail("relay-local", f"a relay is already running with its data in {local.local_data} ({exc}); stop it first, or give this one another folder (RELAY_LOCAL_DATA=...)")
    data = Path(local.local_data) / "nats"
    nats_server = EmbeddedNatsServer(store_dir=data, port=local.local_nats_port or None, die_with_parent=True)
    try:
        try:
            nats_server.start()
        except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
            fail("relay-local", f"cannot start nats-server: {exc} (is RELAY_LOCAL_NATS_PORT={local.local_nats_port} free?)"
                 if local.local_nats_port else f"cannot start nats-server: {exc}")
        lock.record(nats_url=nats_server.url)
        log.info("nats-server on %s (data in %s)", nats_server.url, data)
        settings = dataclasses.replace(edge_settings, nats_url=nats_server.url)
        exit_if_start_fails(
            "relay-local",
            lambda: run_event_loop(_run(settings, local), settings.uvloop),
            nats_url=nats_server.url,
            host=settings.host,
            port=settings.port,
        )
    finally:
        nats_server.stop()
        lock.release()


if __name__ == "__main__":
    main()
