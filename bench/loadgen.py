"""A load generator for relays that speak the TermOnMac protocol: N pairs, frames both ways.

    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 100 --mode max --duration 10
    .venv/bin/python -m bench.loadgen --url ws://A:8080 --ios-url ws://B:8080 --pairs 1000 --mode rate --rate 5
    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 2000 --mode idle --relay-pid PID
    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 2000 --mode storm

Each pair is a Mac (`register_room`, on a `--url`) and an iPhone (`join_room` with the
room's secret hash, on an `--ios-url`, by default the same), both in one worker
process, so a frame's send and receipt are counted by the same process and frames in
flight are known exactly. Pairs are spread over worker processes (spawned) so the
generator is not the bottleneck; each raises RLIMIT_NOFILE to its hard limit.

Every frame is `{"type":"relay","payload":P}`, P being base64 text of `--payload` bytes
whose first 24 characters carry the sequence number and the send time
(`time.monotonic_ns()`, one clock for every process on Linux, so one-way latency across
processes is valid).

Modes:
- `max`: each direction keeps `--window` frames in flight, sending the next as one arrives.
- `rate`: each direction sends `--rate` frames/s (open loop, random phase per direction).
- `idle`: pairs stay paired and idle; the relay's RSS before and
  after, and KiB per connection (needs `--relay-pid`).
- `storm`: after pairing, every socket is closed at once and reconnected at once; the time
  until every pair has `peer_joined` on both new sockets, then one frame each way checks it.

In every mode each socket sends a heartbeat every `--heartbeat` seconds (20), at its own
phase of the interval.

Reports JSON (`--json FILE`, else standard output) and a one-line summary on standard error:
delivered frames/s, one-way latency p50/p90/p99/max, loss, reordering, duplicates, pair
set-up time, and, with `--relay-pid`, the relay's CPU seconds in the measured window and
its RSS. Runs by hand; never part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import secrets
import signal
import struct
import sys
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

MODES = ("max", "rate", "idle", "storm")

# The frame's fixed head, as the product re-serialises it and as the reference forwards it.
RELAY_PREFIX = b'{"type":"relay","payload":"'
_PREFIX_LEN = len(RELAY_PREFIX)
# seq, send time (monotonic ns), spare: 18 bytes, which are exactly 24 base64 characters.
_STAMP = struct.Struct("<QQH")
_STAMP_B64 = 24
HEARTBEAT = b'{"type":"heartbeat"}'

_OPEN_TIMEOUT_S = 10.0
_PHASE_TIMEOUT_S = 120.0


@dataclass
class LoadConfig:
    """One load run. URLs are relay base URLs (`ws://host:port`); `/ws?room_id=…&role=…` is added."""

    mac_urls: list[str]
    ios_urls: list[str] = field(default_factory=list)  # empty: the Mac URLs
    pairs: int = 1
    mode: str = "max"
    rate: float = 5.0  # frames/s per direction, mode "rate"
    window: int = 8  # frames in flight per direction, mode "max"
    payload_bytes: int = 256
    duration_s: float = 10.0
    warmup_s: float = 1.0
    drain_s: float = 3.0
    workers: int = 0  # 0: chosen from the pair count and the CPUs we may use
    api_key: str | None = None  # sent as `Authorization: Bearer …` by both ends
    relay_pid: int | None = None
    nats_pid: int | None = None
    setup_concurrency: int = 64  # pairs being set up at once, over all workers
    heartbeat_s: float = 20.0
    idle_settle_s: float = 5.0
    storm_timeout_s: float = 60.0
    cpus: list[int] | None = None  # CPU affinity of the workers (default: inherited)
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.mac_urls:
            raise ValueError("need at least one relay URL")
        if self.pairs < 1:
            raise ValueError("need at least one pair")
        if self.payload_bytes < _STAMP_B64 or self.payload_bytes % 4:
            raise ValueError("payload_bytes must be a multiple of 4 and at least 24")
        if self.mode == "rate" and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.mode == "max" and self.window < 1:
            raise ValueError("window must be at least 1")

    def worker_count(self) -> int:
        if self.workers > 0:
            return min(self.workers, self.pairs)
        cpus = len(self.cpus) if self.cpus else len(os.sched_getaffinity(0))
        return max(1, min(math.ceil(self.pairs / 250), max(2, cpus), self.pairs))


# --- /proc readings ----------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid: int) -> int:
    """Resident set size of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def raise_nofile_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- one WebSocket client ----------------------------------------------------------
#
# The generator must cost less per frame than the relay it measures. websockets' asyncio
# client costs a task, a queue and a lock per message, so websockets' Sans-I/O protocol
# does only the opening handshake here; frames are then read and written directly (a
# server's frames are unmasked and simple) and each socket is written once per loop turn.


