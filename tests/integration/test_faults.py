"""Faults under load, with exact accounting (issue 15).

Traffic from `tests/topology_traffic.py` (pairs through nginx, a numbered frame each way
every 100 ms, clients reconnecting as the Mac agent does) runs over the production
topology (`tests/topology.py`: three NATS nodes at R3, three edges, two metering
processes, nginx, each in a network namespace of its own) while a fault is made. After
each fault:

(a) no frame is duplicated or reordered in any direction, and none reaches another pair;
(b) frames are lost only in the documented windows, each counted with its cause: refused
    with `error NO_PEER` (the peer was away: protocol.md §4.6), or in flight on a socket
    that ended (its own or its peer's, within the in-flight window), or in flight to a peer
    socket that a new one replaced (the sender heard a new `peer_joined`: README, "Frames of one
    direction arrive in order and at most once; frames in flight when a socket is replaced
    or its edge dies are dropped");
(c) every pair is paired again, and frames flow both ways on it;
(d) usage: the message credits added to the local user's ledger (bucket `relay_usage`;
    the edges run `RELAY_AUTH=none`, every pair is that one user, 1 credit per forwarded
    frame, charged by the sender's edge, refunded when answered NO_PEER) equal the frames
    the receivers got, R, except for what the README documents: a frame charged and then
    lost in flight (not refunded: at most the lost frames not refused, `over`), and the
    counts an edge SIGKILLed had not published (at most one usage flush interval and
    refund window, `RELAY_USAGE_FLUSH_INTERVAL_MS` + `RELAY_USAGE_REFUND_WINDOW_MS`, 2 s,
    of the traffic of its sockets, `under`):
    R - under <= credits <= R + over; with no edge killed and nothing lost in flight,
    credits == R exactly;
(e) the servers hold as many client connections, client subscriptions and live JetStream
    consumers (durable, pull, or push with a subscriber) as before the fault, within a
    grace period; consumers that lost their subscriber and wait for the server to reap
    them (nats-py's KV watchers: `inactive_threshold` 300 s) are counted and reported,
    and must be younger than that threshold.

Default suite: three quick variants on one topology (`test_quick_*`, 40 pairs, short
lease). The full matrix (200 pairs, production settings, the documented durations) is
marked `faults` and deselected by default:

    .venv/bin/python -m pytest tests/integration/test_faults.py -m faults -s
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.test_topology import LOOPBACK, no_sockets_left
from tests.topology import LOCAL_USER, FaultUnavailable, NginxMissing, Topology
from tests.topology_traffic import OTHER, TrafficDriver, TrafficReport

#: Every cause of a lost frame that is documented (see the module's docstring).
DOCUMENTED_LOSSES = frozenset({"refused", "sender_socket_ended", "session_replaced", "receiver_socket_ended"})
USAGE_UNPUBLISHED_S = 2.0  # RELAY_USAGE_FLUSH_INTERVAL_MS + RELAY_USAGE_REFUND_WINDOW_MS, the edges' defaults
SEND_INTERVAL_S = 0.1

# The quick topology (default suite): a 2 s lease (peers of a killed edge hear `timeout`
# within 2 s + ~1 s even when idle), a short drain, metering claims of 5 s.
QUICK_EDGE = {"edge_lease_ttl_ms": 2000, "drain_grace_ms": 500, "drain_ms": 1500}
QUICK_METERING = {"partition_lease_ms": 5000}
QUICK_PAIRS = 40
#: Unlimited rooms and credits for the local user (premium): 200 pairs charge 4,000 credits/s,
#: and the tier's 50,000 a window would close every socket (`quota_exceeded`, 1000) in 13 s.
TIERS = "[tiers.premium]\nmax_rooms = -1\ncredits_per_window = -1\n"


def run(coro: Awaitable[Any], timeout: float) -> Any:
    """Run a scenario in its own event loop with its own time limit (the conftest's 60 s
    limit for `async def` tests is too short for the full matrix)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def start_topology(**kwargs: Any) -> Topology:
    try:
        topo = Topology(loopback=LOOPBACK, tiers_toml=TIERS, **kwargs).start()
    except NginxMissing as exc:
        pytest.skip(f"the topology needs nginx: {exc}")
    if not topo.isolated:
        print(f"NOTE: the topology runs on loopback ports, not in namespaces: {topo.why_not_isolated}")
    return topo


@pytest.fixture(scope="module")
def quick_topology() -> Iterator[Topology]:
    topo = start_topology(edge_settings=QUICK_EDGE, metering_settings=QUICK_METERING)
    try:
        yield topo
    finally:
        topo.stop()


# --- reading usage and the servers ------------------------------------------------------------


