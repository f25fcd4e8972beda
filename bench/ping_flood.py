"""A WebSocket ping flood against one edge, with a victim pair relaying across two edges.

    .venv/bin/python -m bench.ping_flood                       # 20 s of pings as fast as they go
    .venv/bin/python -m bench.ping_flood --burst 400000        # one burst, then nothing
    .venv/bin/python -m bench.ping_flood --never-read          # 125-byte pings, pongs never read
    .venv/bin/python -m bench.ping_flood --never-read --rate-limit 0   # the same, no rate limit

Starts a nats-server and two edges (child processes, default settings but `auth=none`),
a victim pair (Mac on the flooded edge A, iPhone on edge B, a frame each way every
100 ms) and one flooder socket on edge A that sends masked ping frames from a thread
over a raw socket. Reports what the flooder saw (close code, pings sent), what the
victim saw (frames lost, worst one-way latency, any peer_disconnected or close), edge
A's CPU and largest RSS during the run, and whether edge A lost its lease (its log).
Nothing is asserted: the numbers are for the README and commit messages.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from runtime.embedded_nats import EmbeddedNatsServer
from tests.harness import EdgeProcess, MacIdentity, connect_ios, connect_mac

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ping_frames(count: int, payload: bytes) -> bytes:
    """`count` client ping frames (masked with a zero key, which leaves the payload as it is)."""
    return (bytes([0x89, 0x80 | len(payload)]) + b"\0\0\0\0" + payload) * count


@dataclass
class Flooder:
    """A raw WebSocket client socket that sends pings and, unless told not to, reads."""

    port: int
    room_id: str
    read: bool = True
    small_receive_buffer: bool = False
    sock: socket.socket = field(init=False)
    sent: int = 0
    received_bytes: int = 0
    close_code: int | None = None
    ended_after_s: float | None = None
    send_error: str = ""

    def connect(self) -> None:
        self.sock = socket.socket()
        if self.small_receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", self.port))
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        self.sock.sendall(
            f"GET /ws?room_id={self.room_id}&role=mac HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:200]

    def flood(self, pings: int | None, seconds: float, payload: bytes) -> None:
        """Send `pings` at once (a burst), or pings as fast as they go for `seconds`."""
        started = time.monotonic()
        chunk_count = 10_000
        chunk = ping_frames(chunk_count, payload)
        try:
            if pings is not None:
                self.sock.sendall(ping_frames(pings, payload))
                self.sent = pings
                return
            while time.monotonic() - started < seconds and self.ended_after_s is None:
                self.sock.sendall(chunk)
                self.sent += chunk_count
        except OSError as exc:
            self.send_error = type(exc).__name__
        finally:
            if self.ended_after_s is None and not self.read:
                # Not reading: the end shows as a failed send (or not at all).
                self.ended_after_s = time.monotonic() - started if self.send_error else None

    def read_until_closed(self, started: float) -> None:
        """Read everything the edge sends; note the close code of its close frame."""
        buffer = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.ended_after_s = time.monotonic() - started
                return
            self.received_bytes += len(data)
            buffer += data
            while len(buffer) >= 2:  # server frames are not masked
                opcode, length, at = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if length == 126:
                    if len(buffer) < 4:
                        break
                    length, at = struct.unpack("!H", buffer[2:4])[0], 4
                elif length == 127:
                    if len(buffer) < 10:
                        break
                    length, at = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < at + length:
                    break
                if opcode == 0x8 and length >= 2:
                    self.close_code = struct.unpack("!H", buffer[at : at + 2])[0]
                buffer = buffer[at + length :]


async def run(args: argparse.Namespace) -> dict:
    with EmbeddedNatsServer() as nats_server:
        settings = {"edge_lease_ttl_ms": args.lease_ttl_ms}
        if args.rate_limit is not None:
            settings["socket_rate_limit_per_s"] = args.rate_limit
            if args.rate_limit == 0:  # the byte rate limit too: the buffer bound alone
                settings["socket_bytes_per_s"] = 0
        async with EdgeProcess(nats_server.url, **settings) as a, EdgeProcess(nats_server.url, **settings) as b:
            mac = MacIdentity.new()
            mac_client, _ = await connect_mac(a, mac)
            ios_client, _ = await connect_ios(b, mac)
            await ios_client.expect("peer_joined")
            await mac_client.expect("peer_joined")

            victim = {"sent": 0, "received": 0, "worst_latency_ms": 0.0, "events": []}
            stop = asyncio.Event()

            async def send_every_100ms(client) -> None:
                seq = 0
                while not stop.is_set():
                    seq += 1
                    try:
                        await client.send(type="relay", payload=json.dumps([seq, time.time()]))
                        victim["sent"] += 1
                    except Exception as exc:
                        victim["events"].append(f"send failed: {type(exc).__name__}")
                        return
                    await asyncio.sleep(0.1)

            async def receive(client, side: str) -> None:
                while True:
                    try:
                        message = await client.recv(timeout=3600)
                    except Exception as exc:
                        code = client.ws.protocol.close_rcvd.code if client.ws.protocol.close_rcvd else None
                        victim["events"].append(f"{side} closed {code} ({type(exc).__name__})")
                        return
                    if message["type"] == "relay":
                        _, sent_at = json.loads(message["payload"])
                        victim["received"] += 1
                        victim["worst_latency_ms"] = max(victim["worst_latency_ms"], (time.time() - sent_at) * 1000)
                    elif message["type"] != "heartbeat_ack":
                        victim["events"].append(f"{side} got {message}")

            async def heartbeats(client) -> None:
                while not stop.is_set():
                    try:
                        await client.send(type="heartbeat")
                    except Exception:
                        return
                    await asyncio.sleep(1)

            tasks = [
                asyncio.create_task(send_every_100ms(mac_client)),
                asyncio.create_task(send_every_100ms(ios_client)),
                asyncio.create_task(receive(mac_client, "mac")),
                asyncio.create_task(receive(ios_client, "ios")),
                asyncio.create_task(heartbeats(mac_client)),
                asyncio.create_task(heartbeats(ios_client)),
            ]
            await asyncio.sleep(1)

            flooder = Flooder(a.port, MacIdentity.new().room_id, read=not args.never_read, small_receive_buffer=args.never_read)
            await asyncio.to_thread(flooder.connect)
            payload = b"p" * 125 if args.never_read else b""
            pid = a.process.pid
            cpu_before, started = cpu_seconds(pid), time.monotonic()
            reader = None
            if flooder.read:
                reader = threading.Thread(target=flooder.read_until_closed, args=(started,), daemon=True)
                reader.start()
            sender = threading.Thread(target=flooder.flood, args=(args.burst, args.seconds, payload), daemon=True)
            sender.start()
            max_rss = rss_mib(pid)
            while time.monotonic() - started < args.seconds + 2:
                await asyncio.sleep(0.1)
                max_rss = max(max_rss, rss_mib(pid))
            cpu = cpu_seconds(pid) - cpu_before
            elapsed = time.monotonic() - started
            stop.set()
            await asyncio.sleep(0.5)
            for task in tasks:
                task.cancel()
            flooder.sock.close()
            log = a.log_text()
            return {
                "mode": "burst" if args.burst else ("never-read" if args.never_read else "sustained"),
                "flooder": {
                    "pings_sent": flooder.sent,
                    "close_code_received": flooder.close_code,
                    "connection_ended_after_s": None if flooder.ended_after_s is None else round(flooder.ended_after_s, 3),
                    "bytes_received": flooder.received_bytes,
                    "send_error": flooder.send_error,
                },
                "victim": {
                    "frames_sent": victim["sent"],
                    "frames_lost": victim["sent"] - victim["received"],
                    "worst_one_way_ms": round(victim["worst_latency_ms"], 1),
                    "events": _counted(victim["events"]),
                },
                "edge_a": {
                    "cpu_cores": round(cpu / elapsed, 2),
                    "max_rss_mib": round(max_rss, 1),
                    "lost_its_lease": "lost its lease" in log,
                    "log_warnings": [line[24:200] for line in log.splitlines() if "WARNING" in line or "ERROR" in line][:8],
                },
            }


def _counted(events: list[str]) -> list[str]:
    """Events in the order first seen, each once, with how many times it came."""
    counts: dict[str, int] = {}
    for event in events:
        counts[event] = counts.get(event, 0) + 1
    return [f"{n} x {event}" for event, n in counts.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to flood (and watch)")
    parser.add_argument("--burst", type=int, default=None, help="send this many pings at once instead")
    parser.add_argument("--never-read", action="store_true", help="125-byte pings; the flooder never reads")
    parser.add_argument("--lease-ttl-ms", type=int, default=15_000)
    parser.add_argument(
        "--rate-limit", type=int, default=None, help="the edges' RELAY_SOCKET_RATE_LIMIT_PER_S (0: off, and RELAY_SOCKET_BYTES_PER_S too, to see the buffer bound alone)"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