def _client_frame(opcode: int, data: bytes) -> bytes:
    """One masked, final client frame (RFC 6455 §5.2)."""
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = _HEAD16.pack(0x80 | opcode, 0x80 | 126, n)
    else:
        head = _HEAD64.pack(0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + apply_mask(data, mask)


_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9


class WsConn(asyncio.Protocol):
    """A client socket of one pair: `role` is "mac" or "ios"."""

    def __init__(self, worker: "Worker", pair: "Pair", role: str, url: str, headers: dict[str, str]) -> None:
        self.worker, self.pair, self.role = worker, pair, role
        self.inbound: Stream = pair.down if role == "mac" else pair.up
        self.handshake: ClientProtocol | None = ClientProtocol(parse_uri(url), max_size=None)
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = worker.loop.create_future()
        self.is_open = False
        self.lost = False
        self.dirty = False
        self._out: list[bytes] = []
        self._buffer = b""
        self._fragments: list[bytes] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.handshake.connect()
        for name, value in self.headers.items():
            request.headers[name] = value
        self.handshake.send_request(request)
        transport.write(b"".join(self.handshake.data_to_send()))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.handshake is not None:
            self._handshake_data(data)
            return
        buf = self._buffer + data if self._buffer else data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > n:
                break
            self._frame(b0, buf[pos + head : end])
            pos = end
        self._buffer = buf[pos:] if pos < n else b""

    def _handshake_data(self, data: bytes) -> None:
        proto = self.handshake
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Response):
                if proto.handshake_exc is not None:
                    self.opened.set_exception(proto.handshake_exc)
                    self.transport.close()
                    return
                self.handshake = None
                self.is_open = True
                self.opened.set_result(None)
            elif isinstance(event, Frame):  # frames that came in the same read as the 101
                self._frame(int(event.opcode) | (0x80 if event.fin else 0), event.data)

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == _OP_TEXT or opcode == _OP_BINARY:
            if b0 & 0x80:
                self.on_message(payload)
            else:
                self._fragments = [payload]
        elif opcode == _OP_CONT and self._fragments is not None:
            self._fragments.append(payload)
            if b0 & 0x80:
                message, self._fragments = b"".join(self._fragments), None
                self.on_message(message)
        elif opcode == _OP_CLOSE:
            if self.is_open:
                self.is_open = False
                self.transport.write(_client_frame(_OP_CLOSE, payload[:2]))
            self.transport.close()
        elif opcode == _OP_PING:
            self.transport.write(_client_frame(0xA, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost before the handshake: {exc}"))
        self.pair.on_lost(self)

    # sending

    def send(self, data: bytes) -> bool:
        """Queue a text frame; it is written with the others at the end of this loop turn."""
        if not self.is_open:
            self.worker.send_failures += 1
            return False
        self._out.append(_client_frame(_OP_TEXT, data))
        if not self.dirty:
            self.dirty = True
            self.worker.mark_dirty(self)
        return True

    def flush(self) -> None:
        self.dirty = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def close(self) -> None:
        """Close now: a close frame (1000) if the socket is open, then the TCP connection."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.is_open:
            self.is_open = False
            self._out.append(_client_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
            self.flush()
        self.transport.close()

    # receiving

    def on_message(self, data: bytes) -> None:
        if data[:_PREFIX_LEN] == RELAY_PREFIX:
            self.inbound.receive(data)
        else:
            try:
                message = json.loads(data)
            except ValueError:
                self.worker.note_error(f"{self.role}: undecodable message {data[:80]!r}")
                return
            self.pair.on_control(self, message)


# --- pairs and their two directions -------------------------------------------------


class Stream:
    """One direction of one pair: what was sent, what arrived, in what order."""

    __slots__ = ("worker", "pair", "from_role", "sent", "received", "duplicates", "reordered", "max_seq", "seen", "tail")

    def __init__(self, worker: "Worker", pair: "Pair", from_role: str, tail: bytes) -> None:
        self.worker, self.pair, self.from_role, self.tail = worker, pair, from_role, tail
        self.sent = self.received = self.duplicates = self.reordered = 0
        self.max_seq = -1
        self.seen = bytearray()

    def send_next(self) -> None:
        conn = self.pair.conns[self.from_role]
        if conn is None:
            return
        stamp = binascii.b2a_base64(_STAMP.pack(self.sent, time.monotonic_ns(), 0), newline=False)
        if conn.send(RELAY_PREFIX + stamp + self.tail):
            self.sent += 1
            self.worker.outstanding += 1

    def receive(self, data: bytes) -> None:
        now = time.monotonic_ns()
        seq, sent_ns, _ = _STAMP.unpack(binascii.a2b_base64(data[_PREFIX_LEN : _PREFIX_LEN + _STAMP_B64]))
        seen = self.seen
        if seq < len(seen):
            if seen[seq]:
                self.duplicates += 1
                return
        else:
            seen.extend(bytes(max(seq + 1 - len(seen), len(seen), 64)))
        seen[seq] = 1
        self.received += 1
        w = self.worker
        w.outstanding -= 1
        if seq < self.max_seq:
            self.reordered += 1
        else:
            self.max_seq = seq
        if w.window_start_ns <= sent_ns < w.window_end_ns:
            w.latencies.append(now - sent_ns)
            w.sent_at.append(sent_ns)
        if w.window_start_ns <= now < w.window_end_ns:
            w.delivered_in_window += 1
        if w.window_mode and w.sending:
            self.send_next()


class Pair:
    """A Mac and an iPhone in one room; `conns` are their current sockets."""

    def __init__(self, worker: "Worker", index: int, mac_url: str, ios_url: str, tail: bytes) -> None:
        self.worker, self.index = worker, index
        self.room_id = f"bench-{worker.run_tag}-{index}"
        secret = secrets.token_hex(16)
        self.secret_hash = hashlib.sha256(secret.encode()).hexdigest()
        self.public_key = _b64_key()
        self.mac_url = _ws_url(mac_url, self.room_id, "mac")
        self.ios_url = _ws_url(ios_url, self.room_id, "ios")
        self.up = Stream(worker, self, "mac", tail)  # Mac → iPhone
        self.down = Stream(worker, self, "ios", tail)  # iPhone → Mac
        self.conns: dict[str, WsConn | None] = {"mac": None, "ios": None}
        self.peered = {"mac": False, "ios": False}
        self.paired_at_ns = 0
        self.paired_event = asyncio.Event()
        self.registered: asyncio.Future[dict] | None = None
        self.failure: str | None = None

    @property
    def is_paired(self) -> bool:
        return self.peered["mac"] and self.peered["ios"]

    def _set_peered(self, role: str, value: bool) -> None:
        before = self.is_paired
        self.peered[role] = value
        after = self.is_paired
        if after and not before:
            self.paired_at_ns = time.monotonic_ns()
            self.paired_event.set()
            self.worker.on_pair_change(+1)
        elif before and not after:
            self.paired_event.clear()
            self.worker.on_pair_change(-1)

    def on_control(self, conn: WsConn, message: dict[str, Any]) -> None:
        if conn is not self.conns[conn.role]:
            return  # a socket this pair has dropped
        kind = message.get("type")
        if kind == "peer_joined":
            self._set_peered(conn.role, True)
        elif kind == "peer_disconnected":
            self._set_peered(conn.role, False)
        elif kind == "room_registered":
            if conn.role == "mac" and self.registered is not None and not self.registered.done():
                self.registered.set_result(message)
        elif kind == "error":
            self.worker.note_error(f"{conn.role}: {message.get('code')} {message.get('message', '')}")
            if conn.role == "mac" and self.registered is not None and not self.registered.done():
                self.registered.set_exception(RuntimeError(f"register_room: {message}"))
        elif kind != "heartbeat_ack":
            self.worker.note_error(f"{conn.role}: unexpected {kind}")

    def on_lost(self, conn: WsConn) -> None:
        if conn is self.conns[conn.role]:  # not one this pair closed itself
            self.worker.disconnects += 1
            self._set_peered(conn.role, False)

    def register_message(self) -> bytes:
        return json.dumps(
            {
                "type": "register_room",
                "room_id": self.room_id,
                "secret_hash": self.secret_hash,
                "public_key": self.public_key,
                "session_nonce": _b64_key(),
                "ephemeral_key": _b64_key(),
            }
        ).encode()

    def join_message(self) -> bytes:
        return json.dumps(
            {
                "type": "join_room",
                "room_id": self.room_id,
                "public_key": _b64_key(),
                "secret_hash": self.secret_hash,
                "session_nonce": _b64_key(),
                "ephemeral_key": _b64_key(),
            }
        ).encode()

    def drop(self) -> None:
        """Close both sockets at once, as a network loss or an edge restart would."""
        for role in ("mac", "ios"):
            conn = self.conns[role]
            self._set_peered(role, False)
            self.conns[role] = None
            if conn is not None:
                conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {_OPEN_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}"


def _b64_key() -> str:
    return binascii.b2a_base64(secrets.token_bytes(32), newline=False).decode()


def _ws_url(base: str, room_id: str, role: str) -> str:
    base = base.rstrip("/")
    if not base.endswith("/ws"):
        base += "/ws"
    return f"{base}?room_id={room_id}&role={role}"


# --- a worker process ---------------------------------------------------------------


class Worker:
    """The pairs of one process, and the commands it takes from the coordinator."""

    def __init__(self, index: int, cfg: LoadConfig, pair_indices: list[int], run_tag: str, pipe: Any) -> None:
        self.index, self.cfg, self.pair_indices, self.run_tag, self.pipe = index, cfg, pair_indices, run_tag, pipe
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pairs: list[Pair] = []
        self.active: list[Pair] = []
        self.headers = {"User-Agent": "termrelay-bench"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._dirty: list[WsConn] = []
        self._flush_scheduled = False
        # Traffic state, read on every frame.
        self.window_mode = cfg.mode == "max"
        self.sending = False
        self.window_start_ns = self.window_end_ns = 0
        self.latencies = array("q")
        self.sent_at = array("q")  # send time of each latency sample, for the timeline
        self.delivered_in_window = 0
        self.outstanding = 0
        self.send_failures = 0
        self.disconnects = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.paired_count = 0
        self.all_paired = asyncio.Event()
        self.retries = 0

    # plumbing

    def mark_dirty(self, conn: WsConn) -> None:
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if conn.dirty:
                conn.flush()

    def note_error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])

    def on_pair_change(self, delta: int) -> None:
        self.paired_count += delta
        if self.paired_count == len(self.active) and self.active:
            self.all_paired.set()
        else:
            self.all_paired.clear()

    async def _command(self) -> dict[str, Any]:
        """The coordinator's next command, without blocking the loop."""
        fd = self.pipe.fileno()
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()

        def readable() -> None:
            self.loop.remove_reader(fd)
            try:
                future.set_result(self.pipe.recv())
            except Exception as exc:  # EOFError: the coordinator is gone
                future.set_exception(exc)

        self.loop.add_reader(fd, readable)
        return await future

    async def _open(self, pair: Pair, role: str) -> WsConn:
        url = pair.mac_url if role == "mac" else pair.ios_url
        parts = urlsplit(url)
        conn = WsConn(self, pair, role, url, self.headers)
        try:
            secure = parts.scheme == "wss"
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn, parts.hostname, parts.port or (443 if secure else 80), ssl=True if secure else None
                ),
                _OPEN_TIMEOUT_S,
            )
            await asyncio.wait_for(conn.opened, _OPEN_TIMEOUT_S)
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        pair.conns[role] = conn
        return conn

    # phases

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        rng = random.Random()
        tail_raw = rng.randbytes(self.cfg.payload_bytes * 3 // 4 - _STAMP.size)
        tail = binascii.b2a_base64(tail_raw, newline=False) + b'"}'
        mac_urls, ios_urls = self.cfg.mac_urls, self.cfg.ios_urls or self.cfg.mac_urls
        self.pairs = [Pair(self, i, mac_urls[i % len(mac_urls)], ios_urls[i % len(ios_urls)], tail) for i in self.pair_indices]
        heartbeats = asyncio.create_task(self._heartbeats())
        try:
            self.pipe.send(await self._setup())
            while True:
                command = await self._command()
                kind = command["cmd"]
                if kind == "traffic":
                    self.pipe.send(await self._traffic(command))
                elif kind == "storm":
                    self.pipe.send(await self._storm(command))
                elif kind == "close":
                    for pair in self.pairs:
                        pair.drop()
                    await asyncio.sleep(0.2)
                    self.pipe.send({"phase": "closed"})
                    return
        finally:
            heartbeats.cancel()

    async def _setup(self) -> dict[str, Any]:
        workers = self.cfg.worker_count()
        gate = asyncio.Semaphore(max(1, math.ceil(self.cfg.setup_concurrency / workers)))
        times: list[int] = []

        async def one(pair: Pair) -> None:
            async with gate:
                started = time.monotonic_ns()
                try:
                    mac = await self._open(pair, "mac")
                    pair.registered = self.loop.create_future()
                    mac.send(pair.register_message())
                    await asyncio.wait_for(pair.registered, _OPEN_TIMEOUT_S)
                    ios = await self._open(pair, "ios")
                    ios.send(pair.join_message())
                    await asyncio.wait_for(pair.paired_event.wait(), _OPEN_TIMEOUT_S)
                except Exception as exc:
                    pair.failure = _describe(exc)
                    self.note_error(f"pair {pair.index} set-up: {pair.failure}")
                    pair.drop()
                    return
                times.append(time.monotonic_ns() - started)
                self.active.append(pair)

        await asyncio.gather(*(one(pair) for pair in self.pairs))
        self.paired_count = sum(1 for pair in self.active if pair.is_paired)
        return {"phase": "setup", "setup_ns": times, "failed": len(self.pairs) - len(self.active), **self._problems()}

    def _problems(self) -> dict[str, Any]:
        return {"errors": self.errors, "error_samples": self.error_samples, "disconnects": self.disconnects}

    async def _heartbeats(self) -> None:
        """A heartbeat from every socket every `heartbeat_s`, each socket at its own phase.

        Phases are spread evenly over the interval, as independent clients' are: sent in
        bursts (all sockets due in the same second at once), the heartbeats would put a
        once-a-second stall into every relay's latency tail that real traffic never makes.
        """
        interval = self.cfg.heartbeat_s
        slots = random.sample([(pair, role) for pair in self.pairs for role in ("mac", "ios")], 2 * len(self.pairs))
        if not slots:
            return
        step = interval / len(slots)
        start = self.loop.time()
        for cycle in itertools.count():
            for n, (pair, role) in enumerate(slots):
                due = start + cycle * interval + n * step
                if due > self.loop.time():
                    await asyncio.sleep(due - self.loop.time())
                conn = pair.conns[role]
                if conn is not None and conn.is_open:
                    conn.send(HEARTBEAT)

    async def _traffic(self, command: dict[str, Any]) -> dict[str, Any]:
        cfg, loop = self.cfg, self.loop
        start, window_start, window_end = command["start"], command["window_start"], command["window_end"]
        self.window_start_ns, self.window_end_ns = int(window_start * 1e9), int(window_end * 1e9)
        streams = [s for pair in self.active for s in (pair.up, pair.down)]
        cpu: dict[str, float] = {}

        def begin() -> None:
            self.sending = True
            if self.window_mode:
                for _ in range(cfg.window):
                    for stream in streams:
                        stream.send_next()
            else:
                RateSchedule(self, streams, cfg.rate).tick()

        def stop() -> None:
            self.sending = False
            cpu["end"] = time.process_time()

        loop.call_at(start, begin)
        loop.call_at(window_start, lambda: cpu.__setitem__("start", time.process_time()))
        loop.call_at(window_end, stop)
        await asyncio.sleep(max(0.0, window_end - loop.time()) + 0.01)
        drain_until = loop.time() + cfg.drain_s
        while self.outstanding > 0 and loop.time() < drain_until:
            await asyncio.sleep(0.02)
        sent = sum(s.sent for s in streams)
        received = sum(s.received for s in streams)
        return {
            "phase": "traffic",
            "sent": sent,
            "received": received,
            "duplicates": sum(s.duplicates for s in streams),
            "reordered": sum(s.reordered for s in streams),
            "delivered_in_window": self.delivered_in_window,
            "latencies": self.latencies.tobytes(),
            "sent_at": self.sent_at.tobytes(),
            "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0),
            "send_failures": self.send_failures,
            **self._problems(),
        }

    async def _storm(self, command: dict[str, Any]) -> dict[str, Any]:
        loop = self.loop
        await asyncio.sleep(max(0.0, command["at"] - loop.time()))
        drop_ns = time.monotonic_ns()
        for pair in self.active:
            pair.drop()
        deadline = loop.time() + self.cfg.storm_timeout_s

        async def reconnect(pair: Pair, role: str) -> None:
            while loop.time() < deadline:
                try:
                    conn = await self._open(pair, role)
                    conn.send(pair.register_message() if role == "mac" else pair.join_message())
                    return
                except Exception as exc:
                    self.retries += 1
                    if self.retries <= 3:
                        self.note_error(f"storm reconnect of {role}: {_describe(exc)}")
                    await asyncio.sleep(0.2 + random.random() * 0.3)

        tasks = [asyncio.create_task(reconnect(pair, role)) for pair in self.active for role in ("mac", "ios")]
        try:
            await asyncio.wait_for(self.all_paired.wait(), max(0.0, deadline - loop.time()))
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        for task in tasks:
            task.cancel()
        paired_ns = [pair.paired_at_ns - drop_ns for pair in self.active if pair.is_paired]
        # One frame each way proves that the new sockets are really paired.
        before = [(pair.up.received, pair.down.received) for pair in self.active]
        self.sending = False
        self.window_start_ns = self.window_end_ns = 0
        for pair in self.active:
            pair.up.send_next()
            pair.down.send_next()
        verify_until = loop.time() + 5.0
        while self.outstanding > 0 and loop.time() < verify_until:
            await asyncio.sleep(0.02)
        verified = sum(
            1 for pair, (up, down) in zip(self.active, before) if pair.up.received > up and pair.down.received > down
        )
        return {
            "phase": "storm",
            "drop_ns": drop_ns,
            "paired_after_ns": paired_ns,
            "unpaired": len(self.active) - len(paired_ns),
            "verified": verified,
            "timed_out": timed_out,
            "retries": self.retries,
            **self._problems(),
        }


class RateSchedule:
    """Mode "rate": every stream sends `rate` frames/s on a fixed grid (open loop, no drift).

    The streams' phases are spread evenly over one interval, in random order; one timer
    per worker sends whatever is due, so a loop turn serves many streams at high rates.
    """

    _MIN_STEP_S = 0.0005

    def __init__(self, worker: "Worker", streams: list[Stream], rate: float) -> None:
        self.worker = worker
        self.order = random.sample(streams, len(streams))
        self.interval = 1.0 / rate
        self.phases = [self.interval * i / len(streams) for i in range(len(streams))]
        self.start = worker.loop.time()
        self.cursor = self.cycle = 0

    def tick(self) -> None:
        w = self.worker
        if not w.sending or not self.order:
            return
        now = w.loop.time()
        order, phases, n = self.order, self.phases, len(self.order)
        while True:
            due = self.start + self.cycle * self.interval + phases[self.cursor]
            if due > now:
                break
            order[self.cursor].send_next()
            self.cursor += 1
            if self.cursor == n:
                self.cursor = 0
                self.cycle += 1
        w.loop.call_at(max(due, now + self._MIN_STEP_S), self.tick)


def _worker_main(index: int, cfg: LoadConfig, pair_indices: list[int], run_tag: str, pipe: Any) -> None:
    """Entry point of a worker process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator ends us, by PID
    raise_nofile_limit()
    if cfg.cpus:
        try:
            os.sched_setaffinity(0, cfg.cpus)
        except OSError:
            pass
    try:
        asyncio.run(Worker(index, cfg, pair_indices, run_tag, pipe).run())
    except (EOFError, BrokenPipeError):
        pass  # the coordinator went away
    except BaseException:
        try:
            pipe.send({"phase": "error", "error": traceback.format_exc()})
        except Exception:
            pass
        raise


# --- the coordinator ----------------------------------------------------------------


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    rank = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


class _Workers:
    """The worker processes of one run, ended by PID however the run ends."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        count = cfg.worker_count()
        run_tag = secrets.token_hex(4)
        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for w in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(w, cfg, list(range(w, cfg.pairs, count)), run_tag, child),
                name=f"loadgen-{w}",
                daemon=True,
            )
            self.pipes.append(parent)
            self.procs.append(proc)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    def broadcast(self, message: dict[str, Any]) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def gather(self, phase: str, timeout: float = _PHASE_TIMEOUT_S) -> list[dict[str, Any]]:
        """One answer of `phase` from every worker; raises if one fails, dies or is late."""
        answers: list[dict[str, Any] | None] = [None] * len(self.pipes)
        deadline = time.monotonic() + timeout
        while any(a is None for a in answers):
            for i, (pipe, proc) in enumerate(zip(self.pipes, self.procs)):
                if answers[i] is not None:
                    continue
                if pipe.poll(0.05):
                    answer = pipe.recv()
                    if answer.get("phase") == "error":
                        raise RuntimeError(f"load worker {i} failed:\n{answer['error']}")
                    if answer.get("phase") != phase:
                        raise RuntimeError(f"load worker {i} answered {answer.get('phase')}, expected {phase}")
                    answers[i] = answer
                elif not proc.is_alive():
                    raise RuntimeError(f"load worker {i} (pid {proc.pid}) exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load workers did not finish {phase} within {timeout:.0f} s")
        return answers  # type: ignore[return-value]

    def stop(self, grace: float = 0.0) -> None:
        """End every worker by PID: after `grace` seconds to exit by itself, SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + grace
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()  # SIGTERM to that PID
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
        for pipe in self.pipes:
            pipe.close()


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Run one load test as `cfg` says, in worker processes; returns the report (see `REPORT_FIELDS`)."""
    workers = _Workers(cfg)
    report: dict[str, Any] = {
        "label": cfg.label,
        "mode": cfg.mode,
        "pairs": cfg.pairs,
        "workers": len(workers.procs),
        "payload_bytes": cfg.payload_bytes,
        "rate_per_direction": cfg.rate if cfg.mode == "rate" else None,
        "window": cfg.window if cfg.mode == "max" else None,
        "duration_s": cfg.duration_s if cfg.mode in ("max", "rate") else None,
        "mac_urls": cfg.mac_urls,
        "ios_urls": cfg.ios_urls or cfg.mac_urls,
    }
    relay: dict[str, Any] = {"pid": cfg.relay_pid}
    if cfg.relay_pid:
        relay["rss_before_kib"] = proc_rss_kib(cfg.relay_pid)
    setup_started = time.monotonic()
    try:
        workers.start()
        setups = workers.gather("setup", _PHASE_TIMEOUT_S + cfg.pairs * 0.05)
        setup_ns = sorted(t for s in setups for t in s["setup_ns"])
        report["setup"] = {
            "paired": len(setup_ns),
            "failed": sum(s["failed"] for s in setups),
            "p50_ms": _ms(_percentile(setup_ns, 50)),
            "max_ms": _ms(setup_ns[-1] if setup_ns else 0),
            "total_s": round(time.monotonic() - setup_started, 3),
        }
        last = setups
        if cfg.mode in ("max", "rate"):
            last = _measure_traffic(cfg, workers, report, relay)
        elif cfg.mode == "idle":
            time.sleep(cfg.idle_settle_s)
            if cfg.relay_pid:
                relay["rss_after_kib"] = proc_rss_kib(cfg.relay_pid)
                connections = 2 * report["setup"]["paired"]
                grown = relay["rss_after_kib"] - relay["rss_before_kib"]
                relay["kib_per_connection"] = round(grown / connections, 2) if connections else None
        else:
            last = _measure_storm(cfg, workers, report)
        if cfg.relay_pid:
            relay.setdefault("rss_kib", proc_rss_kib(cfg.relay_pid))
        report["relay"] = relay
        report["errors"] = sum(a["errors"] for a in last)
        report["error_samples"] = [e for a in last for e in a["error_samples"]][:10]
        report["disconnects"] = sum(a["disconnects"] for a in last)
        workers.broadcast({"cmd": "close"})
        workers.gather("closed", 30)
        workers.stop(grace=5.0)
    finally:
        workers.stop()
    return report