class Observer:
    """A NATS connection of the test's own, to read the local user's ledger."""

    def __init__(self, nc: Any, reader: Any) -> None:
        self.nc, self.reader = nc, reader

    @classmethod
    async def open(cls, topo: Topology) -> "Observer":
        import nats

        from metering.usage import UsageReader
        from schemas.subjects import USAGE_BUCKET

        nc = await nats.connect(servers=topo.nats_urls, name="test-observer", max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5)
        return cls(nc, UsageReader(await nc.jetstream(timeout=10).key_value(USAGE_BUCKET)))

    async def credits(self) -> int:
        """The local user's message credits, over every window on record."""
        ledger = await self.reader.ledger(LOCAL_USER)
        return sum(w.message_tokens for w in ledger.windows)

    async def settled(self, *, low: int = 0, high: int | None = None, stable_s: float = 3.0, timeout: float = 60.0) -> int:
        """The credits once they are in [low, high] and have not changed for `stable_s`."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            try:
                value = await self.credits()
            except Exception as exc:  # noqa: BLE001 - storage recovering: try again
                value = None
                print(f"reading the ledger: {type(exc).__name__}: {exc}")
            now = time.monotonic()
            if value != last:
                last, since = value, now
            elif value is not None and value >= low and (high is None or value <= high) and now - since >= stable_s:
                return value
            if now > deadline:
                raise AssertionError(f"usage did not settle in [{low}, {high}] within {timeout:.0f}s: last {last}")
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        await self.nc.close()


@dataclass
class ServerCounts:
    connections: int
    client_subscriptions: int
    live_consumers: frozenset[tuple[str, str]]
    lingering: list[tuple[str, str, float, float]]  # stream, name, age s, inactive_threshold s
    per_node: dict[str, dict[str, int]] = field(default_factory=dict)
    subscriptions_by_client: dict[str, Counter] = field(default_factory=dict)  # client name -> subjects

    def same_as(self, other: "ServerCounts") -> bool:
        return (
            self.connections == other.connections
            and self.client_subscriptions == other.client_subscriptions
            and len(self.live_consumers) == len(other.live_consumers)
        )

    def describe(self) -> str:
        return (
            f"{self.connections} client connections, {self.client_subscriptions} client subscriptions, "
            f"{len(self.live_consumers)} live consumers, {len(self.lingering)} lingering (no subscriber, awaiting the server's reaping"
            f"{': ' + str(dict(Counter(s for s, *_ in self.lingering))) if self.lingering else ''})"
        )


def _age_s(created: str, now: str) -> float:
    from datetime import datetime

    def parse(ts: str) -> float:
        head, _, frac = ts.rstrip("Z").partition(".")
        return datetime.fromisoformat(head + "+00:00").timestamp() + (float("0." + frac) if frac else 0.0)

    return parse(now) - parse(created)


def server_counts(topo: Topology) -> ServerCounts:
    """Client connections and their subscriptions (`/connz?subs=1`), and JetStream
    consumers (`/jsz?consumers=true&config=true`) on every running node."""
    connections = subscriptions = 0
    live: set[tuple[str, str]] = set()
    lingering: dict[tuple[str, str], tuple[float, float]] = {}
    per_node: dict[str, dict[str, int]] = {}
    by_client: dict[str, Counter] = {}
    for p in topo.nats:
        if not p.running:
            continue
        connz = topo.monitor(p.name, "/connz?subs=1&limit=4096")
        conns = connz["connections"] or []
        node_subs = sum(len(c.get("subscriptions_list") or []) for c in conns)
        for c in conns:
            by_client.setdefault(c.get("name") or f"cid {c.get('cid')}", Counter()).update(_shape(x) for x in c.get("subscriptions_list") or [])
        connections += connz["num_connections"]
        subscriptions += node_subs
        jsz = topo.monitor(p.name, "/jsz?consumers=true&config=true")
        consumers = 0
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                for c in stream.get("consumer_detail") or []:
                    consumers += 1
                    key = (stream["name"], c["name"])
                    config = c.get("config") or {}
                    if config.get("durable_name") or not config.get("deliver_subject") or c.get("push_bound"):
                        live.add(key)
                    else:
                        threshold = (config.get("inactive_threshold") or 0) / 1e9
                        lingering[key] = (_age_s(c["created"], c.get("ts") or jsz["now"]), threshold)
        per_node[p.name] = {"connections": connz["num_connections"], "client_subscriptions": node_subs, "consumers": consumers}
    live_keys = frozenset(live)
    return ServerCounts(
        connections, subscriptions, live_keys,
        sorted((s, n, age, th) for (s, n), (age, th) in lingering.items() if (s, n) not in live_keys), per_node, by_client,
    )  # fmt: skip


def _shape(subject: str) -> str:
    """A subscription's subject with its random tokens (inboxes, ids) blanked out."""
    return ".".join("*" if len(tok) >= 16 or tok.startswith("_INBOX") else tok for tok in subject.split("."))


async def steady_counts(topo: Topology, timeout: float = 60.0) -> ServerCounts:
    """The servers' counts once they hold still: every usage partition owned (shared out
    between the metering processes running) and the same counts three reads in a row."""
    deadline = time.monotonic() + timeout
    seen: list[ServerCounts] = []
    while True:
        owned = [(await topo.ametrics(m.name)).get("relay_metering_partitions_owned", 0.0) for m in topo.meterings if m.running]
        counts = await asyncio.to_thread(server_counts, topo)
        shared = sum(owned) == 16 and all(n > 0 for n in owned)
        seen = (seen + [counts])[-3:] if shared else []
        if len(seen) == 3 and all(c.same_as(seen[0]) for c in seen):
            return counts
        assert time.monotonic() < deadline, f"the servers' counts never held still: partitions owned {owned}, {counts.describe()}"
        await asyncio.sleep(1.0)


def _subs_diff(a: ServerCounts, b: ServerCounts) -> dict[str, dict[str, Any]]:
    out = {}
    for name in sorted(set(a.subscriptions_by_client) | set(b.subscriptions_by_client)):
        x, y = a.subscriptions_by_client.get(name, Counter()), b.subscriptions_by_client.get(name, Counter())
        if x != y:
            out[name] = {"gone": dict(x - y), "new": dict(y - x)}
    return out


def overdue(counts: ServerCounts) -> list[tuple[str, str, float, float]]:
    """Consumers without a subscriber older than their inactive threshold (and a margin)."""
    return [c for c in counts.lingering if c[2] > c[3] + 30]


