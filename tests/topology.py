"""The production topology on one machine, without Docker (issue 15).

`Topology` starts what `compose.yaml` describes, each process in a network namespace of
its own with an address of its own:

- three `nats-server` nodes forming one JetStream cluster (the config derived from
  `deploy/nats.conf`: its settings, the addresses and the store folder replaced),
- three `relay-edge` processes and two `relay-metering` processes, told every node's
  client URL and `RELAY_KV_REPLICAS=3` (buckets and streams at R3),
- Debian's nginx balancing WebSockets over the edges (the config derived from
  `deploy/nginx.conf`: the same directives, the upstream and listen addresses replaced,
  plus the pid file, logs and temporary folders of this run).

Clients connect through nginx only (`Topology.url`).

The network: a bridge in the root namespace (`trbr-<tag>`) with a /24 out of 10.0.0.0/8
that no route here uses, one namespace per process (`tr-<tag>-<name>`) joined to it by a
veth pair (`tv<tag><n>` on the bridge, `eth0` inside), and an address on the bridge for
the root namespace, so that test clients reach nginx (and each process, for metrics and
faults). `<tag>` is random per run: parallel runs never share a name.

Where namespaces cannot be made (not root, no `ip`, `ip netns add` refused), every process
runs on 127.0.0.1 on free ports instead: `isolated` is False and `why_not_isolated` says
why (also logged). Faults that need a namespace (`cut_off`, `impair`) then raise
`FaultUnavailable`.

Every process is a child started with `ip netns exec NS CMD` (which execs CMD: the PID is
the process's own), remembered by PID and ended by that PID only: SIGTERM, SIGKILL after
a timeout. Everything made (processes, namespaces, veths, the bridge, the folder) is
removed by `stop()`, on a failed start, by a finalizer at interpreter exit, and, should
this process be SIGKILLed, by the next `Topology` started on this machine (or
`python -m bench.topology clean`), from the record each run keeps in `STATE_DIR`.

    with Topology() as topo:                       # or: async with Topology() as topo
        print(topo.url)                            # ws://10.x.y.2:8080
        topo.kill("edge2"); topo.restart("edge2")  # SIGKILL by PID, then the same edge again
        topo.cut_off("metering1"); topo.restore("metering1")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tests.topology")

ROOT = Path(__file__).resolve().parent.parent
NATS_CONF = ROOT / "deploy" / "nats.conf"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

#: Where each run records what it made, so that a later run can remove what a killed one left.
STATE_DIR = Path("/run/termrelay-topology") if os.geteuid() == 0 and Path("/run").is_dir() else Path(
    tempfile.gettempdir(), f"termrelay-topology-{os.getuid()}"
)

#: The user every connection acts as (the edges run with `RELAY_AUTH=none`, as the cluster tests do).
LOCAL_USER = "topology"

# Host parts of the addresses on the /24, by role: nginx .2, nats .11-19, edges .21-49,
# metering .51-59; the root namespace (the clients) has .1.
_HOST_PART = {"nginx": 1, "nats": 10, "edge": 20, "metering": 50}  # + the 1-based index
_MAX_COUNT = {"nats": 9, "edge": 29, "metering": 9}

# The production ports (compose.yaml), used as they are inside the namespaces.
NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT = 4222, 6222, 8222
EDGE_PORT, EDGE_METRICS_PORT, METERING_METRICS_PORT, NGINX_PORT = 8080, 9090, 9091, 8080

#: The edges' settings unless told otherwise: stopped at once (as `make run` and the tests
#: do; pass drain_grace_ms / drain_ms to test a drain).
DEFAULT_EDGE_SETTINGS: dict[str, Any] = {"drain_grace_ms": 0, "drain_ms": 0}


class TopologyError(RuntimeError):
    """The topology could not be started (the message says which process and why)."""


class NginxMissing(TopologyError):
    """No nginx binary here: tests using the topology skip with this message."""


class FaultUnavailable(RuntimeError):
    """This fault cannot be made here (no namespaces, or the kernel lacks the qdisc)."""


# --- small helpers ----------------------------------------------------------------------


def find_nginx() -> str:
    """Path of Debian's nginx (root's PATH has /usr/sbin; another user's may not)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if not found:
        raise NginxMissing("nginx is not installed: apt-get install -y nginx (Debian's package)")
    return found


def _find_nats_server() -> str:
    from runtime.embedded_nats import find_nats_server

    return find_nats_server()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process): with the
    PID it names one process, whatever PID reuse does later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def process_alive(pid: int, start: int | None) -> bool:
    return start is not None and process_start_time(pid) == start


