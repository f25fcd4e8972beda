"""An edge under more load than its storage answers sheds it early and converges
(issue 18, README: Overload): upgrades beyond its gate get 503 with Retry-After, registers
and joins beyond theirs are closed 1013, clients that retry as the Mac agent does all pair
in the end, and the edge keeps its lease throughout.

The gates are made tiny so that a few dozen clients overload a real edge here.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import EdgeProcess, MacIdentity, join_message, make_account, metrics, running_edges, ws_url

TINY_GATES = dict(
    auth="required",
    socket_rate_limit_per_s=0,
    address_socket_limit=0,
    address_upgrades_per_s=0,
    upgrades_in_flight=1,
    upgrades_waiting=1,
    upgrade_wait_ms=100,
    room_requests_in_flight=1,
    room_requests_waiting=2,
    room_request_wait_ms=150,
)


async def test_upgrades_beyond_the_gate_are_answered_503_with_retry_after(nats_url):
    account = await make_account(nats_url, tier="pro")
    async with running_edges(nats_url, count=1, **TINY_GATES) as (edge,):

        async def upgrade(mac: MacIdentity) -> int:
            try:
                async with connect(ws_url(edge, mac.room_id, "mac"), additional_headers=account.auth, open_timeout=5):
                    return 101
            except InvalidStatus as refused:
                response = refused.response
                if response.status_code == 503:
                    retry_after = int(response.headers["Retry-After"])
                    assert 1 <= retry_after <= 10, retry_after
                    assert b"relay busy" in response.body
                return response.status_code

        statuses = await asyncio.gather(*(upgrade(MacIdentity.new()) for _ in range(40)))
        seen = await metrics(edge)

    assert set(statuses) <= {101, 503}, statuses
    assert 101 in statuses and 503 in statuses, statuses
    assert seen['relay_admission_refused_total{gate="upgrades"}'] == statuses.count(503)
    assert seen['relay_upgrades_total{status="503"}'] == statuses.count(503)
    assert seen['relay_admission_in_flight{gate="upgrades"}'] == 0
    assert seen['relay_admission_waiting{gate="upgrades"}'] == 0


class RetryingClient:
    """One side of a pair that reconnects as the Mac agent does: after a 503 or a close it
    backs off (short here) and tries again, until it has seen its peer."""

    def __init__(self, edge, account, mac: MacIdentity, role: str) -> None:
        self.edge, self.account, self.mac, self.role = edge, account, mac, role
        self.refusals: list[int] = []  # 503s and close codes seen on the way
        self.ws = None

    def first_message(self) -> dict:
        return self.mac.register_message() if self.role == "mac" else join_message(self.mac)

    async def until_paired(self, registered: asyncio.Event) -> None:
        if self.role == "ios":
            await registered.wait()  # a join needs the room to exist
        while True:
            try:
                ws = await connect(
                    ws_url(self.edge, self.mac.room_id, self.role), additional_headers=self.account.auth, open_timeout=5
                )
            except InvalidStatus as refused:
                self.refusals.append(refused.response.status_code)
                await asyncio.sleep(random.uniform(0.02, 0.1))
                continue
            await ws.send(json.dumps(self.first_message()))
            try:
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message["type"] == "room_registered":
                        registered.set()
                    if message["type"] == "peer_joined":
                        self.ws = ws
                        return
            except ConnectionClosed:
                self.refusals.append(ws.close_code)
                await asyncio.sleep(random.uniform(0.02, 0.1))


async def test_registers_and_joins_beyond_the_gate_are_closed_1013_and_every_pair_pairs_in_the_end(nats_url, tmp_path):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.many]\nmax_rooms = -1\nmax_sessions = -1\ncredits_per_window = -1\n")
    account = await make_account(nats_url, tier="many")
    async with running_edges(nats_url, count=1, tiers_file=str(tiers), **TINY_GATES) as (edge,):
        # Open sockets first (one at a time, under the upgrade gate), then send every
        # register at once: more than the room requests' gate holds.
        macs = [MacIdentity.new() for _ in range(24)]
        sockets = [await connect(ws_url(edge, m.room_id, "mac"), additional_headers=account.auth) for m in macs]
        await asyncio.gather(*(ws.send(json.dumps(m.register_message())) for ws, m in zip(sockets, macs, strict=True)))

        async def outcome(ws) -> str | int:
            try:
                return json.loads(await asyncio.wait_for(ws.recv(), 5))["type"]
            except ConnectionClosed:
                assert ws.close_reason == "relay busy; try again later", ws.close_reason
                return ws.close_code

        outcomes = await asyncio.gather(*(outcome(ws) for ws in sockets))
        assert set(outcomes) <= {"room_registered", 1013}, outcomes
        assert outcomes.count(1013) > 0 and outcomes.count("room_registered") > 0, outcomes
        refused_at_once = (await metrics(edge))['relay_admission_refused_total{gate="room_requests"}']
        assert refused_at_once == outcomes.count(1013)
        for ws in sockets:
            await ws.close()

        # Now every pair, both sides at once, retrying as the Mac does: all pair in the end.
        pairs = []
        for mac in macs:
            registered = asyncio.Event()
            pairs.append((registered, RetryingClient(edge, account, mac, "mac"), RetryingClient(edge, account, mac, "ios")))
        await asyncio.wait_for(
            asyncio.gather(*(c.until_paired(registered) for registered, *clients in pairs for c in clients)), 60
        )
        for _, mac_side, ios_side in pairs:  # paired for real: a frame each way
            await ios_side.ws.send(json.dumps({"type": "relay", "payload": "aGk="}))
            assert json.loads(await asyncio.wait_for(mac_side.ws.recv(), 5)) == {"type": "relay", "payload": "aGk="}
            await mac_side.ws.send(json.dumps({"type": "relay", "payload": "aG8="}))
            assert json.loads(await asyncio.wait_for(ios_side.ws.recv(), 5)) == {"type": "relay", "payload": "aG8="}
        seen = await metrics(edge)
        for _, *clients in pairs:
            for c in clients:
                await c.ws.close()

    refusals = [code for _, *clients in pairs for c in clients for code in c.refusals]
    assert set(refusals) <= {503, 1013}, refusals
    assert seen['relay_admission_refused_total{gate="room_requests"}'] >= refused_at_once
    assert seen["relay_leases_lost_total"] == 0
    for gate in ("upgrades", "room_requests", "departures"):
        assert seen[f'relay_admission_in_flight{{gate="{gate}"}}'] == 0, gate
        assert seen[f'relay_admission_waiting{{gate="{gate}"}}'] == 0, gate


def _open_files_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(row for row in limits if row.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


async def test_the_edge_raises_its_soft_open_files_limit_to_the_hard_one_at_start_and_says_so(nats_url):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    edge = EdgeProcess(nats_url)
    edge.open_files_soft = 256
    async with edge:
        assert _open_files_limits(edge.process.pid) == (hard, hard)
        assert f"open files: soft limit raised from 256 to {hard} (the hard limit)" in edge.log_text()


async def test_the_edge_makes_full_garbage_collections_rarer_at_start_and_says_so(nats_url):
    edge = EdgeProcess(nats_url, gc_full_every=77)
    async with edge:
        assert "garbage collector: thresholds 700, 10, 77" in edge.log_text()
        assert "objects of the start left out of collections" in edge.log_text()