async def overdue_consumers_reaped(topo: Topology, counts: ServerCounts, timeout: float = 180.0) -> tuple[ServerCounts, float]:
    """Wait for consumers past their inactive threshold to be reaped. A node cut off from
    the cluster reaps consumers created through it late (71 s after a 5 s threshold once):
    late is no leak, never is. Returns the counts then and how long it took."""
    t0 = time.monotonic()
    while overdue(counts) and time.monotonic() - t0 < timeout:
        await asyncio.sleep(2.0)
        counts = await asyncio.to_thread(server_counts, topo)
    return counts, round(time.monotonic() - t0, 1)


async def counts_back_to(topo: Topology, before: ServerCounts, grace_s: float) -> tuple[ServerCounts, float]:
    """Wait (up to `grace_s`) until the servers hold what they held before; returns the
    counts and how long it took. Fails with both if they never come back."""
    t0 = time.monotonic()
    while True:
        now_counts = await asyncio.to_thread(server_counts, topo)
        if now_counts.same_as(before):
            return now_counts, time.monotonic() - t0
        if time.monotonic() - t0 > grace_s:
            extra = sorted(now_counts.live_consumers - before.live_consumers)
            missing = sorted(before.live_consumers - now_counts.live_consumers)
            raise AssertionError(
                f"the servers did not come back to their counts within {grace_s:.0f}s:\n before {before.describe()} {before.per_node}\n"
                f" after  {now_counts.describe()} {now_counts.per_node}\n live consumers added {extra[:10]}, gone {missing[:10]}\n"
                f" subscriptions by client, changed: {_subs_diff(before, now_counts)}"
            )
        await asyncio.sleep(1.0)


# --- one run: traffic, a fault, the accounting -------------------------------------------------


@dataclass
class Run:
    topo: Topology
    report: TrafficReport
    fault_at: float
    recovered_at: float
    credits: int  # message credits added to the ledger during the run
    counts_before: ServerCounts
    counts_after: ServerCounts
    counts_back_s: float
    notes: dict[str, Any]
    usage_under: int = 0
    usage_over: int = 0

    def repair(self) -> dict[int, float | None]:
        return self.report.repair_times(self.fault_at)


Fault = Callable[[Topology, TrafficDriver, float, dict[str, Any]], Awaitable[None]]


async def fault_run(
    topo: Topology,
    fault: Fault,
    *,
    pairs: int,
    before_s: float = 3.0,
    after_s: float = 3.0,
    repair_timeout: float = 60.0,
    inflight_window_s: float = 1.0,
    usage_timeout: float = 60.0,
    leak_grace_s: float = 60.0,
    killed_edge_window: tuple[float, float] | None = None,
) -> Run:
    """Traffic of `pairs` pairs for `before_s`, then `fault(topo, driver, fault_at, notes)`
    (which makes the fault and undoes it), then until every pair is paired again, `after_s`
    more, then the accounting. `killed_edge_window` (seconds after the fault): sockets that
    ended then without a close frame were on an edge SIGKILLed, whose unpublished usage may
    be lost (`under`)."""
    await no_sockets_left(topo)
    observer = await Observer.open(topo)
    try:
        credits_before = await observer.settled(stable_s=2.0)
        counts_before = await steady_counts(topo)
        notes: dict[str, Any] = {}
        driver = TrafficDriver(topo.url, pairs=pairs, interval_s=SEND_INTERVAL_S)
        try:
            await driver.start()
            notes["setup_s"] = driver.setup_seconds
            await driver.mark_cpu()
            await asyncio.sleep(before_s)
            fault_at = time.monotonic()
            try:
                await fault(topo, driver, fault_at, notes)
                recovered_at = await driver.wait_all_paired(timeout=repair_timeout, settle=1.0)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{await not_recovered(topo, driver, fault_at, notes)}") from None
            await asyncio.sleep(after_s)
            notes["driver_cpu_cores"] = await driver.cpu_since_mark()
            report = await driver.collect()
        finally:
            await driver.close()
        report.analyse(inflight_window_s)
        received = report.received
        over = sum(n for cause, n in report.lost_by_cause().items() if cause != "refused")
        under = 0
        if killed_edge_window is not None:
            lo, hi = killed_edge_window
            on_killed = [s for s in report.sockets_ended_between(fault_at + lo, fault_at + hi) if _socket(report, s)["code"] is None]
            under = report.received_sent_on(on_killed, since=fault_at - USAGE_UNPUBLISHED_S - 0.5)
            notes["sockets_on_killed_edge"] = len(on_killed)
        try:
            after = await observer.settled(low=credits_before + received - under, high=credits_before + received + over, timeout=usage_timeout)
        except AssertionError as exc:
            dump(Run(topo, report, fault_at, recovered_at, 0, counts_before, None, 0.0, {**notes, "fault": notes.get("fault", "?") + " (usage unsettled)"}))  # type: ignore[arg-type]
            raise AssertionError(f"{exc} (credits before the run: {credits_before}; {received} frames received)\n{await diagnose(topo)}\n{report.summary(fault_at)}") from None
        credits = after - credits_before
        await no_sockets_left(topo)
        counts_after, back_s = await counts_back_to(topo, counts_before, leak_grace_s)  # the observer still connected
        counts_after, notes["overdue_consumers_reaped_s"] = await overdue_consumers_reaped(topo, counts_after)
    finally:
        await observer.close()
    r = Run(topo, report, fault_at, recovered_at, credits, counts_before, counts_after, back_s, notes, under, over)
    print_run(r)
    dump(r)
    return r


