"""The production topology on this machine, by hand (issue 15; `tests/topology.py`).

    .venv/bin/python -m bench.topology up              # namespaces (root), else loopback ports
    .venv/bin/python -m bench.topology up --loopback   # every process on 127.0.0.1
    .venv/bin/python -m bench.topology clean           # remove what a killed run left

`up` starts three nats-server nodes (one JetStream cluster, R3), three edges, two metering
processes and nginx in front of the edges, each in a network namespace of its own with its
own address (or, on loopback, its own ports); prints the URL clients use (nginx's), every
process with its namespace, address, ports and PID, then waits. Ctrl-C or SIGTERM ends
every process by its PID and removes the namespaces, veths, bridge and folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from tests.topology import NginxMissing, Topology, TopologyError, sweep_stale_runs


class _Stop(Exception):
    pass


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (a setting's field name, e.g. drain_ms=30000), got {text!r}")
    return name.replace("-", "_"), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.topology", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the topology and wait for Ctrl-C / SIGTERM")
    up.add_argument("--loopback", action="store_true", help="no namespaces: every process on 127.0.0.1, free ports")
    up.add_argument("--edges", type=int, default=3)
    up.add_argument("--meterings", type=int, default=2)
    up.add_argument("--edge-setting", type=_setting, action="append", default=[], metavar="NAME=VALUE", help="an edge setting (field name as in the README's table, e.g. drain_grace_ms=5000); repeatable")
    up.add_argument("--metering-setting", type=_setting, action="append", default=[], metavar="NAME=VALUE")
    up.add_argument("--no-sync-always", action="store_true", help="drop deploy/nats.conf's sync_interval: always")
    up.add_argument("--keep-dir", action="store_true", help="keep the folder (configs, logs, NATS stores) at the end")
    up.add_argument("--json", action="store_true", help="also print the description as one JSON line")
    sub.add_parser("clean", help="remove what runs whose process is gone left (namespaces, processes, folders)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tests.topology").setLevel(logging.WARNING)  # the description is printed below

    if args.command == "clean":
        removed = sweep_stale_runs()
        print("\n".join(removed) or "nothing left by earlier runs")
        return 0

    stopping: list[int] = []

    def raise_stop(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    def note_stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, raise_stop)
    signal.signal(signal.SIGTERM, raise_stop)
    topo = Topology(
        edges=args.edges,
        meterings=args.meterings,
        loopback=args.loopback,
        edge_settings=dict(args.edge_setting),
        metering_settings=dict(args.metering_setting),
        nats_sync_always=not args.no_sync_always,
        keep_dir=args.keep_dir,
    )
    try:
        topo.start()  # removes what it made if it fails or is interrupted
    except _Stop as stop:
        print(f"stopped by {stop} while starting; everything removed", flush=True)
        return 0
    except (NginxMissing, TopologyError) as exc:
        print(f"could not start the topology: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        signal.signal(signal.SIGINT, note_stop)
        signal.signal(signal.SIGTERM, note_stop)
        if not topo.isolated:
            print(f"NOTE: no namespaces, every process on loopback ports: {topo.why_not_isolated}")
        print(topo.describe())
        print(f"started in {topo.startup_seconds:.1f}s; folder (configs, logs): {topo.root_dir}")
        print(f"clients: {topo.url}   (e.g. {topo.ws_url('ROOMID', 'mac')})")
        print(f"NATS: {topo.nats_url}   (relay-admin --nats-url {topo.nats_url} --kv-replicas 3 ...)")
        print("edges run with RELAY_AUTH=none as user 'topology'; Ctrl-C or SIGTERM stops everything")
        if args.json:
            print(json.dumps(topo.as_dict()))
        sys.stdout.flush()
        reported: set[str] = set()
        while not stopping:
            time.sleep(0.2)
            for p in topo.procs.values():
                if not p.running and p.name not in reported:
                    reported.add(p.name)
                    print(f"{p.name} (pid {p.pid}) exited with {p.popen.returncode if p.popen else None}; see {p.log_path}", flush=True)
        print(f"{signal.Signals(stopping[0]).name}: stopping every process and removing the network", flush=True)
    finally:
        topo.stop()
    print("everything removed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
