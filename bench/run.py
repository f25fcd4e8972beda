"""The standard load benchmark: the product's edge and the reference relay, in one run.

    make bench                              # installs the bench extra, then runs this
    .venv/bin/python -m bench.run           # the standard set (about 10 minutes, and up to 10 more for the ramp)
    .venv/bin/python -m bench.run --quick   # small numbers, for development (about two minutes)
    .venv/bin/python -m bench.run --modes realistic --realistic-steps 200,400,800   # the ramp alone

Starts its own `nats-server`, one product edge (`relay-edge`, auth required, a tiers file
that gives the bench user unlimited rooms and credits, no inbound rate limit, no caps per
client address: every socket comes from 127.0.0.1), one
`relay-metering` (the edge publishes usage and checks the quota of every connection) and the
reference relay (`bench.reference_relay`), each a child process; makes the bench user and
its API key; pins the relay under test to one CPU and nats-server and the load generator
to the other(s) when the machine allows. Then, for each relay in turn:

- idle memory: 2000 idle pairs (first, on fresh processes), RSS before/after;
- 1, 100 and 1000 pairs at max rate (8 frames in flight per direction) and at 10 frames/s
  per pair (5 each way), 256-byte payloads, 10 s each; at 1000 pairs three rounds
  (`--repeat`), each relay back to back, and a target's ratio is the median of the rounds';
- the TermOnMac-like ramp (`realistic`): 100, 200, 400, 800, 1200, 1600, 2000 active
  pairs (`--realistic-steps`), each with 5 idle Macs beside it (`--idle-macs-per-pair`),
  10 s each, product and reference back to back at each step; a relay's ramp stops at
  the first step that does not hold (p99 over 50 ms, the relay over 0.95 of its core,
  or any loss, failed set-up or unanswered heartbeat); the largest count that held, and
  the relay's CPU per pair there, are its figures;
- the reconnect storm: 2000 pairs dropped and reconnected at once.

Writes `bench/results/<timestamp>.json` and a PNG plot beside it (throughput and p99
latency against pairs, product against reference; needs matplotlib, the `bench` extra)
and prints each target's ratio, product over reference. Every child process is ended by
PID when the run ends, also on Ctrl-C or an error. Runs by hand; never part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadConfig, proc_rss_kib, raise_nofile_limit, run_load, summary
from runtime.embedded_nats import EmbeddedNatsServer, find_nats_server, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRODUCT, REFERENCE = "product", "reference"

# The bench user's tier: nothing it does may be refused for want of rooms or credits.
TIERS_TOML = "[tiers.bench]\ncredits_per_window = -1\nmax_rooms = -1\nmax_sessions = -1\n"


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    pairs: tuple[int, ...]
    duration_s: float
    idle_pairs: int
    storm_pairs: int
    rate_per_direction: float = 5.0  # 10 frames/s per pair
    window: int = 8
    payload_bytes: int = 256
    warmup_s: float = 1.0
    heartbeat_s: float = 20.0  # one socket's; TermOnMac's clients: 1 s (active Mac), 3 s (iPhone)
    modes: tuple[str, ...] = ("idle", "max", "rate", "realistic", "storm")
    nats_sync_always: bool = False  # fsync every JetStream write, as deploy/nats.conf does
    # The max and rate scenarios at the largest pair count (the targets') run this many
    # times, product and reference back to back each time; a target's ratio is the median
    # of the rounds' ratios. On a shared machine one round's p99 ratio can be off by half.
    repeat: int = 1
    # The realistic ramp: active pairs per step, each with `idle_macs_per_pair` idle Macs.
    realistic_steps: tuple[int, ...] = (100, 200, 400, 800, 1200, 1600, 2000)
    realistic_duration_s: float = 10.0
    idle_macs_per_pair: int = 5


STANDARD = Plan(pairs=(1, 100, 1000), duration_s=10.0, idle_pairs=2000, storm_pairs=2000, repeat=3)
QUICK = Plan(
    pairs=(1, 10, 50), duration_s=3.0, idle_pairs=50, storm_pairs=50, warmup_s=0.5,
    realistic_steps=(10, 25, 50), realistic_duration_s=3.0,
)  # fmt: skip

# Targets of the performance issue: (name, how to read it from the results, the bound).
IDLE_KIB_TARGET = 24.0
STORM_S_TARGET = 10.0
THROUGHPUT_RATIO_TARGET = 0.9
P99_RATIO_TARGET = 1.2
REALISTIC_RATIO_TARGET = 1.5  # active pairs the edge carries, over the reference's
# What a step of the realistic ramp must stay within to hold.
REALISTIC_P99_MS = 50.0
REALISTIC_CPU_BOUND = 0.95  # of the relay's one core
# The load side (generator and nats-server) past this share of its CPUs: a step's limit
# may be the load side's, not the relay's; the verdict says so.
LOAD_BOUND = 0.9


# --- child processes ------------------------------------------------------------------


class Children:
    """The child processes this run started; `stop_all` ends each by its PID."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], log_path: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
        log = open(log_path, "wb")
        # Its own session: a Ctrl-C meant for this run must not reach it; we end it ourselves.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, cpus)
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {proc.pid}) ignored SIGTERM; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def _wait_log_line(log: Path, line: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Wait until `proc` has written `line` to `log`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-1500:]}")
        if log.exists() and line in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start; see {log}")