def dump(r: Run) -> None:
    """With RELAY_TEST_FAULTS_DUMP=DIR, keep the run's records (a pickle per run) to study."""
    folder = os.environ.get("RELAY_TEST_FAULTS_DUMP")
    if not folder:
        return
    import pickle

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{time.strftime('%H%M%S')}-{r.notes.get('fault', 'run').split()[0]}.pickle")
    with open(path, "wb") as f:
        pickle.dump({"report": r.report, "fault_at": r.fault_at, "notes": r.notes, "credits": r.credits}, f)
    logs = path.removesuffix(".pickle") + "-logs"
    os.makedirs(logs, exist_ok=True)
    for p in r.topo.procs.values():  # the processes' logs, from the run's start
        if p.log_path is not None and p.log_path.exists():
            shutil.copy(p.log_path, os.path.join(logs, p.log_path.name))
    print(f"records: {path}, logs: {logs}")


async def not_recovered(topo: Topology, driver: TrafficDriver, fault_at: float, notes: dict[str, Any]) -> str:
    """What the clients and the edges say when pairs did not come back."""
    report = await driver.collect(drain_s=0.5)
    dump(Run(topo, report, fault_at, fault_at, 0, None, None, 0.0, {**notes, "fault": notes.get("fault", "?") + " (not recovered)"}))  # type: ignore[arg-type]
    recent = report.connect_failures(since=time.monotonic() - 30)
    lines = [report.summary(fault_at), f"notes {notes}", f"failed connection attempts in the last 30 s: {dict(recent.most_common(8))}"]
    for e in topo.edges:
        ready = topo.is_ready(e.name)
        lines.append(f"{e.name}: running {e.running}, ready {ready}; log tail:\n{e.log_text()[-1500:]}")
    return "\n".join(lines)


async def diagnose(topo: Topology) -> str:
    """What the metering processes say (metrics, the end of their logs), for a failure."""
    out = []
    for m in topo.meterings:
        if not m.running:
            out.append(f"{m.name}: not running")
            continue
        metrics = await topo.ametrics(m.name)
        keys = ("relay_metering_partitions_owned", "relay_metering_batches_applied_total", "relay_metering_usage_pending", "relay_metering_batches_dropped_total")
        out.append(f"{m.name}: {({k: metrics.get(k) for k in keys})}\n{m.log_text()[-2500:]}")
    return "\n".join(out)


def _socket(report: TrafficReport, s: tuple[int, str, int]) -> dict[str, Any]:
    index, role, k = s
    return report.pairs[index][role].sockets[k]


def print_run(r: Run) -> None:
    rep = r.report
    rt = [v for v in r.repair().values() if v is not None]
    print(f"\n--- {r.notes.get('fault', '?')}: {len(rep.pairs)} pairs")
    print(rep.summary(r.fault_at))
    print(
        f"usage: {r.credits} credits for {rep.received} frames received (difference {r.credits - rep.received:+d}; "
        f"allowed -{r.usage_under}..+{r.usage_over})"
    )
    print(f"every pair paired again {r.recovered_at - r.fault_at:.2f}s after the fault" + (f"; disrupted pairs re-paired in max {max(rt):.2f}s" if rt else ""))
    print(f"servers before: {r.counts_before.describe()}")
    print(f"servers after ({r.counts_back_s:.1f}s): {r.counts_after.describe()}")
    print(f"notes: {r.notes}")


def check_accounting(r: Run, allowed: frozenset[str] = DOCUMENTED_LOSSES) -> None:
    """(a)-(d) of the module's docstring; (e) was checked by `fault_run`."""
    rep = r.report
    assert rep.duplicates == {"mac": 0, "ios": 0}, f"duplicated frames: {rep.duplicates}"
    assert rep.reorderings == {"mac": 0, "ios": 0}, f"reordered frames: {rep.reorderings}"
    assert rep.misrouted == [], f"frames of another pair: {rep.misrouted[:5]}"
    assert rep.unexpected_count == 0, f"messages a client did not expect: {rep.unexpected[:5]}"
    causes = rep.lost_by_cause()
    undocumented = {c: n for c, n in causes.items() if c not in allowed}
    assert not undocumented, f"frames lost outside the documented windows: {undocumented}; first: {describe_lost(r, [l for l in rep.lost if l.cause not in allowed][:5])}"
    assert rep.refusals_unmatched == [], f"NO_PEER for frames that arrived: {rep.refusals_unmatched[:5]}"
    assert rep.unpaired_at_end() == [], f"pairs not paired at the end: {rep.unpaired_at_end()[:10]}"
    assert rep.silent_tail(1.0) == [], f"directions whose last second of frames never arrived: {rep.silent_tail(1.0)[:10]}"
    assert rep.received - r.usage_under <= r.credits <= rep.received + r.usage_over, (r.credits, rep.received, r.usage_under, r.usage_over)
    for _stream, _name, age, threshold in r.counts_after.lingering:
        assert age <= threshold + 30, f"a consumer without subscriber older than its inactive threshold: {_stream} {_name} {age:.0f}s > {threshold:.0f}s"


def describe_lost(r: Run, lost: list[Any]) -> str:
    out = []
    for l in lost:  # noqa: E741
        sides = r.report.pairs[l.pair]
        mine, theirs = sides[l.sender], sides[OTHER[l.sender]]
        out.append(
            f"pair {l.pair} {l.sender}->{OTHER[l.sender]} seq {l.seq} sent {l.sent_at - r.fault_at:+.2f}s ({l.cause}); "
            f"sender sockets {[_fmt_socket(s, r.fault_at) for s in mine.sockets]}; receiver sockets {[_fmt_socket(s, r.fault_at) for s in theirs.sockets]}"
        )
    return "\n".join(out)


