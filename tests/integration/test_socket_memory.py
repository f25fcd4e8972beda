"""What a served socket keeps (issue 18: 18,000 idle sockets at about 15 KiB each).

Each is a structure the edge keeps per socket for its whole life, so each is checked on a
live, paired socket.
"""

from __future__ import annotations

from tests.harness import paired, running_edges

# CPython 3.11 shares the keys of an instance's dict with the other instances of its class
# up to 29 keys; at 30 or more each instance pays about 1.3 KiB more for its own table.
SHARED_KEYS_MAX = 29


async def test_a_served_sockets_attribute_dict_stays_under_cpythons_shared_keys_limit(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        mac, ios, _ = await paired(edge, edge)
        sockets = [conn.ws for conn in edge.ctx.connections.values()]
        assert len(sockets) == 2
        for ws in sockets:
            # websockets' own attributes; the edge's are in slots (edge.internals, edge.front).
            assert len(vars(ws)) <= SHARED_KEYS_MAX, sorted(vars(ws))
        await mac.close()
        await ios.close()


async def test_a_served_socket_keeps_no_handshake_headers(nats_url):
    async with running_edges(nats_url, count=1) as (edge,):
        mac, ios, _ = await paired(edge, edge)
        for conn in edge.ctx.connections.values():
            assert conn.ws.request is not None and len(conn.ws.request.headers) == 0
            assert conn.ws.response is None
        await mac.send(type="relay", payload="aGk=")  # and the socket still relays
        assert (await ios.expect("relay"))["payload"] == "aGk="
        await mac.close()
        await ios.close()
