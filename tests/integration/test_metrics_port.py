"""/metrics is the operator's (issue 16 item 15): never on the public port; on a port of its
own (RELAY_METRICS_PORT, on RELAY_METRICS_HOST, loopback by default) when asked for."""

from __future__ import annotations

import signal
import socket

import pytest

from runtime.embedded_nats import free_port
from tests.harness import EdgeProcess, http_get, metrics, metrics_at, paired, running_edges


async def test_metrics_are_not_served_on_the_public_port(nats_url):
    async with running_edges(nats_url, count=1, metrics_port=-1) as (edge,):  # the default
        assert await http_get(edge.port, "/metrics") == (404, "not found\n")
        assert edge.metrics_port is None


async def test_metrics_are_served_on_the_metrics_port_only_and_nothing_else_is(nats_url):
    async with running_edges(nats_url, count=2) as (a, b):  # the harness asks for a free port each
        await paired(a, b)
        assert a.metrics_port not in (None, a.port)
        assert (await metrics(a))["relay_connections"] == 1
        assert (await http_get(a.port, "/metrics"))[0] == 404
        assert (await http_get(a.metrics_port, "/status?room_id=ABC"))[0] == 404
        assert (await http_get(a.metrics_port, "/ws?room_id=ABC&role=mac"))[0] == 404


async def test_relay_edge_serves_metrics_on_the_port_it_is_given_on_loopback(nats_url):
    port = free_port()
    async with EdgeProcess(nats_url, metrics_port=port) as edge:
        assert (await metrics_at(port))["relay_connections"] == 0
        assert (await http_get(edge.port, "/metrics"))[0] == 404
        assert f"serves /metrics on 127.0.0.1:{port}" in edge.log_text()  # loopback: the default host


async def test_a_metrics_port_in_use_stops_the_start_with_one_line_naming_the_setting(nats_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        edge = EdgeProcess(nats_url, metrics_port=port)
        try:
            with pytest.raises(RuntimeError, match="exited with 1"):
                await edge.start(timeout=10)
        finally:
            await edge.stop(signal.SIGKILL)
    (line,) = [line for line in edge.log_text().splitlines() if line.startswith("relay-edge: error:")]
    assert line.startswith(f"relay-edge: error: cannot serve /metrics on 127.0.0.1:{port} (")
    assert line.endswith("choose another --metrics-port / RELAY_METRICS_PORT (-1: not served) or --metrics-host")