def _fmt_socket(s: dict[str, Any], t0: float) -> str:
    ended = f"{s['ended'] - t0:+.2f}" if s["ended"] is not None else "-"
    return f"[{s['opened'] - t0:+.2f}..{ended} code {s['code']} joined {[round(x - t0, 2) for x in s['paired']]} left {[(round(a - t0, 2), w) for a, w in s['unpaired']]} errors {Counter(c for _, c in s['errors'])}]"


def peer_timeouts(r: Run, window: float = 2.0) -> list[float]:
    """For every socket that ended without a close frame within `window` s of the fault (on
    the edge SIGKILLed), whose peer's socket lived on: when (after the fault) the peer heard
    `peer_disconnected`, with which reason. Fails if a peer never heard it."""
    rep, t0 = r.report, r.fault_at
    waited = []
    for index, role, k in rep.sockets_ended_between(t0, t0 + window):
        s = rep.pairs[index][role].sockets[k]
        if s["code"] is not None:
            continue
        peer = rep.pairs[index][OTHER[role]]
        peer_k = peer.socket_at(s["ended"])
        if peer_k is None:
            continue
        ps = peer.sockets[peer_k]
        if ps["ended"] is not None and ps["ended"] - t0 <= window:
            continue  # both sides were on the killed edge
        told = [(at, why) for at, why in ps["unpaired"] if at >= t0 and why != "socket_ended"]
        assert told, f"pair {index}: the {OTHER[role]} never heard peer_disconnected after its {role}'s edge was killed: {_fmt_socket(ps, t0)}"
        at, why = told[0]
        assert why == "timeout", f"pair {index}: peer_disconnected reason {why!r}, expected 'timeout'"
        waited.append(at - t0)
    return waited


# --- the faults ----------------------------------------------------------------------------------


def edge_kill(victim: str, restart: bool = True) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = f"{victim} SIGKILLed"
        notes["sockets_on_victim"] = int((await topo.ametrics(victim)).get("relay_connections", 0))
        topo.kill(victim)
        notes["repaired_s"] = await driver.wait_all_paired(timeout=60) - at
        if restart:
            await topo.arestart(victim)
            notes["restarted_s"] = time.monotonic() - at

    return fault


def edge_drain(victim: str) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = f"{victim} drained (SIGTERM)"
        notes["sockets_on_victim"] = int((await topo.ametrics(victim)).get("relay_connections", 0))
        topo.drain(victim)
        code = await topo.await_exit(victim, timeout=120)
        notes["drain_exit_s"] = time.monotonic() - at
        assert code == 0, f"{victim} exited {code} after its drain"
        notes["repaired_s"] = await driver.wait_all_paired(timeout=60) - at
        await topo.arestart(victim)

    return fault


def nginx_reload() -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = "nginx reloaded"
        await asyncio.to_thread(topo.reload_nginx)
        notes["reload_s"] = time.monotonic() - at
        await asyncio.sleep(2)

    return fault


async def metering_owner(topo: Topology, seconds: float = 3.0) -> str:
    """The metering process applying the local user's usage (its partition's owner): the one
    whose applied batches grow while traffic flows (every pair is that one user)."""
    before = {m.name: (await topo.ametrics(m.name)).get("relay_metering_batches_applied_total", 0.0) for m in topo.meterings if m.running}
    await asyncio.sleep(seconds)
    after = {m: (await topo.ametrics(m)).get("relay_metering_batches_applied_total", 0.0) for m in before}
    growing = [m for m in before if after[m] > before[m]]
    assert len(growing) == 1, f"expected one metering process applying the user's batches, got {growing} ({before} -> {after})"
    return growing[0]


def metering_kill() -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        owner = await metering_owner(topo)
        other = next(m.name for m in topo.meterings if m.name != owner)
        notes["fault"] = f"{owner} (the owner of the user's partition) SIGKILLed"
        base = (await topo.ametrics(other)).get("relay_metering_batches_applied_total", 0.0)
        killed_at = time.monotonic()
        topo.kill(owner)
        deadline = killed_at + 60
        while (await topo.ametrics(other)).get("relay_metering_batches_applied_total", 0.0) <= base:
            assert time.monotonic() < deadline, f"{other} never took the partition over"
            await asyncio.sleep(0.1)
        notes["takeover_s"] = time.monotonic() - killed_at
        await topo.arestart(owner)

    return fault


# --- a test of the accounting itself (no topology: it must be able to fail) ---------------------


def _synthetic_report() -> TrafficReport:
    """Two pairs: pair 0 clean; pair 1 with a duplicate, a reordering, a frame refused
    NO_PEER and a frame lost for nothing, to show each is found."""
    from array import array

    from tests.topology_traffic import SENT_OPEN, SideRecord

    def side(sent: int, recv: list[int], errors: list[tuple[float, str]] = ()) -> SideRecord:  # type: ignore[assignment]
        sock = {"connect_started": 0.0, "opened": 0.0, "ended": None, "code": None, "paired": [0.0], "unpaired": [], "errors": list(errors), "gave_up": None}
        return SideRecord(
            array("d", [1.0 + 0.1 * k for k in range(sent)]), array("b", [SENT_OPEN] * sent), array("i", [0] * sent),
            array("q", recv), array("d", [1.0 + 0.1 * k + 0.01 for k in range(len(recv))]), array("i", [0] * len(recv)), [sock], [],
        )  # fmt: skip

    pairs = {
        0: {"mac": side(5, [0, 1, 2, 3, 4]), "ios": side(5, [0, 1, 2, 3, 4])},
        # The Mac sent 0..5: the iPhone got 0,1,1 (duplicate),3,2 (reordered) — 4 refused
        # (NO_PEER at 1.45), 5 lost for nothing. The iPhone's frames all arrived.
        1: {"mac": side(6, [0, 1, 2, 3, 4], errors=[(1.45, "NO_PEER")]), "ios": side(5, [0, 1, 1, 3, 2])},
    }
    report = TrafficReport(pairs, 0.1, 10.0, [], [], 0)
    report.analyse()
    return report