def _measure_traffic(cfg: LoadConfig, workers: _Workers, report: dict[str, Any], relay: dict[str, Any]) -> list[dict]:
    start = time.monotonic() + 0.3
    window_start = start + cfg.warmup_s
    window_end = window_start + cfg.duration_s
    workers.broadcast({"cmd": "traffic", "start": start, "window_start": window_start, "window_end": window_end})
    _sleep_until(window_start)
    relay_cpu0 = proc_cpu_s(cfg.relay_pid) if cfg.relay_pid else None
    nats_cpu0 = proc_cpu_s(cfg.nats_pid) if cfg.nats_pid else None
    _sleep_until(window_end)
    if cfg.relay_pid:
        relay["cpu_s"] = round(proc_cpu_s(cfg.relay_pid) - relay_cpu0, 3)
        relay["cpu_util"] = round(relay["cpu_s"] / cfg.duration_s, 3)
        relay["rss_kib"] = proc_rss_kib(cfg.relay_pid)
    if cfg.nats_pid:
        nats_cpu = proc_cpu_s(cfg.nats_pid) - nats_cpu0
        report["nats"] = {"pid": cfg.nats_pid, "cpu_s": round(nats_cpu, 3), "cpu_util": round(nats_cpu / cfg.duration_s, 3)}
    results = workers.gather("traffic", cfg.drain_s + 30)
    latencies: list[int] = []
    sent_at: list[int] = []
    for r in results:
        for name, into in (("latencies", latencies), ("sent_at", sent_at)):
            chunk = array("q")
            chunk.frombytes(r[name])
            into.extend(chunk)
    timeline = latency_timeline(sent_at, latencies, int(window_start * 1e9), cfg.duration_s)
    latencies.sort()
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    delivered = sum(r["delivered_in_window"] for r in results)
    loadgen_cpu = sum(r["cpu_s"] for r in results)
    report.update(
        sent=sent,
        received=received,
        delivered_per_s=round(delivered / cfg.duration_s, 1),
        latency_ms={
            "p50": _ms(_percentile(latencies, 50)),
            "p90": _ms(_percentile(latencies, 90)),
            "p99": _ms(_percentile(latencies, 99)),
            "max": _ms(latencies[-1] if latencies else 0),
            "samples": len(latencies),
        },
        lost=sent - received,
        loss_ratio=round((sent - received) / sent, 6) if sent else 0.0,
        reordered=sum(r["reordered"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        send_failures=sum(r["send_failures"] for r in results),
        loadgen={"cpu_s": round(loadgen_cpu, 3), "cpu_util": round(loadgen_cpu / cfg.duration_s, 3)},
        latency_timeline=timeline,
    )
    return results


TIMELINE_STEP_MS = 100
SLOW_FRAME_MS = 5.0


def latency_timeline(sent_at: list[int], latencies: list[int], window_start_ns: int, duration_s: float) -> dict[str, Any]:
    """Where in the window the slow frames were: per `TIMELINE_STEP_MS` of send time, the
    frames slower than `SLOW_FRAME_MS` and the slowest. A tail that comes from a periodic
    stall shows as a few steps holding most slow frames; one from queueing, spread thin."""
    steps = max(1, int(duration_s * 1000 / TIMELINE_STEP_MS))
    slow, worst = [0] * steps, [0] * steps
    step_ns, slow_ns = TIMELINE_STEP_MS * 1_000_000, SLOW_FRAME_MS * 1e6
    for sent_ns, latency in zip(sent_at, latencies):
        i = min(steps - 1, max(0, (sent_ns - window_start_ns) // step_ns))
        if latency > slow_ns:
            slow[i] += 1
        worst[i] = max(worst[i], latency)
    return {
        "step_ms": TIMELINE_STEP_MS,
        "slow_ms": SLOW_FRAME_MS,
        "window_start_unix": round(time.time() - (time.monotonic_ns() - window_start_ns) / 1e9, 3),
        "slow": slow,
        "worst_ms": [round(w / 1e6, 2) for w in worst],
    }


def _measure_storm(cfg: LoadConfig, workers: _Workers, report: dict[str, Any]) -> list[dict]:
    workers.broadcast({"cmd": "storm", "at": time.monotonic() + 0.5})
    results = workers.gather("storm", cfg.storm_timeout_s + 30)
    paired = sorted(t for r in results for t in r["paired_after_ns"])
    unpaired = sum(r["unpaired"] for r in results)
    report["storm"] = {
        "all_paired_s": round(paired[-1] / 1e9, 3) if paired and not unpaired else None,
        "p50_s": round(_percentile(paired, 50) / 1e9, 3),
        "paired": len(paired),
        "unpaired": unpaired,
        "verified": sum(r["verified"] for r in results),
        "timed_out": any(r["timed_out"] for r in results),
        "retries": sum(r["retries"] for r in results),
        "timeout_s": cfg.storm_timeout_s,
    }
    return results


# Fields every report has, by mode (the smoke test checks them).
REPORT_FIELDS = {
    "common": ("label", "mode", "pairs", "workers", "payload_bytes", "setup", "relay", "errors", "disconnects"),
    "traffic": (
        "sent", "received", "delivered_per_s", "latency_ms", "lost", "loss_ratio", "reordered", "duplicates", "loadgen",
    ),
    "idle": (),
    "storm": ("storm",),
}


def summary(report: dict[str, Any]) -> str:
    """One line for people: the figures that matter for the report's mode."""
    label = f"{report['label']}: " if report.get("label") else ""
    mode, pairs = report["mode"], report["pairs"]
    setup = report["setup"]
    relay = report.get("relay", {})
    head = f"{label}{mode} {pairs} pairs"
    tail = f"set-up p50/max {setup['p50_ms']:.0f}/{setup['max_ms']:.0f} ms"
    if setup["failed"]:
        tail += f", {setup['failed']} pairs FAILED"
    if report.get("errors"):
        tail += f", {report['errors']} errors"
    if mode in ("max", "rate"):
        lat = report["latency_ms"]
        cpu = f", relay CPU {relay['cpu_util']:.2f} core, RSS {relay['rss_kib'] / 1024:.1f} MiB" if "cpu_util" in relay else ""
        return (
            f"{head}: {report['delivered_per_s']:.0f} frames/s, latency p50/p90/p99/max "
            f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f}/{lat['max']:.2f} ms, lost {report['lost']}, "
            f"reordered {report['reordered']}, duplicates {report['duplicates']}{cpu}, "
            f"loadgen CPU {report['loadgen']['cpu_util']:.2f} core, {tail}"
        )
    if mode == "idle":
        if "kib_per_connection" in relay:
            return (
                f"{head}: relay RSS {relay['rss_before_kib'] / 1024:.1f} -> {relay['rss_after_kib'] / 1024:.1f} MiB, "
                f"{relay['kib_per_connection']:.1f} KiB per connection, {tail}"
            )
        return f"{head}: paired and idle (no --relay-pid, no RSS), {tail}"
    storm = report["storm"]
    done = f"all paired again in {storm['all_paired_s']:.2f} s" if storm["all_paired_s"] is not None else (
        f"NOT all paired: {storm['unpaired']} left after {storm['timeout_s']:g} s"
    )
    return (
        f"{head}: {done} (p50 {storm['p50_s']:.2f} s), {storm['verified']}/{storm['paired'] + storm['unpaired']} "
        f"verified by a frame each way, {storm['retries']} reconnect retries, {tail}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", action="append", required=True, help="relay base URL for Macs (repeat: pairs take them in turn)")
    parser.add_argument("--ios-url", action="append", default=[], help="relay base URL for iPhones (default: --url)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--mode", choices=MODES, default="max")
    parser.add_argument("--rate", type=float, default=5.0, help="frames/s per direction (mode rate)")
    parser.add_argument("--window", type=int, default=8, help="frames in flight per direction (mode max)")
    parser.add_argument("--payload", type=int, default=256, help="payload size: base64 characters, a multiple of 4")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before the measurement")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: by pair count and CPUs)")
    parser.add_argument("--api-key", default=None, help="API key (Authorization: Bearer); prefer --api-key-file")
    parser.add_argument("--api-key-file", default=None, help="file whose last line is the API key (relay-admin keys create)")
    parser.add_argument("--relay-pid", type=int, default=None, help="PID of the relay: its CPU and RSS are reported")
    parser.add_argument("--nats-pid", type=int, default=None, help="PID of nats-server: its CPU is reported")
    parser.add_argument("--setup-concurrency", type=int, default=64, help="pairs being set up at once")
    parser.add_argument(
        "--heartbeat", type=float, default=20.0, help="seconds between one socket's heartbeats (TermOnMac: 1 s active Mac, 3 s iPhone)"
    )
    parser.add_argument("--storm-timeout", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="write the report here (default: standard output)")
    args = parser.parse_args(argv)
    api_key = args.api_key
    if args.api_key_file:
        with open(args.api_key_file) as f:
            api_key = [line.strip() for line in f if line.strip()][-1]
    cfg = LoadConfig(
        mac_urls=args.url,
        ios_urls=args.ios_url,
        pairs=args.pairs,
        mode=args.mode,
        rate=args.rate,
        window=args.window,
        payload_bytes=args.payload,
        duration_s=args.duration,
        warmup_s=args.warmup,
        workers=args.workers,
        api_key=api_key,
        relay_pid=args.relay_pid,
        nats_pid=args.nats_pid,
        setup_concurrency=args.setup_concurrency,
        heartbeat_s=args.heartbeat,
        storm_timeout_s=args.storm_timeout,
    )
    raise_nofile_limit()
    report = run_load(cfg)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(summary(report), file=sys.stderr)


if __name__ == "__main__":
    main()
