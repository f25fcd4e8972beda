"""The operator's status page (`GET /admin/status`, README: Operations → Status page): the
whole fleet from the leases and each process's own answer, behind the admin token (or open
to this machine), and drawn in a real headless Chromium with no console error."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import Iterator

import pytest

from edge.server import Edge
from runtime.clock import now_ms
from runtime.embedded_nats import EmbeddedNatsServer
from schemas.records import EdgeLease
from tests.browser import headless_chromium
from tests.harness import MacIdentity, connect_mac, http_get, paired, running_edges, running_metering, until

ADMIN = "status-admin-" + secrets.token_hex(8)
BEARER = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def own_nats() -> Iterator[str]:
    with EmbeddedNatsServer() as server:
        yield server.url


async def fleet(edge: Edge, headers: dict[str, str] | None = None) -> dict:
    status, body = await http_get(edge.port, "/admin/status.json", BEARER if headers is None else headers)
    assert status == 200, (status, body)
    return json.loads(body)


def by_edge(answer: dict) -> dict[str, dict]:
    return {entry["edge_id"]: entry["stats"] for entry in answer["edges"]}


async def test_status_shows_every_edge_from_the_leases_with_its_sockets_and_paired_rooms(own_nats):
    async with running_edges(own_nats, 2, admin_token=ADMIN) as (edge_a, edge_b), running_metering(own_nats) as metering:
        mac, ios, _ = await paired(edge_a, edge_b)  # the Mac on A, the iPhone on B
        lonely, _ = await connect_mac(edge_b, MacIdentity.new())  # a Mac on B with no iPhone
        answer = await fleet(edge_b)
        edges = by_edge(answer)
        assert set(edges) == {edge_a.settings.edge_id, edge_b.settings.edge_id}
        a, b = edges[edge_a.settings.edge_id], edges[edge_b.settings.edge_id]
        assert a["sockets"] == {"mac": 1, "ios": 0, "unknown": 0} and a["paired_rooms"] == 1
        assert b["sockets"] == {"mac": 1, "ios": 1, "unknown": 0} and b["paired_rooms"] == 0
        assert a["boot_id"] == edge_a.boot_id and a["ready"] and not a["draining"] and a["nats_server"]
        assert answer["answered_by"] == edge_b.settings.edge_id and answer["unleased"] == []
        assert [m["process"] for m in answer["metering"]] == [metering.process]
        assert answer["metering"][0]["ready"] is True

        # Frames forwarded count up, and the answer says when it was made (frames/s on the page).
        before = a["frames_forwarded"]
        await mac.send(type="relay", payload="x")
        await ios.expect("relay")
        later = by_edge(await fleet(edge_a))[edge_a.settings.edge_id]
        assert later["frames_forwarded"] == before + 1 and later["at_ms"] >= a["at_ms"]
        for client in (mac, ios, lonely):
            await client.close()


async def test_status_shows_an_edge_whose_lease_lives_but_that_does_not_answer(own_nats):
    async with running_edges(own_nats, 1, admin_token=ADMIN, status_gather_ms=150) as (edge,):
        ghost = EdgeLease(edge_id="ghost-edge", boot_id=secrets.token_hex(8), started_at=now_ms())
        await edge.ctx.presence.renew_lease(ghost, 30, 0)
        await until(lambda: "ghost-edge" in edge.live_edges)
        edges = by_edge(await fleet(edge))
        assert edges["ghost-edge"] is None  # shown, as not answering
        assert edges[edge.settings.edge_id]["sockets"] == {"mac": 0, "ios": 0, "unknown": 0}


async def test_status_page_needs_the_admin_token_as_bearer_or_basic_password(own_nats):
    async with running_edges(own_nats, 1, admin_token=ADMIN) as (edge,):
        for path in ("/admin/status", "/admin/status.json", "/admin/status.js"):
            status, body = await http_get(edge.port, path)
            assert status == 401 and "operator token" in body, (path, status, body)
        status, _ = await http_get(edge.port, "/admin/status.json", {"Authorization": "Bearer wrong"})
        assert status == 401
        basic = base64.b64encode(f"operator:{ADMIN}".encode()).decode()
        for headers in (BEARER, {"Authorization": f"Basic {basic}"}):
            status, body = await http_get(edge.port, "/admin/status", headers)
            assert status == 200 and "<title>termrelay status</title>" in body
        # The browser is asked for it: a 401 names Basic, so the page's fetches reuse it.
        reader_writer = await _raw_get(edge.port, "/admin/status")
        assert 'www-authenticate: basic realm="termrelay operator"' in reader_writer.lower()


async def test_status_page_wrong_tokens_count_as_failed_authentications(own_nats, caplog):
    caplog.set_level(logging.WARNING, logger="edge")
    async with running_edges(own_nats, 1, admin_token=ADMIN, auth_failure_limit=2) as (edge,):
        wrong = {"Authorization": "Bearer not-the-token"}
        assert [(await http_get(edge.port, "/admin/status.json", wrong))[0] for _ in range(3)] == [401, 401, 429]
        # The lock-out is among the last problems the page shows, without the token.
        problems = (await fleet(edge))["problems"]
        lockouts = [p for p in problems if "failed authentications" in p["message"]]
        assert lockouts and lockouts[0]["source"] == edge.settings.edge_id and lockouts[0]["level"] == "WARNING"
        assert "not-the-token" not in json.dumps(problems) and ADMIN not in json.dumps(problems)


async def test_status_page_without_an_admin_token_is_refused_with_how_to_enable_it(own_nats):
    async with running_edges(own_nats, 1) as (edge,):
        status, body = await http_get(edge.port, "/admin/status")
        assert status == 403 and "RELAY_ADMIN_TOKEN" in body


async def test_status_page_open_on_loopback_takes_no_token_unless_a_proxy_forwarded_the_request(own_nats):
    async with running_edges(own_nats, 1, status_open_on_loopback=True, admin_token=ADMIN) as (edge,):
        assert (await http_get(edge.port, "/admin/status.json"))[0] == 200
        # Through a proxy on this machine the peer is loopback, the client may be anyone.
        status, _ = await http_get(edge.port, "/admin/status.json", {"X-Forwarded-For": "203.0.113.9"})
        assert status == 401
        assert (await http_get(edge.port, "/admin/status.json", {"X-Forwarded-For": "203.0.113.9", **BEARER}))[0] == 200


async def test_status_page_is_served_with_a_strict_content_security_policy(own_nats):
    async with running_edges(own_nats, 1, admin_token=ADMIN) as (edge,):
        head = await _raw_get(edge.port, "/admin/status", BEARER)
        assert "content-security-policy: default-src 'none'; script-src 'self'" in head.lower()
        assert "cache-control: no-store" in head.lower()
        status, _ = await http_get(edge.port, "/admin/status.json", {**BEARER})
        assert status == 200


async def test_status_page_in_headless_chromium_matches_the_fleet_and_follows_a_new_pair(own_nats):
    async with (
        running_edges(own_nats, 2, admin_token=ADMIN, status_refresh_ms=150, status_gather_ms=1000) as (edge_a, edge_b),
        running_metering(own_nats),
        headless_chromium() as browser,
    ):
        first_mac, first_ios, _ = await paired(edge_a, edge_b)
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{edge_a.port}/admin/status", headers=BEARER)
        await page.until_text("edges-alive", "2")
        await page.until_text("sockets-total", "2")
        await page.until_text("paired-rooms", "1")
        await page.until_text("metering-lag", "0")
        rows = await page.evaluate("[...document.querySelectorAll('#edge-rows tr')].map(r => r.dataset.edgeId).sort()")
        assert rows == sorted([edge_a.settings.edge_id, edge_b.settings.edge_id])

        # A second pair connects: the page follows by itself.
        mac, ios, _ = await paired(edge_b, edge_a)
        await page.until_text("sockets-total", "4")
        await page.until_text("sockets-mac", "2")
        await page.until_text("paired-rooms", "2")
        # Frames flow: frames/s (from two answers) goes above 0, the edge's count is exact.
        async def stream() -> None:
            while True:
                await mac.send(type="relay", payload="x")
                await ios.expect("relay")
                await asyncio.sleep(0.005)

        streaming = asyncio.create_task(stream())
        try:
            await page.until(lambda shown: float(shown) > 0 if shown not in (None, "…") else False, "frames-per-s")
        finally:
            streaming.cancel()
        counters = edge_b.ctx.counters
        # Read as the page is: the last frame sent may reach the edge after the cancel.
        await page.until(
            lambda shown: shown == str(counters.forwarded_at_once + counters.forwarded_by_handler), f"frames-{edge_b.settings.edge_id}"
        )
        await mac.close()
        await page.until_text("sockets-total", "3")
        assert page.console_errors == []
        for client in (first_mac, first_ios, ios):
            await client.close()


async def _raw_get(port: int, path: str, headers: dict[str, str] | None = None) -> str:
    """The response head of a GET, as text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"GET {path} HTTP/1.1", "Host: relay", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return raw.partition(b"\r\n\r\n")[0].decode()