def test_the_accounting_finds_duplicates_reorderings_refusals_and_unexplained_losses():
    report = _synthetic_report()
    assert report.duplicates == {"mac": 1, "ios": 0}
    assert report.reorderings == {"mac": 1, "ios": 0}
    assert [(l.pair, l.sender, l.seq, l.cause) for l in report.lost] == [(1, "mac", 4, "refused"), (1, "mac", 5, "unexplained")]  # noqa: E741
    assert report.refusals_unmatched == []


def test_the_accounting_takes_a_frame_to_a_peer_socket_that_had_ended_for_one_in_flight_to_it():
    # A register during a restart of the whole NATS cluster named a peer socket that had
    # ended (its slot's release waited for storage): the Mac's frames went to that socket,
    # not to the iPhone's new one, and were lost when peer_disconnected came first.
    from array import array

    from tests.topology_traffic import SENT_OPEN, SideRecord

    def sock(opened, ended, nonce, paired=(), paired_with=(), unpaired=()):
        return {"connect_started": opened, "opened": opened, "ended": ended, "code": None, "paired": list(paired),
                "paired_with": list(paired_with), "unpaired": list(unpaired), "errors": [], "gave_up": None, "nonce": nonce}  # fmt: skip

    ios_sockets = [sock(0.0, 2.0, "old-ios"), sock(8.2, None, "new-ios", paired=[8.3], paired_with=["mac"])]
    mac_sockets = [sock(7.0, None, "mac", paired=[7.1, 8.5], paired_with=["old-ios", "new-ios"], unpaired=[(8.49, "server_restart")])]
    mac = SideRecord(array("d", [8.4]), array("b", [SENT_OPEN]), array("i", [0]), array("q"), array("d"), array("i"), mac_sockets, [])
    ios = SideRecord(array("d"), array("b"), array("i"), array("q"), array("d"), array("i"), ios_sockets, [])
    report = TrafficReport({0: {"mac": mac, "ios": ios}}, 0.1, 10.0, [], [], 0)
    report.analyse(inflight_window_s=30)
    assert [(l.sender, l.cause) for l in report.lost] == [("mac", "receiver_socket_ended")]  # noqa: E741
    # Addressed by the socket open at the time instead (the iPhone's new one, alive), the
    # same frame looked lost without a word before a peer_disconnected.
    for s in mac_sockets:
        del s["paired_with"]
    report.analyse(inflight_window_s=30)
    assert [l.cause for l in report.lost] == ["before_peer_disconnected"]  # noqa: E741


# --- the default suite: quick variants ----------------------------------------------------------


def test_quick_an_edge_sigkilled_under_load_loses_only_frames_in_flight_and_usage_within_a_flush(quick_topology):
    topo = quick_topology
    r = run(fault_run(topo, edge_kill("edge2"), pairs=QUICK_PAIRS, before_s=3, after_s=2, killed_edge_window=(0.0, 2.0)), 150)
    check_accounting(r)
    waited = peer_timeouts(r)
    assert waited, "no pair had one side on the killed edge"
    print(f"peers of the killed edge's sockets heard `timeout` {min(waited):.2f}-{max(waited):.2f}s after the SIGKILL")
    # README: "at its first frame: one round trip" — each peer sends a frame every 100 ms.
    assert max(waited) <= SEND_INTERVAL_S + 1.0, waited
    assert r.notes["sockets_on_victim"] > 0


def test_quick_a_metering_process_sigkilled_under_load_costs_no_credit(quick_topology):
    topo = quick_topology
    r = run(fault_run(topo, metering_kill(), pairs=QUICK_PAIRS, before_s=1, after_s=2, usage_timeout=60), 150)
    check_accounting(r)
    assert r.report.lost == [], "a metering fault must not cost a frame"
    assert r.credits == r.report.received, "exactly once: every frame received is one credit"
    # README: a killed owner's partitions go to another after RELAY_PARTITION_LEASE_MS (+ a renewal).
    assert r.notes["takeover_s"] <= QUICK_METERING["partition_lease_ms"] / 1000 * (1 + 1 / 3) + 1.5, r.notes


def test_quick_an_edge_drained_and_nginx_reloaded_under_load_lose_only_refused_or_in_flight_frames(quick_topology):
    topo = quick_topology
    r = run(fault_run(topo, nginx_reload(), pairs=QUICK_PAIRS, before_s=1, after_s=1), 120)
    check_accounting(r)
    assert r.report.lost == [] and r.report.closes() == Counter(), "an nginx reload must not drop a socket or a frame"
    assert r.credits == r.report.received
    r = run(fault_run(topo, edge_drain("edge3"), pairs=QUICK_PAIRS, before_s=1, after_s=1), 150)
    check_accounting(r)
    closes = r.report.closes(r.fault_at)
    assert set(closes) <= {1001}, f"a drain closes its sockets 1001: {closes}"
    told = Counter(why for *_, why in r.report.peer_disconnects(r.fault_at))
    assert set(told) <= {"server_restart"}, f"peers of a drained edge hear server_restart: {told}"