def _wait_http_ok(port: int, path: str, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not answer {path} within {timeout:.0f} s; see {log}")


def _pinning() -> tuple[set[int] | None, set[int] | None, str]:
    """(CPUs for the relay under test, CPUs for nats-server and the load generator, a note)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None, "no CPU affinity on this system: nothing pinned"
    if len(allowed) < 2:
        return None, None, f"only CPU {allowed} usable: nothing pinned"
    relay, load = {allowed[0]}, set(allowed[1:])
    return relay, load, f"relay under test on CPU {sorted(relay)}, nats-server and load generator on CPU {sorted(load)}"


# --- the machine ------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("websockets", "nats-py", "msgspec"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    with contextlib.suppress(Exception):
        out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=10)
        versions["nats-server"] = out.stdout.strip().split()[-1]
    mem_kib = None
    with contextlib.suppress(Exception):
        mem_kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1) if mem_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


# --- the run ----------------------------------------------------------------------------


def _scenarios(plan: Plan) -> list[tuple[str, int, int]]:
    """(mode, pairs, round) in run order: idle first (fresh processes), then traffic (the
    targets' scenarios `plan.repeat` times), then the realistic ramp (a relay leaves it at
    its first step that does not hold), then the storm."""
    order = [("idle", plan.idle_pairs, 1)]
    for pairs in plan.pairs:
        rounds = plan.repeat if pairs == max(plan.pairs) else 1
        order += [(mode, pairs, n) for n in range(1, rounds + 1) for mode in ("max", "rate")]
    order += [("realistic", pairs, 1) for pairs in sorted(plan.realistic_steps)]
    order.append(("storm", plan.storm_pairs, 1))
    return [(mode, pairs, n) for mode, pairs, n in order if mode in plan.modes]


def run_benchmark(plan: Plan, quick: bool, only: str | None = None) -> Path:
    """Run `plan` against both relays; returns the path of the JSON results."""
    raise_nofile_limit()  # the children inherit it: each relay holds thousands of sockets
    relay_cpus, load_cpus, pin_note = _pinning()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # nats-server and the load workers inherit it
        # Go sizes GOMAXPROCS by the affinity mask: pinned to one CPU, nats-server would get
        # one P, and its JetStream work (the product's usage stream, KV writes) would hold
        # frame routing up to a 10 ms preemption tick at a time, a penalty only the relay
        # that uses JetStream pays and that no production nats-server has. Two Ps, as on
        # any two-core machine; set GOMAXPROCS to choose otherwise.
        os.environ.setdefault("GOMAXPROCS", "2")
        pin_note += f"; nats-server GOMAXPROCS={os.environ['GOMAXPROCS']}"
    print(f"pinning: {pin_note}")
    load_cores = len(load_cpus) if load_cpus else len(os.sched_getaffinity(0))
    if "realistic" in plan.modes and plan.realistic_steps:
        sockets = max(plan.realistic_steps) * (2 + plan.idle_macs_per_pair)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if sockets > limit - 200:
            print(f"warning: the ramp's top step needs {sockets} sockets in one relay, the open-files limit is {limit}")
    workdir = Path(tempfile.mkdtemp(prefix="termrelay-bench-"))
    children = Children()
    nats_server: EmbeddedNatsServer | None = None
    started_at = datetime.datetime.now(datetime.timezone.utc)
    results: list[dict[str, Any]] = []
    try:
        nats_server = EmbeddedNatsServer(store_dir=workdir / "nats", sync_always=plan.nats_sync_always).start()
        print(f"nats-server pid {nats_server.process.pid} on {nats_server.url}")
        tiers = workdir / "tiers.toml"
        tiers.write_text(TIERS_TOML)

        from tests.harness import make_account

        account = asyncio.run(make_account(nats_server.url, tier="bench"))

        metering_log = workdir / "metering.log"
        metering_args = [sys.executable, "-m", "metering.cli", "--nats-url", nats_server.url, "--tiers-file", str(tiers)]
        metering = children.start("metering", metering_args, metering_log, load_cpus)
        _wait_log_line(metering_log, "metering ready", metering, "metering")
        print(f"metering pid {metering.pid} (on the load CPUs, with nats-server)")

        edge_port, metrics_port = free_port(), free_port()
        edge_log = workdir / "edge.log"
        edge_args = [
            sys.executable, "-m", "edge.cli",
            "--nats-url", nats_server.url, "--port", str(edge_port), "--edge-id", "bench-edge",
            "--metrics-port", str(metrics_port),
            "--auth", "required", "--tiers-file", str(tiers), "--socket-rate-limit-per-s", "0",
            # Every bench socket comes from 127.0.0.1: 4000 of them, all reconnecting at once in
            # the storm. The caps per client address are for real clients on many addresses.
            "--address-socket-limit", "0", "--address-upgrades-per-s", "0",
        ]  # fmt: skip
        edge = children.start("edge", edge_args, edge_log, relay_cpus)
        _wait_http_ok(edge_port, "/readyz", edge, "the edge", edge_log)
        print(f"edge pid {edge.pid} on ws://127.0.0.1:{edge_port} (auth required, bench tier)")

        ref_port = free_port()
        ref_log = workdir / "reference.log"
        ref_args = [sys.executable, "-m", "bench.reference_relay", "--nats-url", nats_server.url, "--port", str(ref_port)]
        ref = children.start("reference relay", ref_args, ref_log, relay_cpus)
        _wait_http_ok(ref_port, "/healthz", ref, "the reference relay", ref_log)
        print(f"reference relay pid {ref.pid} on ws://127.0.0.1:{ref_port}")

        targets = {PRODUCT: (edge, edge_port), REFERENCE: (ref, ref_port)}
        names = [only] if only else [PRODUCT, REFERENCE]
        ramp_ended: set[str] = set()  # relays whose realistic ramp has stopped
        for mode, pairs, round_ in _scenarios(plan):
            for name in names:
                if mode == "realistic" and name in ramp_ended:
                    continue
                proc, port = targets[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"the {name} relay exited with {proc.returncode}; see {workdir}")
                cfg = LoadConfig(
                    mac_urls=[f"ws://127.0.0.1:{port}"],
                    pairs=pairs,
                    mode=mode,
                    rate=plan.rate_per_direction,
                    window=plan.window,
                    payload_bytes=plan.payload_bytes,
                    duration_s=plan.realistic_duration_s if mode == "realistic" else plan.duration_s,
                    warmup_s=plan.warmup_s,
                    heartbeat_s=plan.heartbeat_s,
                    idle_macs_per_pair=plan.idle_macs_per_pair,
                    api_key=account.api_key,
                    relay_pid=proc.pid,
                    nats_pid=nats_server.process.pid,
                    # The product's metering shares the load CPUs: the ramp's verdict counts it.
                    other_pids={"metering": metering.pid} if name == PRODUCT and mode == "realistic" else {},
                    label=f"{name} {mode} {pairs}" + (f" (round {round_})" if round_ > 1 else ""),
                )
                report = run_load(cfg)
                report["target"] = name
                report["round"] = round_
                results.append(report)
                print(summary(report), flush=True)
                if mode == "realistic":
                    report["ramp"] = ramp_step(report, load_cores)
                    if not report["ramp"]["held"]:
                        ramp_ended.add(name)
                        ramp = report["ramp"]
                        load = f"load side {ramp['load_cpu']:.2f} of {load_cores} cores" + (
                            ", near its limit: maybe the generator's, not the relay's" if ramp["load_bound"] else ""
                        )
                        print(f"  {name}'s ramp stops at {pairs} pairs: {ramp['why']} ({load})", flush=True)
                # Let the relay finish with the departed sockets (the ramp's are many).
                time.sleep(1.0 + report.get("sockets", 0) / 5000)
        final_rss = {name: proc_rss_kib(proc.pid) for name, (proc, _) in targets.items() if proc.poll() is None}
        # Proof that metering was on and answering: the edge's counters at the end.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            edge_metrics = dict(line.split(" ", 1) for line in response.read().decode().splitlines())
    except Exception:
        for name, log in (
            ("edge", workdir / "edge.log"),
            ("metering", workdir / "metering.log"),
            ("reference relay", workdir / "reference.log"),
        ):
            if log.exists():
                print(f"--- last lines of the {name}'s log ---\n{log.read_text()[-1500:]}", file=sys.stderr)
        raise
    finally:
        children.stop_all()
        if nats_server is not None:
            nats_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    doc = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "quick": quick,
        "command": "python -m bench.run" + (" --quick" if quick else ""),
        "machine": _machine(),
        "pinning": pin_note,
        "plan": plan.__dict__ | {"pairs": list(plan.pairs)},
        "product": "relay-edge: auth required, KV state, accounts, metering on (one relay-metering running)",
        "edge_metrics": edge_metrics,
        "final_rss_kib": final_rss,
        "results": results,
    }
    if "realistic" in plan.modes:
        doc["realistic"] = {name: ramp_summary(results, name) for name in names}
    doc["targets"] = _targets(doc, plan) if not only else []
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if quick else "")
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {path}")
    _print_ramps(doc.get("realistic", {}))
    _print_targets(doc["targets"])
    _plot(doc, path.with_suffix(".png"))
    return path


def _find(results: list[dict[str, Any]], target: str, mode: str, pairs: int) -> dict[str, Any] | None:
    """The first round of a scenario (what the plot shows)."""
    found = _rounds(results, target, mode, pairs)
    return found[0] if found else None


def _rounds(results: list[dict[str, Any]], target: str, mode: str, pairs: int) -> list[dict[str, Any]]:
    """Every round of a scenario, in run order."""
    return [r for r in results if r["target"] == target and r["mode"] == mode and r["pairs"] == pairs]


def _targets(doc: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Each target of the performance issue: the product's figure, the reference's, their ratio."""
    results, top = doc["results"], max(plan.pairs)
    rows = []

    def add(name: str, mode: str, pairs: int, read, bound: float, higher_is_better: bool, absolute: bool) -> None:
        # Rounds pair up in run order: each product round ran right before its reference round.
        rounds = list(zip(_rounds(results, PRODUCT, mode, pairs), _rounds(results, REFERENCE, mode, pairs)))
        products = [read(p) for p, _ in rounds if read(p) is not None]
        references = [read(r) for _, r in rounds if read(r) is not None]
        ratios = [round(read(p) / read(r), 3) for p, r in rounds if read(p) is not None and read(r)]
        pv = round(statistics.median(products), 3) if products else None
        rv = round(statistics.median(references), 3) if references else None
        ratio = round(statistics.median(ratios), 3) if ratios else None
        judged = pv if absolute else ratio
        met = None if judged is None else (judged >= bound if higher_is_better else judged <= bound)
        rows.append({"target": name, "product": pv, "reference": rv, "ratio": ratio, "round_ratios": ratios,
                     "bound": bound, "met": met, "bound_on": "product" if absolute else "ratio",
                     "higher_is_better": higher_is_better})  # fmt: skip

    add(f"{top} pairs at max rate: delivered frames/s", "max", top, lambda r: r["delivered_per_s"],
        THROUGHPUT_RATIO_TARGET, True, False)  # fmt: skip
    add(f"{top} pairs at {2 * plan.rate_per_direction:g} frames/s each: p99 one-way latency (ms)", "rate", top,
        lambda r: r["latency_ms"]["p99"], P99_RATIO_TARGET, False, False)  # fmt: skip
    add(f"{plan.idle_pairs} idle pairs: RSS per connection (KiB)", "idle", plan.idle_pairs,
        lambda r: r["relay"].get("kib_per_connection"), IDLE_KIB_TARGET, False, True)  # fmt: skip
    add(f"{plan.storm_pairs} pairs reconnecting at once: seconds until all paired", "storm", plan.storm_pairs,
        lambda r: r["storm"]["all_paired_s"], STORM_S_TARGET, False, True)  # fmt: skip
    rows.append(_realistic_row(results))
    return rows


def ramp_step(report: dict[str, Any], load_cores: int) -> dict[str, Any]:
    """Whether one step of the realistic ramp held, and if not, why. `load_bound`: the load
    side (the generator, nats-server and what else shares their CPUs: the product's
    metering) used over `LOAD_BOUND` of its `load_cores`, so the limit may have been its own."""
    why = []
    setup = report["setup"]
    failed = setup["failed"] + setup.get("idle_failed", 0)
    if failed:
        why.append(f"{failed} set-ups failed")
    if report.get("lost"):
        why.append(f"{report['lost']} payloads lost")
    if report.get("errors"):
        why.append(f"{report['errors']} errors")
    unanswered = sum(kind.get("unanswered", 0) for kind in report.get("heartbeats", {}).values() if isinstance(kind, dict))
    if unanswered:
        why.append(f"{unanswered} heartbeats unanswered")
    p99 = report["latency_ms"]["p99"]
    if p99 > REALISTIC_P99_MS:
        why.append(f"p99 {p99:.1f} ms > {REALISTIC_P99_MS:g} ms")
    cpu = report["relay"].get("cpu_util")
    if cpu is not None and cpu > REALISTIC_CPU_BOUND:
        why.append(f"relay CPU {cpu:.2f} > {REALISTIC_CPU_BOUND:g} core")
    load = report["loadgen"]["cpu_util"] + report.get("nats", {}).get("cpu_util", 0.0)
    load += sum(other["cpu_util"] for other in report.get("others", {}).values())
    return {
        "held": not why,
        "why": "; ".join(why) or None,
        "load_cpu": round(load, 3),
        "load_bound": load > LOAD_BOUND * load_cores,
    }


def ramp_summary(results: list[dict[str, Any]], target: str) -> dict[str, Any]:
    """One relay's realistic ramp: the largest active-pair count that held (the ramp stops at
    the first that does not), the relay's CPU-seconds per pair per second there, and where
    and why it stopped (`stopped_at` None: every step held, the capacity is higher)."""
    steps = sorted((r for r in results if r["target"] == target and r["mode"] == "realistic"), key=lambda r: r["pairs"])
    largest, cpu_per_pair, stop = 0, None, None
    for r in steps:
        if not r["ramp"]["held"]:
            stop = r
            break
        largest, cpu_per_pair = r["pairs"], r["relay"].get("cpu_per_pair")
    return {
        "largest_held": largest,
        "cpu_per_pair": cpu_per_pair,
        "stopped_at": stop["pairs"] if stop else None,
        "why": stop["ramp"]["why"] if stop else None,
        "load_bound": stop["ramp"]["load_bound"] if stop else False,
        "steps": [
            {"pairs": r["pairs"], "p99_ms": r["latency_ms"]["p99"], "relay_cpu": r["relay"].get("cpu_util"),
             "load_cpu": r["ramp"]["load_cpu"], "held": r["ramp"]["held"]}
            for r in steps
        ],
    }  # fmt: skip


def _realistic_row(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The realistic target: the edge carries ≥ 1.5× the reference's active pairs. A relay
    that held every step only gives a lower bound: a ratio that misses the bound is then
    no verdict (`met` None), and neither is one whose limit was the load side's."""
    ramps = {t: ramp_summary(results, t) for t in (PRODUCT, REFERENCE)}
    product, reference = ramps[PRODUCT], ramps[REFERENCE]
    pv, rv = product["largest_held"], reference["largest_held"]
    ran = any(ramps[t]["steps"] for t in ramps)
    ratio = round(pv / rv, 3) if ran and rv else None
    met, note = None, None
    if ratio is not None:
        met = ratio >= REALISTIC_RATIO_TARGET
        if reference["stopped_at"] is None:
            met, note = None, "the reference held every step: add larger --realistic-steps"
        elif not met and product["stopped_at"] is None:
            met, note = None, "the product held every step: add larger --realistic-steps"
        elif any(ramps[t]["load_bound"] for t in ramps):
            met, note = None, "a ramp stopped with the load side near its CPUs: the limit may be the generator's"
    elif ran and not rv:
        note = "the reference held no step: start --realistic-steps lower"
    return {"target": "realistic: active pairs held (p99 ≤ 50 ms, relay ≤ 0.95 core, 5 idle Macs each)",
            "product": pv if ran else None, "reference": rv if ran else None, "ratio": ratio,
            "round_ratios": [ratio] if ratio is not None else [], "bound": REALISTIC_RATIO_TARGET, "met": met,
            "bound_on": "ratio", "higher_is_better": True, "note": note}  # fmt: skip


def _print_ramps(ramps: dict[str, dict[str, Any]]) -> None:
    if ramps:
        print("\nrealistic ramp (active pairs, each with idle Macs):")
    for name, ramp in ramps.items():
        cpu = f"{ramp['cpu_per_pair'] * 1e3:.3f} ms CPU per pair per second" if ramp["cpu_per_pair"] is not None else "no CPU figure"
        if ramp["stopped_at"] is None:
            end = "every step held"
        else:
            end = f"stopped at {ramp['stopped_at']}: {ramp['why']}"
            if ramp["load_bound"]:
                end += " (the load side was near its CPUs: maybe the generator's limit)"
        print(f"  {name}: held {ramp['largest_held']} pairs, {cpu}; {end}")


def _print_targets(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\ntargets (product / reference):")
    for row in rows:
        bound = ("≥" if row["higher_is_better"] else "≤") + f" {row['bound']:g}"
        bound += " (ratio)" if row["bound_on"] == "ratio" else " (product)"
        verdict = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        if len(row.get("round_ratios", [])) > 1:
            ratio += " (median of " + ", ".join(f"{r:.2f}" for r in row["round_ratios"]) + ")"
        print(f"  {row['target']}: product {row['product']}, reference {row['reference']}, ratio {ratio}; "
              f"target {bound}: {verdict}" + (f" ({row['note']})" if row.get("note") else ""))  # fmt: skip


def _plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against pairs, product against reference, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("no plot: matplotlib is missing (pip install -e '.[bench]', or make bench)")
        return
    results = doc["results"]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {PRODUCT: ("tab:blue", "termrelay edge"), REFERENCE: ("tab:gray", "reference relay")}
    for target, (color, name) in styles.items():
        for mode, ls, what in (("max", "-", "max rate"), ("rate", "--", "10 frames/s per pair")):
            rows = sorted(
                (r for r in results if r["target"] == target and r["mode"] == mode and r.get("round", 1) == 1),
                key=lambda r: r["pairs"],
            )
            if not rows:
                continue
            xs = [r["pairs"] for r in rows]
            if mode == "max":
                ax_tp.plot(xs, [r["delivered_per_s"] for r in rows], ls, color=color, marker="o", label=name)
            ax_lat.plot(xs, [r["latency_ms"]["p99"] for r in rows], ls, color=color, marker="o", label=f"{name}, {what}")
        ramp = sorted((r for r in results if r["target"] == target and r["mode"] == "realistic"), key=lambda r: r["pairs"])
        if ramp:
            ax_lat.plot([r["pairs"] for r in ramp], [r["latency_ms"]["p99"] for r in ramp], ":", color=color, marker="s",
                        label=f"{name}, realistic (active pairs)")  # fmt: skip
    ax_tp.set(xscale="log", xlabel="pairs", ylabel="delivered frames/s", title="Throughput at max rate")
    ax_lat.set(xscale="log", yscale="log", xlabel="pairs", ylabel="p99 one-way latency (ms)", title="p99 latency")
    ax_tp.set_ylim(bottom=0)
    ticks = sorted({r["pairs"] for r in results if r["mode"] in ("max", "rate", "realistic")})
    for ax in (ax_tp, ax_lat):
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    machine = doc["machine"]
    fig.suptitle(
        f"{doc['command']} · {doc['started_at']} · {machine['cpu']}, {machine['cores']} cores · "
        f"{doc['plan']['payload_bytes']}-byte payloads",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1, 10, 50 pairs (ramp 10, 25, 50), 3 s each: a check, not a measurement")
    parser.add_argument("--only", choices=(PRODUCT, REFERENCE), help="measure one relay (no ratios)")
    parser.add_argument("--modes", help="comma-separated subset of idle,max,rate,realistic,storm (default: all)")
    parser.add_argument("--pairs", help="comma-separated pair counts for max and rate (default: 1,100,1000)")
    parser.add_argument("--repeat", type=int, help="rounds of max and rate at the largest pair count (default: 3; --quick: 1)")
    parser.add_argument("--heartbeat", type=float, help="seconds between one socket's heartbeats (default: 20)")
    parser.add_argument("--storm-pairs", type=int, help="pairs in the reconnect storm (default: 2000; --quick: 50)")
    parser.add_argument(
        "--realistic-steps", help="comma-separated active-pair counts of the realistic ramp (default: 100,200,400,800,1200,1600,2000)"
    )
    parser.add_argument("--realistic-duration", type=float, help="measured seconds per ramp step (default: 10; --quick: 3)")
    parser.add_argument("--idle-macs-per-pair", type=int, help="idle Macs beside each active pair in the ramp (default: 5)")
    parser.add_argument("--nats-sync-always", action="store_true", help="nats-server fsyncs every JetStream write (deploy/nats.conf)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else STANDARD
    if args.modes:
        plan = dataclasses.replace(plan, modes=tuple(m.strip() for m in args.modes.split(",")))
    if args.pairs:
        plan = dataclasses.replace(plan, pairs=tuple(int(n) for n in args.pairs.split(",")))
    if args.repeat:
        plan = dataclasses.replace(plan, repeat=max(1, args.repeat))
    if args.realistic_steps:
        plan = dataclasses.replace(plan, realistic_steps=tuple(int(n) for n in args.realistic_steps.split(",")))
    if args.realistic_duration:
        plan = dataclasses.replace(plan, realistic_duration_s=args.realistic_duration)
    if args.idle_macs_per_pair is not None:
        plan = dataclasses.replace(plan, idle_macs_per_pair=max(0, args.idle_macs_per_pair))
    if args.storm_pairs:
        plan = dataclasses.replace(plan, storm_pairs=max(1, args.storm_pairs))
    if args.nats_sync_always:
        plan = dataclasses.replace(plan, nats_sync_always=True)
    if args.heartbeat is not None:
        if args.heartbeat <= 0:
            parser.error("--heartbeat must be a positive number of seconds")
        plan = dataclasses.replace(plan, heartbeat_s=args.heartbeat)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the same clean-up path as Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run_benchmark(plan, args.quick, args.only)
    except KeyboardInterrupt:
        print("interrupted: every child process has been ended", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