def _ip(*args: str, netns: str | None = None, batch: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n NS] ARGS` (or a batch of `ip` commands on its stdin)."""
    cmd = ["ip", *(["-n", netns] if netns else []), *(["-batch", "-"] if batch is not None else []), *args]
    done = subprocess.run(cmd, input="\n".join(batch) + "\n" if batch is not None else None, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done


def _http_status(address: str, port: int, path: str, timeout: float = 0.5) -> int | None:
    """The status of a GET, or None if nothing answered."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _http_get(address: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


# --- configuration derived from deploy/ -------------------------------------------------


def _substitute(text: str, pattern: str, replacement: str | Callable[[re.Match[str]], str], what: str, count: int = 1) -> str:
    """`re.subn`, failing loudly when the deploy file no longer has what is replaced."""
    out, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if n != count:
        raise TopologyError(f"the deploy config changed: expected {count} {what}, found {n}; update tests/topology.py")
    return out


def nats_config(
    *, host: str | None, client_port: int, monitor_port: int, cluster_port: int, routes: list[str], store_dir: Path, sync_always: bool = True
) -> str:
    """deploy/nats.conf for one node: its ports, routes and store folder replaced (the node's
    name comes from the command line, `--name`, as compose gives it)."""
    text = NATS_CONF.read_text()
    text = _substitute(text, r"^port: \d+$", f"port: {client_port}", "client port")
    text = _substitute(text, r"^http_port: \d+$", f"http_port: {monitor_port}", "monitoring port")
    text = _substitute(text, r"^(\s*)store_dir: .*$", lambda m: f"{m.group(1)}store_dir: {json.dumps(str(store_dir))}", "store_dir")
    text = _substitute(text, r"^(\s+)port: 6222$", lambda m: f"{m.group(1)}port: {cluster_port}", "cluster port")
    text = _substitute(text, r"^\s*routes: \[\n(?:\s*nats-route://\S+\n)+\s*\]$", "  routes: [\n" + "".join(f"    {r}\n" for r in routes) + "  ]", "routes list")
    if not sync_always:
        text = _substitute(text, r"^\s*sync_interval: always$", "", "sync_interval")
    if host:  # loopback: every node on 127.0.0.1, so each listens there only
        text = f"host: {host}\n" + _substitute(text, r"^cluster \{$", f"cluster {{\n  host: {host}", "cluster block")
    return text


def nginx_config(*, upstreams: list[tuple[str, int]], listen: tuple[str, int], prefix: Path) -> str:
    """deploy/nginx.conf with the edges' and its own addresses replaced, and the files of
    this run (pid, logs, temporary folders) in `prefix`: nginx runs beside any other."""
    text = NGINX_CONF.read_text()
    servers = re.findall(r"^(\s*)server edge\d+:\d+(.*);$", text, flags=re.MULTILINE)
    if not servers:
        raise TopologyError("the deploy config changed: no `server edgeN:PORT ...;` line in deploy/nginx.conf")
    indent, params = servers[0]
    lines = "".join(f"{indent}server {a}:{p}{params};\n" for a, p in upstreams)
    text = _substitute(text, r"(?:^\s*server edge\d+:\d+.*;\n)+", lines, "block of upstream servers")
    text = _substitute(text, r"^(\s*)listen \d+;$", lambda m: f"{m.group(1)}listen {listen[0]}:{listen[1]};", "listen line")
    q = lambda p: json.dumps(str(prefix / p))  # noqa: E731
    own = "".join(
        f"  {name}_temp_path {q(name + '_temp')};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = _substitute(text, r"^http \{$", f"http {{\n  # this run's files (tests/topology.py)\n  access_log {q('access.log')};\n{own}", "http block")
    head = (
        "# Derived from deploy/nginx.conf by tests/topology.py: the same directives, the upstream\n"
        "# and listen addresses replaced; the run's own pid file and logs.\n"
        f"daemon off;\npid {q('nginx.pid')};\nerror_log {q('error.log')} notice;\n"
    )
    return head + text


# --- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    """One process of the topology. `netns` is None on loopback."""

    name: str  # nats1, edge2, metering1, nginx
    kind: str  # nats | edge | metering | nginx
    address: str
    ports: dict[str, int]
    netns: str | None = None
    veth: str | None = None  # the host side of its veth pair, on the bridge
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: int | None = None  # its start time (clock ticks), to name it with its PID
    starts: int = 0
    _log_offset: int = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def port(self) -> int:
        """Its main port: clients' (nats, nginx), WebSockets (edge), metrics (metering)."""
        return self.ports.get("client") or self.ports.get("http") or self.ports["metrics"]

    @property
    def metrics_port(self) -> int | None:
        return self.ports.get("metrics")

    @property
    def url(self) -> str:
        return f"nats://{self.address}:{self.port}" if self.kind == "nats" else f"http://{self.address}:{self.port}"

    def log_text(self, since_start: bool = False) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            if since_start:
                f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    def describe(self) -> str:
        ports = " ".join(f"{k} {v}" for k, v in self.ports.items())
        where = f"netns {self.netns}" if self.netns else "loopback"
        return f"{self.name:<10} pid {self.pid or '-':<7} {where:<28} {self.address:<15} {ports}"


def _pdeathsig_term() -> None:  # in the child, before exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _State:
    """What teardown needs, apart from the Topology (so a finalizer can hold it)."""

    tag: str
    root: Path
    record: Path
    procs: list[Proc] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    stop_timeout: float = 10.0
    keep_dir: bool = False
    torn_down: bool = False

    def save(self) -> None:
        """Write what this run made, for a later run to remove should this one be killed."""
        data = {
            "owner": [os.getpid(), process_start_time(os.getpid())],
            "tag": self.tag,
            "root": str(self.root),
            "netns": self.netns,
            "links": self.links,
            "pids": [[p.pid, p.started_at, p.name] for p in self.procs if p.pid is not None],
        }
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.record)


def _end_processes(procs: list[Proc], timeout: float) -> None:
    """SIGTERM each of `procs` still running (by PID), wait, SIGKILL what is left."""
    live = [p for p in procs if p.running]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    for p in live:
        assert p.popen is not None
        try:
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop within %.0fs of SIGTERM: SIGKILL", p.name, p.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            p.popen.wait(timeout=10)
    for p in procs:  # reap any the tests killed
        if p.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=1)


def _remove_network(netns: list[str], links: list[str]) -> list[str]:
    """Delete the links (veths, then the bridge: at once, where a namespace's deletion frees
    its veth later, in the kernel's own time), then the namespaces; returns what failed."""
    problems = []
    for link in links:
        done = _ip("link", "del", link, check=False)
        if done.returncode != 0 and "Cannot find device" not in done.stderr:
            problems.append(f"ip link del {link}: {done.stderr.strip()}")
    for name in netns:
        done = _ip("netns", "del", name, check=False)
        if done.returncode != 0 and "No such file" not in done.stderr:
            problems.append(f"ip netns del {name}: {done.stderr.strip()}")
    return problems


def _teardown(state: _State) -> None:
    """End every process (nginx, then the edges and metering, then NATS), remove the network
    and the folder. Safe to call twice; never raises (logs what it could not remove)."""
    if state.torn_down:
        return
    state.torn_down = True
    order = [["nginx"], ["edge", "metering"], ["nats"]]
    for kinds in order:
        try:
            _end_processes([p for p in state.procs if p.kind in kinds], state.stop_timeout)
        except Exception:
            log.exception("could not end the %s processes", "/".join(kinds))
    problems = _remove_network(state.netns, state.links)
    for problem in problems:
        log.warning("topology %s: %s", state.tag, problem)
    if not state.keep_dir:
        shutil.rmtree(state.root, ignore_errors=True)
    with contextlib.suppress(OSError):
        state.record.unlink()


def sweep_stale_runs() -> list[str]:
    """Remove what earlier runs left whose owning process is gone (SIGKILLed, crashed):
    their processes (by recorded PID and start time), namespaces, links and folders.
    Returns a line per run removed."""
    removed = []
    if not STATE_DIR.is_dir():
        return removed
    for record in sorted(STATE_DIR.glob("*.json")):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        owner_pid, owner_start = data["owner"]
        if process_alive(owner_pid, owner_start):
            continue
        for pid, start, _name in data["pids"]:
            if process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(process_alive(pid, start) for pid, start, _ in data["pids"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        _remove_network(data["netns"], data["links"])
        shutil.rmtree(data["root"], ignore_errors=True)
        with contextlib.suppress(OSError):
            record.unlink()
        removed.append(f"removed what run {data['tag']} (pid {owner_pid}, gone) left: {len(data['netns'])} namespaces, {len(data['pids'])} processes")
    for line in removed:
        log.warning("%s", line)
    return removed


@dataclass
class _Wait:
    what: str
    ready: Callable[[], bool]
    timeout: float
    procs: list[Proc] = field(default_factory=list)  # a death of any of these ends the wait
    interval: float = 0.05


class Topology:
    """The production topology on this machine; see the module's docstring.

    `edge_settings` / `metering_settings`: more settings (field names, as for the CLI's
    flags without dashes) for every edge / metering process, given as `RELAY_*` variables.
    `loopback=True` skips the namespaces. `nats_sync_always=False` drops deploy/nats.conf's
    `sync_interval: always` (faster on a slow disk; production keeps it). `tiers_toml`: the
    tiers file every service reads (default: unlimited rooms for the local user's premium tier).
    """

    def __init__(
        self,
        *,
        nats_nodes: int = 3,
        edges: int = 3,
        meterings: int = 2,
        loopback: bool = False,
        edge_settings: Mapping[str, Any] | None = None,
        metering_settings: Mapping[str, Any] | None = None,
        nats_sync_always: bool = True,
        tiers_toml: str | None = None,
        stop_timeout: float = 10.0,
        keep_dir: bool = False,
    ) -> None:
        for kind, n in (("nats", nats_nodes), ("edge", edges), ("metering", meterings)):
            if not 0 <= n <= _MAX_COUNT[kind] or (kind != "metering" and n == 0):
                raise ValueError(f"{kind}: {n} is out of range (1..{_MAX_COUNT[kind]})")
        self.tag = secrets.token_hex(3)
        self.counts = {"nats": nats_nodes, "edge": edges, "metering": meterings}
        self.edge_settings = {**DEFAULT_EDGE_SETTINGS, **(edge_settings or {})}
        self.metering_settings = dict(metering_settings or {})
        self.nats_sync_always = nats_sync_always
        self.tiers_toml = tiers_toml
        self.loopback_forced = loopback
        self.isolated = False
        self.why_not_isolated: str | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge: str | None = None
        self.client_address = "127.0.0.1"  # the root namespace's address (where clients come from)
        self.procs: dict[str, Proc] = {}
        self.startup_seconds: float | None = None
        self._root = Path(tempfile.mkdtemp(prefix=f"termrelay-topology-{self.tag}-"))
        self._root.chmod(0o755)  # nginx's workers (nobody) reach their temporary folders through it
        self._state = _State(self.tag, self._root, STATE_DIR / f"{self.tag}.json", stop_timeout=stop_timeout, keep_dir=keep_dir)
        self._finalizer = weakref.finalize(self, _teardown, self._state)
        self._started = False

    # --- what the tests read ---------------------------------------------------------------

    @property
    def nginx(self) -> Proc:
        return self.procs["nginx"]

    @property
    def nats(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.kind == "nats"]

    @property
    def edges(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.kind == "edge"]

    @property
    def meterings(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.kind == "metering"]

    @property
    def url(self) -> str:
        """Where clients connect: nginx."""
        return f"ws://{self.nginx.address}:{self.nginx.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.nginx.address}:{self.nginx.port}"

    @property
    def nats_urls(self) -> list[str]:
        return [p.url for p in self.nats]

    @property
    def nats_url(self) -> str:
        """Every node's client URL, comma-separated (as the edges are told)."""
        return ",".join(self.nats_urls)

    @property
    def root_dir(self) -> Path:
        return self._root

    def ws_url(self, room_id: str, role: str | None = "mac", **query: str) -> str:
        params = {"room_id": room_id, **({"role": role} if role else {}), **query}
        return f"{self.url}/ws?" + "&".join(f"{k}={v}" for k, v in params.items())

    def __getitem__(self, name: str) -> Proc:
        return self.procs[name]

    def describe(self) -> str:
        mode = f"isolated: bridge {self.bridge}, {self.subnet}" if self.isolated else f"loopback ({self.why_not_isolated})"
        lines = [f"topology {self.tag} ({mode}); clients: {self.url}"]
        lines += [p.describe() for p in self.procs.values()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "isolated": self.isolated,
            "why_not_isolated": self.why_not_isolated,
            "url": self.url,
            "nats_url": self.nats_url,
            "bridge": self.bridge,
            "subnet": str(self.subnet) if self.subnet else None,
            "root_dir": str(self._root),
            "startup_seconds": self.startup_seconds,
            "processes": [
                {"name": p.name, "kind": p.kind, "netns": p.netns, "veth": p.veth, "address": p.address, "ports": p.ports, "pid": p.pid}
                for p in self.procs.values()
            ],
        }

    # --- start and stop ---------------------------------------------------------------------

    def start(self) -> "Topology":
        self._drive_sync(self._bring_up())
        return self

    async def astart(self) -> "Topology":
        await self._drive_async(self._bring_up())
        return self

    def stop(self) -> None:
        """End every process and remove everything this run made (idempotent)."""
        self._finalizer()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)  # processes are waited for by PID; the network by `ip`

    def __enter__(self) -> "Topology":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> "Topology":
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def _drive_sync(self, steps: Iterator[_Wait], remove_on_failure: bool = True) -> None:
        try:
            for step in steps:
                deadline = time.monotonic() + step.timeout
                while not self._check(step):
                    if time.monotonic() > deadline:
                        raise TopologyError(self._timed_out(step))
                    time.sleep(step.interval)
        except BaseException:
            if remove_on_failure:
                self.stop()
            raise

    async def _drive_async(self, steps: Iterator[_Wait], remove_on_failure: bool = True) -> None:
        try:
            for step in steps:
                deadline = time.monotonic() + step.timeout
                while not self._check(step):
                    if time.monotonic() > deadline:
                        raise TopologyError(self._timed_out(step))
                    await asyncio.sleep(step.interval)
        except BaseException:
            if remove_on_failure:
                self.stop()
            raise

    def _check(self, step: _Wait) -> bool:
        for p in step.procs:
            if not p.running:
                code = p.popen.returncode if p.popen else None
                raise TopologyError(f"{p.name} exited with {code} while waiting for {step.what}:\n{p.log_text(True)[-2000:]}")
        return step.ready()

    def _timed_out(self, step: _Wait) -> str:
        tails = "".join(f"\n--- {p.name} ({p.log_path}):\n{p.log_text(True)[-1200:]}" for p in step.procs)
        return f"timed out after {step.timeout:.0f}s waiting for {step.what}{tails}"

    def _bring_up(self) -> Iterator[_Wait]:
        if self._started:
            raise TopologyError("this topology was started already")
        self._started = True
        t0 = time.monotonic()
        nginx_binary = find_nginx()  # before anything is made
        sweep_stale_runs()
        self._state.save()
        self._make_network()
        self._plan(nginx_binary)
        self._state.save()
        tiers = self._root / "tiers.toml"
        # Unlimited rooms for the one local user: the tests make many rooms (each counts for
        # ROOM_REG_TTL after its Mac leaves). Every service gets the same file.
        tiers.write_text(self.tiers_toml if self.tiers_toml is not None else "[tiers.premium]\nmax_rooms = -1\n")

        for p in self.nats:
            self._spawn(p)
        yield _Wait("the NATS cluster (every node's /healthz)", lambda: all(self._nats_healthy(p) for p in self.nats), 60, self.nats)
        for p in self.edges + self.meterings:
            self._spawn(p)
        yield _Wait("the edges' /readyz", lambda: all(self._ready(p) for p in self.edges), 90, self.edges + self.meterings)
        yield _Wait("metering ready", lambda: all(self._ready(p) for p in self.meterings), 60, self.meterings)
        self._spawn(self.nginx)
        yield _Wait("nginx answering /readyz", lambda: self._ready(self.nginx), 20, [self.nginx])
        self.startup_seconds = time.monotonic() - t0
        log.info("%s\nstarted in %.1fs", self.describe(), self.startup_seconds)

    # --- the network --------------------------------------------------------------------------

    def _make_network(self) -> None:
        why = self._why_no_namespaces()
        if why is None:
            try:
                self._make_bridge_and_namespaces()
                self.isolated = True
                return
            except (subprocess.CalledProcessError, OSError, TopologyError) as exc:
                detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else str(exc)
                why = f"could not make the namespaces ({detail})"
                _remove_network(self._state.netns, self._state.links)
                self._state.netns.clear()
                self._state.links.clear()
                self.procs.clear()
                self.subnet = self.bridge = None
        self.why_not_isolated = why
        self.client_address = "127.0.0.1"
        log.warning("topology %s on loopback ports, not in namespaces: %s", self.tag, why)

    def _why_no_namespaces(self) -> str | None:
        if self.loopback_forced:
            return "loopback asked for"
        if sys.platform != "linux":
            return f"network namespaces are Linux's ({sys.platform} here)"
        if os.geteuid() != 0:
            return "not root: network namespaces, veths and a bridge need CAP_NET_ADMIN"
        if shutil.which("ip") is None:
            return "no `ip` command (iproute2)"
        return None

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        """A random /24 in 10.0.0.0/8 that overlaps no address or route of this namespace."""
        used = []
        for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
            for token in _ip(*args).stdout.split():
                with contextlib.suppress(ValueError):
                    if "/" in token or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", token):
                        net = ipaddress.ip_network(token, strict=False)
                        if net.prefixlen > 0:
                            used.append(net)
        rng = random.SystemRandom()
        for _ in range(200):
            candidate = ipaddress.IPv4Network(f"10.{rng.randrange(64, 255)}.{rng.randrange(0, 256)}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return candidate
        raise TopologyError("no free /24 in 10.0.0.0/8 (every candidate overlaps a route)")

    def _make_bridge_and_namespaces(self) -> None:
        self.subnet = self._pick_subnet()
        self.bridge = f"trbr-{self.tag}"
        names = self._names()
        planned = [(name, kind, index, f"tr-{self.tag}-{name}", f"tv{self.tag}{n}") for n, (name, kind, index) in enumerate(names)]
        # Recorded before they exist: a run killed half-way leaves nothing unnamed.
        self._state.links += [veth for *_, veth in planned] + [self.bridge]
        self._state.netns += [netns for *_, netns, _veth in planned]
        self._state.save()
        _ip("link", "add", self.bridge, "type", "bridge")
        self.client_address = str(self.subnet.network_address + 1)
        _ip("addr", "add", f"{self.client_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # Another run that picked the same /24 at the same moment: both would route it.
        routes = _ip("-4", "route", "show", str(self.subnet)).stdout.strip().splitlines()
        if len(routes) != 1:
            raise TopologyError(f"{self.subnet} is routed twice: {routes}")
        batch = []
        for *_, netns, veth in planned:
            batch += [
                f"netns add {netns}",
                f"link add {veth} type veth peer name eth0 netns {netns}",
                f"link set {veth} master {self.bridge}",
                f"link set {veth} up",
            ]
        _ip(batch=batch)
        for name, kind, index, netns, veth in planned:
            address = str(self.subnet.network_address + _HOST_PART[kind] + index)
            _ip(netns=netns, batch=[f"addr add {address}/24 dev eth0", "link set eth0 up", "link set lo up"])
            self.procs[name] = Proc(name, kind, address, {}, netns=netns, veth=veth)

    def _names(self) -> list[tuple[str, str, int]]:
        """(name, kind, 1-based index) of every process, nginx last."""
        out = []
        for kind in ("nats", "edge", "metering"):
            out += [(f"{kind}{i}", kind, i) for i in range(1, self.counts[kind] + 1)]
        return out + [("nginx", "nginx", 1)]

    # --- the processes --------------------------------------------------------------------------

    def _plan(self, nginx_binary: str) -> None:
        """Decide every process's address, ports, command line and environment."""
        if not self.isolated:
            for name, kind, _ in self._names():
                self.procs[name] = Proc(name, kind, "127.0.0.1", {})
        iso = self.isolated
        for p in self.nats:
            p.ports = {
                "client": NATS_CLIENT_PORT if iso else _free_port(),
                "cluster": NATS_CLUSTER_PORT if iso else _free_port(),
                "monitor": NATS_MONITOR_PORT if iso else _free_port(),
            }
        routes = [f"nats-route://{p.address}:{p.ports['cluster']}" for p in self.nats]
        for p in self.nats:
            store = self._root / p.name / "store"
            store.mkdir(parents=True)
            conf = self._root / p.name / "nats.conf"
            conf.write_text(
                nats_config(
                    host=None if iso else "127.0.0.1",
                    client_port=p.ports["client"],
                    monitor_port=p.ports["monitor"],
                    cluster_port=p.ports["cluster"],
                    routes=routes,
                    store_dir=store,
                    sync_always=self.nats_sync_always,
                )
            )
            p.argv = [_find_nats_server(), "-c", str(conf), "--name", p.name]  # as compose runs it
        nats_url = self.nats_url
        bin_dir = Path(sys.executable).parent
        for p in self.edges:
            p.ports = {"http": EDGE_PORT if iso else _free_port(), "metrics": EDGE_METRICS_PORT if iso else _free_port()}
            settings = {
                "nats_url": nats_url,
                "kv_replicas": 3 if len(self.nats) >= 3 else len(self.nats),
                "host": "0.0.0.0" if iso else "127.0.0.1",
                "port": p.ports["http"],
                "edge_id": p.name,
                "auth": "none",
                "local_user_id": LOCAL_USER,
                "tiers_file": str(self._root / "tiers.toml"),
                "client_ip_header": "X-Forwarded-For",  # as compose: nginx appends the client's address
                "metrics_host": p.address,
                "metrics_port": p.ports["metrics"],
                **self.edge_settings,
            }
            p.env = {f"RELAY_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
            p.argv = self._console_script(bin_dir, "relay-edge", "edge.cli")
        for p in self.meterings:
            p.ports = {"metrics": METERING_METRICS_PORT if iso else _free_port()}
            settings = {
                "nats_url": nats_url,
                "kv_replicas": 3 if len(self.nats) >= 3 else len(self.nats),
                "tiers_file": str(self._root / "tiers.toml"),
                "metrics_host": p.address,
                "metrics_port": p.ports["metrics"],
                **self.metering_settings,
            }
            p.env = {f"RELAY_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}
            p.argv = self._console_script(bin_dir, "relay-metering", "metering.cli")
        nginx = self.nginx
        nginx.ports = {"http": NGINX_PORT if iso else _free_port()}
        prefix = self._root / "nginx"
        prefix.mkdir(mode=0o755)
        self._nginx_prefix = prefix
        self._nginx_binary = nginx_binary
        self.write_nginx_config()
        nginx.argv = self._nginx_argv()

    @staticmethod
    def _console_script(bin_dir: Path, script: str, module: str) -> list[str]:
        path = bin_dir / script
        return [str(path)] if path.exists() else [sys.executable, "-m", module]

    def _nginx_argv(self, *extra: str) -> list[str]:
        prefix = self._nginx_prefix
        return [self._nginx_binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"), *extra]

    def write_nginx_config(self, edges: list[str] | None = None) -> Path:
        """(Re)write nginx's config with `edges` (names; default: every edge) as the upstream."""
        chosen = [self.procs[name] for name in edges] if edges is not None else self.edges
        conf = self._nginx_prefix / "nginx.conf"
        conf.write_text(
            nginx_config(upstreams=[(e.address, e.ports["http"]) for e in chosen], listen=(self.nginx.address, self.nginx.ports["http"]), prefix=self._nginx_prefix)
        )
        return conf

    def _child_env(self, p: Proc) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(p.env)
        return env

    def _spawn(self, p: Proc) -> None:
        assert not p.running, f"{p.name} is running"
        p.log_path = self._root / f"{p.name}.log"
        p._log_offset = p.log_path.stat().st_size if p.log_path.exists() else 0
        cmd = (["ip", "netns", "exec", p.netns] if p.netns else []) + p.argv
        with open(p.log_path, "ab") as out:
            out.write(f"--- start {p.starts + 1}: {' '.join(cmd)}\n".encode())
            out.flush()
            p._log_offset = out.tell()
            # Its own session: a Ctrl-C meant for us reaches it only through our teardown.
            # PR_SET_PDEATHSIG binds it to the thread that forks it: only the main thread.
            main = threading.current_thread() is threading.main_thread()
            p.popen = subprocess.Popen(
                cmd, cwd=ROOT, env=self._child_env(p), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig_term if main and sys.platform == "linux" else None,
            )  # fmt: skip
        p.started_at = process_start_time(p.popen.pid)
        p.starts += 1
        if p not in self._state.procs:
            self._state.procs.append(p)
        self._state.save()

    def nats_healthy(self) -> bool:
        """Whether every running NATS node answers /healthz 200 (JetStream current)."""
        return all(self._nats_healthy(p) for p in self.nats if p.running)

    def _nats_healthy(self, p: Proc) -> bool:
        return _http_status(p.address, p.ports["monitor"], "/healthz") == 200

    def _ready(self, p: Proc) -> bool:
        if p.kind == "nats":
            return self._nats_healthy(p)
        if p.kind == "edge":
            return _http_status(p.address, p.ports["http"], "/readyz") == 200
        if p.kind == "metering":
            return "metering ready" in p.log_text(since_start=True)
        return _http_status(p.address, p.ports["http"], "/readyz") == 200  # nginx, to an edge

    def is_ready(self, name: str) -> bool:
        p = self.procs[name]
        return p.running and self._ready(p)

    # --- faults ------------------------------------------------------------------------------

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to the process (by its PID, only if it is still ours and running)."""
        p = self.procs[name]
        if not p.running:
            raise ProcessLookupError(f"{name} is not running")
        os.kill(p.pid, sig)  # type: ignore[arg-type]

    def kill(self, name: str) -> int:
        """SIGKILL the process (a crash: no word to anyone); returns its exit code."""
        p = self.procs[name]
        if p.running:
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        assert p.popen is not None
        return p.popen.wait(timeout=10)

    def terminate(self, name: str, timeout: float | None = None) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        p = self.procs[name]
        _end_processes([p], self._state.stop_timeout if timeout is None else timeout)
        assert p.popen is not None
        return p.popen.returncode

    def drain(self, name: str) -> None:
        """SIGTERM an edge and return at once: it drains (RELAY_DRAIN_GRACE_MS, RELAY_DRAIN_MS;
        the harness's defaults are 0: pass edge_settings to see a drain). See `wait_exit`."""
        assert self.procs[name].kind == "edge", "drain is an edge's"
        self.signal(name, signal.SIGTERM)

    def wait_exit(self, name: str, timeout: float = 30.0) -> int:
        p = self.procs[name]
        assert p.popen is not None
        return p.popen.wait(timeout=timeout)

    async def await_exit(self, name: str, timeout: float = 30.0) -> int:
        p = self.procs[name]
        assert p.popen is not None
        deadline = time.monotonic() + timeout
        while p.popen.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not exit within {timeout}s")
            await asyncio.sleep(0.02)
        return p.popen.returncode

    def _restart_steps(self, name: str) -> Iterator[_Wait]:
        p = self.procs[name]
        if p.running:
            self.kill(name)
        if p.kind == "nginx":
            with contextlib.suppress(OSError):
                (self._nginx_prefix / "nginx.pid").unlink()
        self._spawn(p)
        timeout = {"nats": 60, "edge": 60, "metering": 60, "nginx": 20}[p.kind]
        yield _Wait(f"{name} ready again", lambda: self._ready(p), timeout, [p])

    def restart(self, name: str) -> Proc:
        """Start the process again as it was (same namespace, address, settings, id; a
        SIGKILL first if it still runs) and wait until it is ready."""
        self._drive_sync(self._restart_steps(name), remove_on_failure=False)
        return self.procs[name]

    async def arestart(self, name: str) -> Proc:
        await self._drive_async(self._restart_steps(name), remove_on_failure=False)
        return self.procs[name]

    def _isolated_proc(self, name: str, what: str) -> Proc:
        if not self.isolated:
            raise FaultUnavailable(f"{what} needs network namespaces; this topology runs on loopback ({self.why_not_isolated})")
        return self.procs[name]

    def cut_off(self, name: str) -> None:
        """Cut the namespace off the network: its veth on the bridge goes down, so nothing
        reaches it or leaves it (no RST, no FIN: a partition, as a dead switch port). The
        process keeps running. `restore` undoes it."""
        p = self._isolated_proc(name, "cut_off")
        _ip("link", "set", p.veth, "down")  # type: ignore[arg-type]

    def restore(self, name: str) -> None:
        p = self._isolated_proc(name, "restore")
        _ip("link", "set", p.veth, "up")  # type: ignore[arg-type]

    def netem_available(self) -> tuple[bool, str]:
        """Whether this kernel has the netem qdisc (`impair` needs it), and if not why."""
        if not self.isolated:
            return False, f"no namespaces here ({self.why_not_isolated})"
        ns = self.procs["nginx"].netns
        done = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], capture_output=True, text=True)  # type: ignore[list-item]
        if done.returncode != 0:
            return False, f"tc netem: {done.stderr.strip()} (this kernel lacks CONFIG_NET_SCH_NETEM?)"
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)  # type: ignore[list-item]
        return True, ""

    def impair(self, name: str, *, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0, towards: list[str] | None = None) -> None:
        """netem delay/loss on what leaves `name`'s namespace (its eth0): to every address, or
        only to the processes named in `towards` (an HTB qdisc whose second class has the
        netem, chosen by u32 filters on the destination). Replaces an earlier impairment."""
        p = self._isolated_proc(name, "impair")
        ok, why = self.netem_available()
        if not ok:
            raise FaultUnavailable(why)
        self.clear_impairment(name)
        netem = ["netem"] + (["delay", f"{delay_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else []) if delay_ms else []) + (["loss", f"{loss_pct}%"] if loss_pct else [])
        tc = lambda *a: subprocess.run(["ip", "netns", "exec", p.netns, "tc", *a], check=True, capture_output=True, text=True)  # type: ignore[list-item]  # noqa: E731
        if towards is None:
            tc("qdisc", "add", "dev", "eth0", "root", *netem)
            return
        tc("qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
        tc("class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit", "quantum", "60000")
        tc("class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit", "quantum", "60000")
        tc("qdisc", "add", "dev", "eth0", "parent", "1:20", "handle", "20:", *netem)
        for other in towards:
            address = self.procs[other].address
            tc("filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst", f"{address}/32", "flowid", "1:20")

    def clear_impairment(self, name: str) -> None:
        p = self._isolated_proc(name, "clear_impairment")
        subprocess.run(["ip", "netns", "exec", p.netns, "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)  # type: ignore[list-item]

    def impair_edges_to_nats(self, *, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0) -> None:
        """netem between every edge and every NATS node, both ways (clients and cluster
        routes untouched). `clear_impairments` undoes it."""
        nats = [p.name for p in self.nats]
        edges = [p.name for p in self.edges]
        for e in edges:
            self.impair(e, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, towards=nats)
        for n in nats:
            self.impair(n, delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, towards=edges)

    def clear_impairments(self) -> None:
        for p in self.procs.values():
            self.clear_impairment(p.name)

    # --- packet drops with nftables (the kernel here has nf_tables and numgen, not netem) ---

    _NFT_TABLE = "termrelay_fault"

    def nft_available(self) -> tuple[bool, str]:
        """Whether `cut_routes` and `drop_randomly` can work here, and if not why."""
        if not self.isolated:
            return False, f"no namespaces here ({self.why_not_isolated})"
        if shutil.which("nft") is None:
            return False, "no `nft` command (apt-get install nftables)"
        return True, ""

    def _nft(self, name: str, script: str) -> None:
        p = self._isolated_proc(name, "nftables")
        ok, why = self.nft_available()
        if not ok:
            raise FaultUnavailable(why)
        done = subprocess.run(["ip", "netns", "exec", p.netns, "nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)  # type: ignore[list-item]
        if done.returncode != 0:
            raise FaultUnavailable(f"nft in {p.netns}: {done.stderr.strip()}")

    def _nft_table(self, name: str, rules: list[str]) -> None:
        """(Re)make this run's table in `name`'s namespace with `rules` (in chains `in`/`out`)."""
        t = self._NFT_TABLE
        self.clear_drops(name)
        self._nft(
            name,
            f"table inet {t} {{\n"
            "  chain in { type filter hook input priority -10; policy accept; }\n"
            "  chain out { type filter hook output priority -10; policy accept; }\n"
            "}\n" + "".join(f"add rule inet {t} {rule}\n" for rule in rules),
        )

    def clear_drops(self, name: str) -> None:
        """Remove what `cut_routes` / `drop_randomly` put in `name`'s namespace."""
        p = self._isolated_proc(name, "clear_drops")
        if shutil.which("nft") is not None:
            subprocess.run(["ip", "netns", "exec", p.netns, "nft", "delete", "table", "inet", self._NFT_TABLE], capture_output=True)  # type: ignore[list-item]

    def cut_routes(self, name: str) -> None:
        """Cut a NATS node off from the other nodes only: every packet of the cluster
        routes (its cluster port, either way) is dropped inside its namespace (no RST: a
        partition), while its clients stay connected. `restore_routes` undoes it."""
        p = self.procs[name]
        assert p.kind == "nats", "cut_routes is a NATS node's"
        port = p.ports["cluster"]
        self._nft_table(name, [f"{chain} tcp {d} {port} drop" for chain in ("in", "out") for d in ("dport", "sport")])

    def restore_routes(self, name: str) -> None:
        self.clear_drops(name)

    def drop_randomly(self, name: str, loss_pct: float, towards: list[str]) -> None:
        """Drop `loss_pct` % of the packets between `name` and the processes in `towards`,
        each way, at random (nftables `numgen random`), inside `name`'s namespace."""
        addresses = ", ".join(self.procs[o].address for o in towards)
        pct = int(round(loss_pct))
        self._nft_table(
            name,
            [f"out ip daddr {{ {addresses} }} numgen random mod 100 < {pct} drop", f"in ip saddr {{ {addresses} }} numgen random mod 100 < {pct} drop"],
        )

    def drop_edges_to_nats(self, loss_pct: float) -> None:
        """`drop_randomly` between every edge and every NATS node (in the edges' namespaces:
        both directions; clients, nginx and the cluster routes untouched)."""
        nats = [p.name for p in self.nats]
        for e in self.edges:
            self.drop_randomly(e.name, loss_pct, nats)

    def clear_all_drops(self) -> None:
        if self.isolated:
            for p in self.procs.values():
                self.clear_drops(p.name)

    # --- several at once, and the servers' monitoring ---------------------------------------

    def _restart_all_steps(self, names: list[str]) -> Iterator[_Wait]:
        procs = [self.procs[n] for n in names]
        for p in procs:
            if p.running:
                self.kill(p.name)
        for p in procs:
            self._spawn(p)
        yield _Wait(f"{', '.join(names)} ready again", lambda: all(self._ready(p) for p in procs), 90, procs)

    async def arestart_all(self, names: list[str]) -> None:
        """SIGKILL every one of `names` still running, start them all, wait until all are
        ready (a whole NATS cluster must come up together: no node is healthy alone)."""
        await self._drive_async(self._restart_all_steps(names), remove_on_failure=False)

    def start_again(self, name: str) -> None:
        """Start a stopped process again (as `restart`) without waiting for it."""
        p = self.procs[name]
        assert not p.running, f"{name} is running"
        self._spawn(p)

    def monitor(self, name: str, path: str, timeout: float = 3.0) -> Any:
        """A NATS node's monitoring endpoint (`/jsz?consumers=true`, `/subsz`, `/connz`...), as JSON."""
        p = self.procs[name]
        assert p.kind == "nats", f"{name} is not a NATS node"
        status, body = _http_get(p.address, p.ports["monitor"], path, timeout=timeout)
        if status != 200:
            raise TopologyError(f"{name} {path}: HTTP {status}: {body[:200]}")
        return json.loads(body)

    def reload_nginx(self, edges: list[str] | None = None, timeout: float = 10.0) -> None:
        """Rewrite nginx's config (the upstream: `edges`, default every edge) and reload it
        (`nginx -s reload` with this run's prefix and pid file); returns once the new workers
        run and the old ones take no new connection. Old workers finish their WebSockets, as
        in production."""
        p = self.nginx
        assert p.running, "nginx is not running"
        before = self.children_of(p.pid)  # type: ignore[arg-type]
        self.write_nginx_config(edges)
        done = subprocess.run(self._nginx_argv("-s", "reload"), capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise TopologyError(f"nginx -s reload failed: {done.stderr.strip()}")
        # `worker_processes auto`: one per core. Done once all new workers run and the old
        # ones have exited, or half a second after (an old worker holding WebSockets stays
        # until they close, but stops accepting as soon as it hears of the reload).
        workers = os.cpu_count() or 1
        deadline = time.monotonic() + timeout
        started_at: float | None = None
        while True:
            now_children = self.children_of(p.pid)  # type: ignore[arg-type]
            if started_at is None and len(now_children - before) >= workers:
                started_at = time.monotonic()
            if started_at is not None and (not (now_children & before) or time.monotonic() - started_at > 0.5):
                return
            if time.monotonic() > deadline:
                raise TopologyError(f"nginx did not start its new workers within {timeout}s:\n{(self._nginx_prefix / 'error.log').read_text()[-1500:]}")
            time.sleep(0.02)

    @staticmethod
    def children_of(pid: int) -> set[int]:
        found: set[int] = set()
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found.update(int(x) for x in task.read_text().split())
        return found

    # --- reading the processes --------------------------------------------------------------------

    def metrics(self, name: str) -> dict[str, float]:
        """What the process's /metrics says: each sample by name summed over its labels,
        and each labelled one as `name{label="value",...}` (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        p = self.procs[name]
        assert p.metrics_port is not None, f"{name} serves no metrics"
        status, body = _http_get(p.address, p.metrics_port, "/metrics")
        assert status == 200, (name, status, body[:300])
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
                if sample.labels:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    async def ametrics(self, name: str) -> dict[str, float]:
        return await asyncio.to_thread(self.metrics, name)

    def netns_inode(self, name: str) -> int | None:
        """The inode of the process's network namespace (equal for two processes in one)."""
        p = self.procs[name]
        return _netns_inode(p.pid) if p.running else None  # type: ignore[arg-type]

    def leftovers(self) -> dict[str, list[str]]:
        """What of this run still exists: namespaces, links, running processes (by PID and
        start time), the folder. Empty lists after `stop()`."""
        listed = set(_ip("netns", "list", check=False).stdout.split()) if shutil.which("ip") else set()
        links = _ip("-o", "link", "show", check=False).stdout if shutil.which("ip") else ""
        return {
            "netns": [n for n in self._state.netns if n in listed],
            "links": [l for l in self._state.links if re.search(rf"^\d+: {re.escape(l)}[@:]", links, re.M)],  # noqa: E741
            "processes": [f"{p.name} pid {p.pid}" for p in self.procs.values() if p.pid is not None and process_alive(p.pid, p.started_at)],
            "dirs": [str(self._root)] if self._root.exists() else [],
            "records": [str(self._state.record)] if self._state.record.exists() else [],
        }