# --- the full matrix: 200 pairs, production settings, the documented durations ----------------
#
# Deselected by default (pyproject.toml: `-m "not faults"`); run them with
#     .venv/bin/python -m pytest tests/integration/test_faults.py -m faults -s
# Each starts a topology of its own with the edges' and metering's defaults (lease 8 s,
# partition claims 10 s, usage flushed every second), so that one fault's leftovers never
# meet the next one.

FULL_PAIRS = 200
CUT_S = 30.0
METERING_DOWN_S = 60.0
IMPAIR_S = 30.0
DEFAULT_LEASE_S = 8.0  # RELAY_EDGE_LEASE_TTL_MS
#: An edge whose storage does not answer closes its sockets a TTL after its last renewal
#: (up to a renewal interval, TTL/3, before the fault), at the first failed attempt after
#: that (its bound: the JetStream timeout, 2 s, and 1 s), then closes them (a second).
FENCE_S = DEFAULT_LEASE_S * 4 / 3 + 3.0 + 1.0


def busiest_nats_node(topo: Topology) -> str:
    """The node with the most client connections (edges and metering on it)."""
    counts = {p.name: topo.monitor(p.name, "/connz")["num_connections"] for p in topo.nats}
    return max(sorted(counts), key=lambda n: counts[n])


def nats_kill_then_restart(victim: str | None = None) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        name = victim or busiest_nats_node(topo)
        notes["fault"] = f"{name} SIGKILLed, restarted once every pair was paired again"
        notes["clients_on_victim"] = topo.monitor(name, "/connz")["num_connections"]
        topo.kill(name)
        notes["repaired_s"] = await driver.wait_all_paired(timeout=120, settle=1.0) - at
        await asyncio.sleep(5)
        await topo.arestart(name)
        notes["restarted_s"] = time.monotonic() - at
        await asyncio.sleep(5)

    return fault


def nats_cut(routes_only: bool, seconds: float = CUT_S) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        name = busiest_nats_node(topo)
        notes["fault"] = f"{name} cut off from the other nodes ({'cluster routes only' if routes_only else 'every packet'}) for {seconds:.0f}s"
        notes["clients_on_victim"] = topo.monitor(name, "/connz")["num_connections"]
        (topo.cut_routes if routes_only else topo.cut_off)(name)
        try:
            await asyncio.sleep(seconds)
        finally:
            (topo.restore_routes if routes_only else topo.restore)(name)
        notes["healed_s"] = time.monotonic() - at
        status = await driver.status()
        notes["paired_at_heal"] = f"{status['paired']}/{status['pairs']}"
        # The heal is over once JetStream is current on every node: a node back from a
        # partition can cost the cluster's storage some seconds first (its raft groups
        # elect again), and that is part of this fault.
        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(topo.nats_healthy):
            assert time.monotonic() < deadline, "the NATS cluster was not healthy 120 s after the heal"
            await asyncio.sleep(0.5)
        notes["cluster_healthy_s"] = time.monotonic() - at
        await asyncio.sleep(DEFAULT_LEASE_S + 2)  # what a storage outage then costs shows within a lease
        notes["repaired_s"] = await driver.wait_all_paired(timeout=180, settle=1.0) - at
        await asyncio.sleep(5)

    return fault


def nats_cluster_restart() -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = "every NATS node SIGKILLed and started again"
        await topo.arestart_all([p.name for p in topo.nats])
        notes["cluster_ready_s"] = time.monotonic() - at
        notes["repaired_s"] = await driver.wait_all_paired(timeout=180, settle=1.0) - at
        await asyncio.sleep(5)

    return fault


def meterings_down(seconds: float = METERING_DOWN_S) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = f"both metering processes stopped (SIGTERM) for {seconds:.0f}s, then started"
        names = [m.name for m in topo.meterings]
        for name in names:
            notes[f"{name}_exit"] = topo.terminate(name)
        await asyncio.sleep(seconds)
        for name in names:
            topo.start_again(name)
        deadline = time.monotonic() + 60
        while not all(topo.is_ready(n) for n in names):
            assert time.monotonic() < deadline, "metering did not start again"
            await asyncio.sleep(0.2)
        notes["started_again_s"] = time.monotonic() - at
        await asyncio.sleep(3)

    return fault


def edges_to_nats_loss(loss_pct: float = 20.0, seconds: float = IMPAIR_S) -> Fault:
    async def fault(topo: Topology, driver: TrafficDriver, at: float, notes: dict[str, Any]) -> None:
        notes["fault"] = f"{loss_pct:.0f}% of packets between edges and NATS dropped for {seconds:.0f}s (no delay: no sch_netem)"
        topo.drop_edges_to_nats(loss_pct)
        try:
            await asyncio.sleep(seconds)
        finally:
            topo.clear_all_drops()
        notes["healed_s"] = time.monotonic() - at
        notes["repaired_s"] = await driver.wait_all_paired(timeout=180, settle=1.0) - at
        await asyncio.sleep(5)

    return fault


def full(edge: dict[str, Any] | None = None, metering: dict[str, Any] | None = None) -> Topology:
    return start_topology(edge_settings=edge or {}, metering_settings=metering or {}, stop_timeout=60)


@pytest.fixture
def production_topology() -> Iterator[Topology]:
    topo = full()
    try:
        yield topo
    finally:
        topo.stop()


@pytest.mark.faults
def test_an_edge_sigkilled_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, edge_kill("edge2"), pairs=FULL_PAIRS, before_s=5, after_s=5, killed_edge_window=(0.0, 2.0)), 600)
    check_accounting(r)
    waited = peer_timeouts(r)
    assert waited
    print(f"BOUND edge SIGKILL: {len(waited)} peers heard `timeout` {min(waited):.2f}-{statistics.median(waited):.2f}-{max(waited):.2f}s (min-median-max) after the SIGKILL")
    assert max(waited) <= SEND_INTERVAL_S + 1.0, waited  # at its first frame: one round trip
    assert max(waited) <= DEFAULT_LEASE_S + 1.0  # the idle bound, for the record


@pytest.mark.faults
def test_a_nats_node_sigkilled_then_restarted_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, nats_kill_then_restart(), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=120), 900)
    check_accounting(r)
    closes = r.report.closes(r.fault_at)
    assert set(closes) <= {1001}, f"an edge that loses its NATS node closes its sockets 1001: {closes}"


@pytest.mark.faults
def test_a_nats_node_cut_off_from_the_cluster_routes_for_30s_then_healed(production_topology):
    # Frames to and from the cut-off side go nowhere (its routes look alive to its server:
    # no "no responders", no word back) until its edges, their lease renewals failing for a
    # TTL, close their sockets 1001, and the senders hear `timeout` when the other edges see
    # the lease expire: the in-flight window is the TTL plus a renewal attempt and the closes,
    # and a frame sent after its peer's socket closed but before `timeout` is lost too.
    r = run(fault_run(production_topology, nats_cut(routes_only=True), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=180, inflight_window_s=FENCE_S), 900)
    check_accounting(r, DOCUMENTED_LOSSES | {"before_peer_disconnected"})
    late = [l.sent_at - r.fault_at for l in r.report.lost if l.cause == "before_peer_disconnected"]  # noqa: E741
    assert not late or max(late) <= FENCE_S, f"frames lost without a word {max(late):.1f}s after the cut"
    print(f"BOUND routes cut: frames lost without a word up to {max(late, default=0):.1f}s after the cut ({len(late)} after their peer's socket closed)")
    assert r.notes["paired_at_heal"] == f"{FULL_PAIRS}/{FULL_PAIRS}", "the pairs were back on edges that work before the heal"


@pytest.mark.faults
def test_a_nats_node_cut_off_entirely_for_30s_then_healed(production_topology):
    # Its clients' connections die without a word: each edge on it closes its sockets 1001
    # once its renewals have failed for a TTL (or nats-py finds the connection stale).
    r = run(fault_run(production_topology, nats_cut(routes_only=False), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=180, inflight_window_s=FENCE_S), 900)
    check_accounting(r, DOCUMENTED_LOSSES | {"before_peer_disconnected"})
    assert r.notes["paired_at_heal"] == f"{FULL_PAIRS}/{FULL_PAIRS}", "the pairs were back on edges that work before the heal"


@pytest.mark.faults
def test_the_whole_nats_cluster_restarted_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, nats_cluster_restart(), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=180, inflight_window_s=30, usage_timeout=120), 900)
    check_accounting(r)
    assert set(r.report.closes(r.fault_at)) <= {1001, None, 1011}, r.report.closes(r.fault_at)


@pytest.mark.faults
def test_a_metering_process_sigkilled_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, metering_kill(), pairs=FULL_PAIRS, before_s=2, after_s=5, usage_timeout=90), 600)
    check_accounting(r)
    assert r.report.lost == [] and r.credits == r.report.received
    assert r.notes["takeover_s"] <= 10 * (1 + 1 / 3) + 1.5, r.notes  # RELAY_PARTITION_LEASE_MS + a renewal


@pytest.mark.faults
def test_both_metering_processes_stopped_for_60s_then_started_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, meterings_down(), pairs=FULL_PAIRS, before_s=5, after_s=5, usage_timeout=120), 900)
    check_accounting(r)
    assert r.report.lost == [] and r.credits == r.report.received


@pytest.mark.faults
def test_20_percent_loss_between_edges_and_nats_for_30s(production_topology):
    ok, why = production_topology.nft_available()
    if not ok:
        pytest.skip(f"needs nftables to drop packets (this kernel has no sch_netem for tc): {why}")
    netem, netem_why = production_topology.netem_available()
    if not netem:
        print(f"NOTE: the 50 ms delay is not made: {netem_why}; only the loss, with nftables numgen")
    r = run(fault_run(production_topology, edges_to_nats_loss(), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=180, inflight_window_s=IMPAIR_S + 15), 900)
    check_accounting(r)


@pytest.mark.faults
def test_nginx_reloaded_with_200_pairs(production_topology):
    r = run(fault_run(production_topology, nginx_reload(), pairs=FULL_PAIRS, before_s=5, after_s=5), 600)
    check_accounting(r)
    assert r.report.lost == [] and r.report.closes() == Counter() and r.credits == r.report.received


@pytest.mark.faults
def test_an_edge_drained_with_the_default_drain_and_200_pairs():
    topo = full(edge={"drain_grace_ms": 5000, "drain_ms": 30000})
    try:
        r = run(fault_run(topo, edge_drain("edge3"), pairs=FULL_PAIRS, before_s=5, after_s=5, repair_timeout=120), 900)
    finally:
        topo.stop()
    check_accounting(r)
    assert set(r.report.closes(r.fault_at)) <= {1001}
    told = Counter(why for *_, why in r.report.peer_disconnects(r.fault_at))
    assert set(told) <= {"server_restart"}, told
    print(f"BOUND edge drain: sockets moved {r.notes['sockets_on_victim']}, drain took {r.notes['drain_exit_s']:.1f}s")
