"""A load generator for relays that speak the TermOnMac protocol: N pairs, frames both ways.

    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 100 --mode max --duration 10
    .venv/bin/python -m bench.loadgen --url ws://A:8080 --ios-url ws://B:8080 --pairs 1000 --mode rate --rate 5
    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 2000 --mode idle --relay-pid PID
    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 2000 --mode storm
    .venv/bin/python -m bench.loadgen --url ws://127.0.0.1:8080 --pairs 200 --mode realistic --relay-pid PID

Each pair is a Mac (`register_room`, on a `--url`) and an iPhone (`join_room` with the
room's secret hash, on an `--ios-url`, by default the same), both in one worker
process, so a frame's send and receipt are counted by the same process and frames in
flight are known exactly. Pairs are spread over worker processes (spawned) so the
generator is not the bottleneck; each raises RLIMIT_NOFILE to its hard limit.

Every frame is `{"type":"relay","payload":P}` (or, in mode `realistic`, also
`{"type":"relay_batch","payloads":[P,…]}`), each P being base64 text of `--payload` bytes
whose first 24 characters carry the sequence number and the send time
(`time.monotonic_ns()`, one clock for every process on Linux, so one-way latency across
processes is valid). Sequence, loss and latency are per payload, inside batches too.

Modes:
- `max`: each direction keeps `--window` frames in flight, sending the next as one arrives.
- `rate`: each direction sends `--rate` frames/s (open loop, random phase per direction).
- `idle`: pairs stay paired and idle; the relay's RSS before and
  after, and KiB per connection (needs `--relay-pid`).
- `storm`: after pairing, every socket is closed at once and reconnected at once; the time
  until every pair has `peer_joined` on both new sockets, then one frame each way checks it.
- `realistic`: pairs behave as TermOnMac's clients do (protocol.md §3.2.4, §5, §9). The
  iPhone types `--keystroke-rate` (3) `relay` frames/s of `--keystroke-payload` (40)
  characters; the Mac queues an echo of each into its coalescer, which sends what it holds
  50 ms after the first payload queued, or at once at 20: one payload as `relay`, more as
  `relay_batch`. About every `--burst-every` seconds (5) per pair the Mac also queues an
  output burst (several payloads, 1/4 to all of `--burst-bytes`, 32 KiB, in total) into
  the same coalescer. Beside each pair, `--idle-macs-per-pair` (5) Macs with no iPhone
  only register and heartbeat.

In every mode but `realistic` each socket sends a heartbeat every `--heartbeat` seconds
(20), at its own phase of the interval; in `realistic` a paired Mac every 1 s, an iPhone
every 3 s and an idle Mac every 30 s, as TermOnMac's do. Every `heartbeat_ack` is counted
against the heartbeats sent, per socket.

Reports JSON (`--json FILE`, else standard output) and a one-line summary on standard error:
delivered frames/s, one-way latency p50/p90/p99/max, loss, reordering, duplicates, pair
set-up time, and, with `--relay-pid`, the relay's CPU seconds in the measured window and
its RSS; in `realistic` also batches, bursts, heartbeats answered, sockets, and the relay's
CPU per active pair. Runs by hand; never part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import secrets
import signal
import struct
import sys
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.http11 import Response
from websockets.uri import parse_uri

from runtime.service import raise_open_files_limit

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

MODES = ("max", "rate", "idle", "storm", "realistic")

# The frames' fixed heads, as the product re-serialises them and as the reference forwards them.
RELAY_PREFIX = b'{"type":"relay","payload":"'
_PREFIX_LEN = len(RELAY_PREFIX)
BATCH_PREFIX = b'{"type":"relay_batch","payloads":["'
_BATCH_PREFIX_LEN = len(BATCH_PREFIX)
_BATCH_SEP = b'","'
HEARTBEAT_ACK_PREFIX = b'{"type":"heartbeat_ack"'
_ACK_PREFIX_LEN = len(HEARTBEAT_ACK_PREFIX)
# seq, send time (monotonic ns), spare: 18 bytes, which are exactly 24 base64 characters.
_STAMP = struct.Struct("<QQH")
_STAMP_B64 = 24
HEARTBEAT = b'{"type":"heartbeat"}'

TRAFFIC_MODES = ("max", "rate", "realistic")

_OPEN_TIMEOUT_S = 10.0
# The Mac agent's reconnect back-off (protocol.md §5.2): 0.5 s, doubled up to 8 s.
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 8.0
_PHASE_TIMEOUT_S = 120.0
# A heartbeat sent longer ago than this and not answered counts as unanswered.
_ACK_GRACE_NS = 1_000_000_000


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
    other_pids: dict[str, int] = field(default_factory=dict)  # more processes whose CPU in the window is reported
    setup_concurrency: int = 64  # pairs being set up at once, over all workers
    heartbeat_s: float = 20.0
    idle_settle_s: float = 5.0
    storm_timeout_s: float = 60.0
    cpus: list[int] | None = None  # CPU affinity of the workers (default: inherited)
    label: str = ""
    # Mode "realistic": TermOnMac's cadence (protocol.md §3.2.4, §5, §9).
    keystroke_rate: float = 3.0  # keystroke frames/s per iPhone
    keystroke_bytes: int = 40  # payload characters of a keystroke and of its echo
    batch_window_s: float = 0.05  # the Mac's coalescer: flush this long after the first payload…
    batch_max: int = 20  # …or at once at this many
    burst_every_s: float = 5.0  # mean seconds between one pair's output bursts; 0: none
    burst_bytes: int = 32 * 1024  # most payload characters of one burst, in total
    burst_chunk: int = 4096  # most payload characters of one burst payload
    idle_macs_per_pair: int = 5  # Macs with no iPhone, per active pair
    mac_heartbeat_s: float = 1.0  # a paired Mac's
    ios_heartbeat_s: float = 3.0
    idle_heartbeat_s: float = 30.0  # a Mac with no iPhone

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
        if self.mode == "realistic":
            for name in ("keystroke_bytes", "burst_chunk"):
                size = getattr(self, name)
                if size < _STAMP_B64 or size % 4:
                    raise ValueError(f"{name} must be a multiple of 4 and at least {_STAMP_B64}")
            if self.burst_bytes < 2 * _STAMP_B64:
                raise ValueError(f"burst_bytes must be at least {2 * _STAMP_B64}")
            if self.keystroke_rate <= 0 or self.batch_window_s <= 0 or self.batch_max < 2:
                raise ValueError("keystroke_rate and batch_window_s must be positive, batch_max at least 2")
            if min(self.mac_heartbeat_s, self.ios_heartbeat_s, self.idle_heartbeat_s) <= 0:
                raise ValueError("heartbeat intervals must be positive")
            if self.idle_macs_per_pair < 0 or self.burst_every_s < 0:
                raise ValueError("idle_macs_per_pair and burst_every_s must not be negative")

    @property
    def idle_macs(self) -> int:
        """Macs with no iPhone beside the pairs (mode "realistic" only)."""
        return self.pairs * self.idle_macs_per_pair if self.mode == "realistic" else 0

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
    """Raise this process's open-file limit to its hard limit (as the edge does); returns it."""
    return raise_open_files_limit(logging.getLogger("bench.loadgen"))


# --- one WebSocket client ----------------------------------------------------------
#
# The generator must cost less per frame than the relay it measures. websockets' asyncio
# client costs a task, a queue and a lock per message, so websockets' Sans-I/O protocol
# does only the opening handshake here; frames are then read and written directly (a
# server's frames are unmasked and simple) and each socket is written once per loop turn.


def client_frame(opcode: int, data: bytes) -> bytes:
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


def split_frames(buf: bytes, on_frame: Callable[[int, bytes], None]) -> bytes:
    """Hand each whole server frame in `buf` (unmasked: server to client) to
    `on_frame(first byte, payload)`; returns the bytes of an incomplete last frame."""
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
        on_frame(b0, buf[pos + head : end])
        pos = end
    return buf[pos:] if pos < n else b""


class WsConn(asyncio.Protocol):
    """A client socket of one pair (or of an idle Mac): `role` is "mac" or "ios"."""

    def __init__(self, worker: "Worker", pair: "Pair", role: str, url: str, headers: dict[str, str]) -> None:
        self.worker, self.pair, self.role = worker, pair, role
        self.inbound: Stream = pair.down if role == "mac" else pair.up
        self.handshake: ClientProtocol | None = ClientProtocol(parse_uri(url), max_size=None)
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = worker.loop.create_future()
        self.is_open = False
        self.lost = False
        self.ended: asyncio.Event | None = None  # made by whoever waits for the socket's end
        self.close_code: int | None = None  # the relay's, from its close frame
        self.dirty = False
        self._out: list[bytes] = []
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        # Acks come in the order of the heartbeats: one count and the last send time suffice.
        self.hb_sent = self.hb_acked = 0
        self.hb_sent_ns = 0

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
        self._buffer = split_frames(self._buffer + data if self._buffer else data, self._frame)

    def _handshake_data(self, data: bytes) -> None:
        proto = self.handshake
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Response):
                if proto.handshake_exc is not None:
                    self._settle_opened(proto.handshake_exc)
                    self.transport.close()
                    return
                self.handshake = None
                self.is_open = True
                self._settle_opened(None)
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
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
            if self.is_open:
                self.is_open = False
                self.transport.write(client_frame(_OP_CLOSE, payload[:2]))
            self.transport.close()
        elif opcode == _OP_PING:
            self.transport.write(client_frame(0xA, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.is_open = False
        self._settle_opened(ConnectionError(f"connection lost before the handshake: {exc}"))
        if self.ended is not None:
            self.ended.set()
        self.pair.on_lost(self)

    def _settle_opened(self, exc: BaseException | None) -> None:
        """Settle `opened` once; an error nobody awaits any more (its wait timed out) is
        marked as seen, so asyncio does not log it at exit."""
        if self.opened.done():
            return
        if exc is None:
            self.opened.set_result(None)
        else:
            self.opened.set_exception(exc)
            self.opened.exception()

    # sending

    def send(self, data: bytes) -> bool:
        """Queue a text frame; it is written with the others at the end of this loop turn."""
        if not self.is_open:
            self.worker.send_failures += 1
            return False
        self._out.append(client_frame(_OP_TEXT, data))
        if not self.dirty:
            self.dirty = True
            self.worker.mark_dirty(self)
        return True

    def heartbeat(self) -> None:
        if self.send(HEARTBEAT):
            self.hb_sent += 1
            self.hb_sent_ns = time.monotonic_ns()

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
            self._out.append(client_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
            self.flush()
        self.transport.close()

    # receiving

    def on_message(self, data: bytes) -> None:
        if data[:_PREFIX_LEN] == RELAY_PREFIX:
            self.inbound.receive(data)
        elif data[:_BATCH_PREFIX_LEN] == BATCH_PREFIX:
            self.inbound.receive_batch(data)
        elif data[:_ACK_PREFIX_LEN] == HEARTBEAT_ACK_PREFIX:
            self.on_heartbeat_ack()
        else:
            try:
                message = json.loads(data)
            except ValueError:
                self.worker.note_error(f"{self.role}: undecodable message {data[:80]!r}")
                return
            self.pair.on_control(self, message)

    def on_heartbeat_ack(self) -> None:
        self.hb_acked += 1
        if self.hb_acked > self.hb_sent:
            self.worker.note_error(f"{self.role}: heartbeat_ack without a heartbeat")
        elif self.hb_acked == self.hb_sent:
            self.worker.note_heartbeat_ack(self.hb_sent_ns)


# --- pairs and their two directions -------------------------------------------------


class Stream:
    """One direction of one pair: what was sent, what arrived, in what order (per payload)."""

    __slots__ = (
        "worker", "pair", "from_role", "sent", "received", "duplicates", "reordered", "max_seq", "seen", "tail",
        "latencies", "sent_at", "echo",
    )  # fmt: skip

    def __init__(self, worker: "Worker", pair: "Pair", from_role: str, tail: bytes) -> None:
        self.worker, self.pair, self.from_role, self.tail = worker, pair, from_role, tail
        self.sent = self.received = self.duplicates = self.reordered = 0
        self.max_seq = -1
        self.seen = bytearray()
        # This direction's latency samples and their send times (the worker's arrays).
        self.latencies, self.sent_at = worker.samples[from_role]
        self.echo: Callable[[], None] | None = None  # called for each new payload, while sending

    def send_next(self) -> None:
        conn = self.pair.conns[self.from_role]
        if conn is None:
            return
        stamp = binascii.b2a_base64(_STAMP.pack(self.sent, time.monotonic_ns(), 0), newline=False)
        if conn.send(RELAY_PREFIX + stamp + self.tail):
            self.sent += 1
            self.worker.outstanding += 1

    def send_payloads(self, tails: Sequence[bytes]) -> None:
        """Payloads stamped now, with these tails (no closing quote): one as `relay`, more as
        `relay_batch`, as the Mac's coalescer sends them."""
        conn = self.pair.conns[self.from_role]
        if conn is None or not conn.is_open:
            self.worker.send_failures += 1
            return
        now, seq, pack = time.monotonic_ns(), self.sent, _STAMP.pack
        parts = [binascii.b2a_base64(pack(seq + i, now, 0), newline=False) + tail for i, tail in enumerate(tails)]
        if len(parts) == 1:
            data = RELAY_PREFIX + parts[0] + b'"}'
        else:
            data = BATCH_PREFIX + _BATCH_SEP.join(parts) + b'"]}'
        if conn.send(data):
            self.sent += len(parts)
            w = self.worker
            w.outstanding += len(parts)
            if len(parts) > 1:
                w.batches_sent += 1

    def receive(self, data: bytes) -> None:
        self._payload(data[_PREFIX_LEN : _PREFIX_LEN + _STAMP_B64], time.monotonic_ns())

    def receive_batch(self, data: bytes) -> None:
        """A `relay_batch`: each payload counted as a frame would be, in the batch's order."""
        now = time.monotonic_ns()
        pos, count = _BATCH_PREFIX_LEN, 0
        while True:
            self._payload(data[pos : pos + _STAMP_B64], now)
            count += 1
            pos = data.find(_BATCH_SEP, pos + _STAMP_B64)
            if pos < 0:
                break
            pos += len(_BATCH_SEP)
        w = self.worker
        w.batches_received += 1
        w.batch_payloads_received += count
        if w.window_start_ns <= now < w.window_end_ns:
            w.batches_in_window += 1
            w.batch_payloads_in_window += count

    def _payload(self, stamp: bytes, now: int) -> None:
        seq, sent_ns, _ = _STAMP.unpack(binascii.a2b_base64(stamp))
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
            self.latencies.append(now - sent_ns)
            self.sent_at.append(sent_ns)
        if w.window_start_ns <= now < w.window_end_ns:
            w.delivered_in_window += 1
        if w.sending:
            if w.window_mode:
                self.send_next()
            elif self.echo is not None:
                self.echo()


class Pair:
    """A Mac and an iPhone in one room; `conns` are their current sockets. An idle Mac
    (`lone`, mode "realistic") is a Pair whose iPhone never comes."""

    def __init__(self, worker: "Worker", index: int, mac_url: str, ios_url: str, tail: bytes, lone: bool = False) -> None:
        self.worker, self.index, self.lone = worker, index, lone
        self.room_id = f"bench-{worker.run_tag}-{'idle-' if lone else ''}{index}"
        secret = secrets.token_hex(16)
        self.secret_hash = hashlib.sha256(secret.encode()).hexdigest()
        self.public_key = b64_key()
        self.mac_url = _ws_url(mac_url, self.room_id, "mac")
        self.ios_url = _ws_url(ios_url, self.room_id, "ios")
        self.up = Stream(worker, self, "mac", tail)  # Mac → iPhone
        self.down = Stream(worker, self, "ios", tail)  # iPhone → Mac
        self.conns: dict[str, WsConn | None] = {"mac": None, "ios": None}
        self.peered = {"mac": False, "ios": False}
        self.role_peered = {"mac": asyncio.Event(), "ios": asyncio.Event()}  # mode "storm"
        self.paired_at_ns = 0
        self.paired_event = asyncio.Event()
        self.registered: asyncio.Future[dict] | None = None
        self.failure: str | None = None
        self.coalescer: Coalescer | None = None  # the Mac's, mode "realistic"

    @property
    def is_paired(self) -> bool:
        return self.peered["mac"] and self.peered["ios"]

    def _set_peered(self, role: str, value: bool) -> None:
        before = self.is_paired
        self.peered[role] = value
        (self.role_peered[role].set if value else self.role_peered[role].clear)()
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
        elif kind == "heartbeat_ack":
            conn.on_heartbeat_ack()  # one the fast path did not recognise (other spacing)
        else:
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
                "session_nonce": b64_key(),
                "ephemeral_key": b64_key(),
            }
        ).encode()

    def join_message(self) -> bytes:
        return json.dumps(
            {
                "type": "join_room",
                "room_id": self.room_id,
                "public_key": b64_key(),
                "secret_hash": self.secret_hash,
                "session_nonce": b64_key(),
                "ephemeral_key": b64_key(),
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


def b64_key() -> str:
    return binascii.b2a_base64(secrets.token_bytes(32), newline=False).decode()


def _ws_url(base: str, room_id: str, role: str) -> str:
    base = base.rstrip("/")
    if not base.endswith("/ws"):
        base += "/ws"
    return f"{base}?room_id={room_id}&role={role}"


# --- a worker process ---------------------------------------------------------------


class Worker:
    """The pairs of one process, and the commands it takes from the coordinator."""

    def __init__(
        self, index: int, cfg: LoadConfig, pair_indices: list[int], run_tag: str, pipe: Any, lone_indices: Sequence[int] = ()
    ) -> None:
        self.index, self.cfg, self.pair_indices, self.run_tag, self.pipe = index, cfg, pair_indices, run_tag, pipe
        self.lone_indices = list(lone_indices)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pairs: list[Pair] = []
        self.active: list[Pair] = []
        self.lone: list[Pair] = []  # idle Macs (mode "realistic")
        self.lone_active: list[Pair] = []  # those registered
        self.headers = {"User-Agent": "termrelay-bench"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._dirty: list[WsConn] = []
        self._flush_scheduled = False
        # Traffic state, read on every frame.
        self.window_mode = cfg.mode == "max"
        self.sending = False
        self.window_start_ns = self.window_end_ns = 0
        # Per direction (the sender's role): latency samples and their send times (for the timeline).
        self.samples = {role: (array("q"), array("q")) for role in ("mac", "ios")}
        self.delivered_in_window = 0
        self.batches_sent = self.batches_received = self.batch_payloads_received = 0
        self.batches_in_window = self.batch_payloads_in_window = 0
        self.bursts = 0
        self.heartbeat_ack_ns = array("q")  # heartbeat to ack, of heartbeats sent in the window
        self.beating = True
        self.flusher: FlushQueue | None = None
        self.outstanding = 0
        self.send_failures = 0
        self.disconnects = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.paired_count = 0
        self.all_paired = asyncio.Event()
        self.retries = 0
        self.closed_by_relay: dict[int, int] = {}  # mode "storm": close code → sockets

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

    def note_heartbeat_ack(self, sent_ns: int) -> None:
        if self.window_start_ns <= sent_ns < self.window_end_ns:
            self.heartbeat_ack_ns.append(time.monotonic_ns() - sent_ns)

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
        cfg = self.cfg
        realistic = cfg.mode == "realistic"
        tail = payload_tail(cfg.keystroke_bytes if realistic else cfg.payload_bytes) + b'"}'
        mac_urls, ios_urls = cfg.mac_urls, cfg.ios_urls or cfg.mac_urls
        self.pairs = [Pair(self, i, mac_urls[i % len(mac_urls)], ios_urls[i % len(ios_urls)], tail) for i in self.pair_indices]
        self.lone = [Pair(self, i, mac_urls[i % len(mac_urls)], ios_urls[0], tail, lone=True) for i in self.lone_indices]
        if realistic:
            self.flusher = FlushQueue(self.loop, cfg.batch_window_s)
            echo = payload_tail(cfg.keystroke_bytes)
            for pair in self.pairs:
                pair.coalescer = Coalescer(self.flusher, pair.up, cfg.batch_max)
                pair.down.echo = functools.partial(pair.coalescer.add, echo)
        self._start_heartbeats()
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
                    for pair in self.pairs + self.lone:
                        pair.drop()
                    await asyncio.sleep(0.2)
                    self.pipe.send({"phase": "closed"})
                    return
        finally:
            self.beating = False

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
                    if pair.lone:
                        self.lone_active.append(pair)
                        return
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

        # Pairs first: the idle Macs' registrations then come in while pairs are idle, as they would.
        await asyncio.gather(*(one(pair) for pair in self.pairs))
        await asyncio.gather(*(one(pair) for pair in self.lone))
        self.paired_count = sum(1 for pair in self.active if pair.is_paired)
        return {
            "phase": "setup",
            "setup_ns": times,
            "failed": len(self.pairs) - len(self.active),
            "idle_registered": len(self.lone_active),
            "idle_failed": len(self.lone) - len(self.lone_active),
            **self._problems(),
        }

    def _problems(self) -> dict[str, Any]:
        return {"errors": self.errors, "error_samples": self.error_samples, "disconnects": self.disconnects}

    def _start_heartbeats(self) -> None:
        """A heartbeat from every socket at its cadence, each socket at its own phase.

        Phases are spread evenly over the interval, as independent clients' are: sent in
        bursts (all sockets due in the same second at once), the heartbeats would put a
        once-a-second stall into every relay's latency tail that real traffic never makes.
        One timer per cadence and worker, not one per socket.
        """
        cfg = self.cfg
        if cfg.mode == "realistic":
            groups = [
                ([(pair, "mac") for pair in self.pairs], cfg.mac_heartbeat_s),
                ([(pair, "ios") for pair in self.pairs], cfg.ios_heartbeat_s),
                ([(pair, "mac") for pair in self.lone], cfg.idle_heartbeat_s),
            ]
        else:
            groups = [([(pair, role) for pair in self.pairs for role in ("mac", "ios")], cfg.heartbeat_s)]
        for slots, interval in groups:
            GridSchedule(self.loop, slots, interval, self._beat, lambda: self.beating, min_step_s=0.002).tick()

    @staticmethod
    def _beat(slot: tuple[Pair, str]) -> None:
        conn = slot[0].conns[slot[1]]
        if conn is not None and conn.is_open:
            conn.heartbeat()

    def _heartbeat_counts(self) -> dict[str, dict[str, int]]:
        """Heartbeats sent and answered so far, by kind of socket; `unanswered`: sent over
        a second ago and not answered."""
        now = time.monotonic_ns()
        kinds = {
            "mac": [pair.conns["mac"] for pair in self.active],
            "ios": [pair.conns["ios"] for pair in self.active],
            "idle_mac": [pair.conns["mac"] for pair in self.lone_active],
        }
        counts = {}
        for kind, conns in kinds.items():
            sent = acked = unanswered = 0
            for conn in conns:
                if conn is None:
                    continue
                sent += conn.hb_sent
                acked += conn.hb_acked
                missing = conn.hb_sent - conn.hb_acked
                if missing > 0 and now - conn.hb_sent_ns < _ACK_GRACE_NS:
                    missing -= 1  # the last one may still be on its way
                unanswered += max(0, missing)
            counts[kind] = {"sent": sent, "acked": acked, "unanswered": unanswered}
        return counts

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
            elif cfg.mode == "realistic":
                keystrokes = [pair.down for pair in self.active]
                GridSchedule(loop, keystrokes, 1.0 / cfg.keystroke_rate, Stream.send_next, sending, min_step_s=0.001).tick()
                if cfg.burst_every_s > 0 and self.active:
                    Bursts(self, cfg).start()
            else:
                GridSchedule(loop, streams, 1.0 / cfg.rate, Stream.send_next, sending).tick()

        def sending() -> bool:
            return self.sending

        def stop() -> None:
            self.sending = False
            cpu["end"] = time.process_time()

        loop.call_at(start, begin)
        loop.call_at(window_start, lambda: cpu.__setitem__("start", time.process_time()))
        loop.call_at(window_end, stop)
        await asyncio.sleep(max(0.0, window_end - loop.time()) + 0.01)
        drain_until = loop.time() + cfg.drain_s
        # What a coalescer still holds goes out within its window; then it must all arrive.
        while (self.outstanding > 0 or (self.flusher and self.flusher.queue)) and loop.time() < drain_until:
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
            "latencies": {role: lat.tobytes() for role, (lat, _) in self.samples.items()},
            "sent_at": {role: at.tobytes() for role, (_, at) in self.samples.items()},
            "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0),
            "send_failures": self.send_failures,
            "batches_sent": self.batches_sent,
            "batches_received": self.batches_received,
            "batch_payloads_received": self.batch_payloads_received,
            "batches_in_window": self.batches_in_window,
            "batch_payloads_in_window": self.batch_payloads_in_window,
            "bursts": self.bursts,
            "heartbeats": self._heartbeat_counts(),
            "heartbeat_ack_ns": self.heartbeat_ack_ns.tobytes(),
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
            """As the Mac agent reconnects (protocol.md §5.2): after a failed upgrade it
            backs off 0.5, 1, 2, 4, 8, 8 … s, reset by every upgrade that succeeds; a socket
            the relay closes is reopened at once after 1001 or 4000, after the back-off
            otherwise; it is done once it has seen its peer. Each wait is stretched by up
            to ±20 %: thousands of clients do not share one clock."""
            backoff, delay = _BACKOFF_FIRST_S, 0.0
            while loop.time() < deadline:
                if delay:
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                try:
                    conn = await self._open(pair, role)
                except Exception as exc:
                    self.retries += 1
                    if self.retries <= 3:
                        self.note_error(f"storm reconnect of {role}: {_describe(exc)}")
                    delay, backoff = backoff, min(2 * backoff, _BACKOFF_MAX_S)
                    continue
                backoff = _BACKOFF_FIRST_S
                conn.ended = asyncio.Event()
                if conn.lost:  # closed by the relay in the read that brought the 101
                    conn.ended.set()
                conn.send(pair.register_message() if role == "mac" else pair.join_message())
                ended, peered = asyncio.ensure_future(conn.ended.wait()), asyncio.ensure_future(pair.role_peered[role].wait())
                await asyncio.wait((ended, peered), timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                peered.cancel()
                if pair.peered[role] and not conn.lost:
                    return
                if conn.lost:
                    self.retries += 1
                    self.closed_by_relay[conn.close_code or 1006] = self.closed_by_relay.get(conn.close_code or 1006, 0) + 1
                    delay = 0.0 if conn.close_code in (1001, 4000) else backoff
                    if delay:
                        backoff = min(2 * backoff, _BACKOFF_MAX_S)

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
            "closed_by_relay": self.closed_by_relay,
            **self._problems(),
        }


class GridSchedule:
    """`fire(item)` for every item once per `interval_s`, on a fixed grid (open loop, no drift),
    while `running()`.

    The items' phases are spread evenly over one interval, in random order; one timer sends
    whatever is due, so a loop turn serves many items at high rates (mode "rate"'s
    frames, every mode's heartbeats, mode "realistic"'s keystrokes), with no task or timer
    per socket. A tick comes at most every `min_step_s`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        items: Sequence[Any],
        interval_s: float,
        fire: Callable[[Any], None],
        running: Callable[[], bool],
        min_step_s: float = 0.0005,
    ) -> None:
        self.loop, self.fire, self.running, self.min_step_s = loop, fire, running, min_step_s
        self.order = random.sample(list(items), len(items))
        self.interval = interval_s
        self.phases = [interval_s * i / len(items) for i in range(len(items))]
        self.start = loop.time()
        self.cursor = self.cycle = 0

    def tick(self) -> None:
        if not self.running() or not self.order:
            return
        now = self.loop.time()
        order, phases, n, fire = self.order, self.phases, len(self.order), self.fire
        while True:
            due = self.start + self.cycle * self.interval + phases[self.cursor]
            if due > now:
                break
            fire(order[self.cursor])
            self.cursor += 1
            if self.cursor == n:
                self.cursor = 0
                self.cycle += 1
        self.loop.call_at(max(due, now + self.min_step_s), self.tick)


# --- mode "realistic": the Mac's coalescer and its output bursts ------------------------


class Coalescer:
    """The Mac's `relay_batch` coalescer (protocol.md §3.2.4): what is queued goes out
    `FlushQueue.delay_s` after the first payload, or at once at `most` payloads; one payload
    as `relay`, more as `relay_batch`. Payloads are stamped when sent, so the time they
    waited here is not counted as the relay's."""

    __slots__ = ("flusher", "stream", "most", "pending", "generation")

    def __init__(self, flusher: "FlushQueue", stream: Stream, most: int) -> None:
        self.flusher, self.stream, self.most = flusher, stream, most
        self.pending: list[bytes] = []
        self.generation = 0

    def add(self, tail: bytes) -> None:
        pending = self.pending
        pending.append(tail)
        if len(pending) == 1:
            self.flusher.schedule(self)
        if len(pending) >= self.most:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        self.generation += 1  # a deadline still queued for this coalescer is void
        if pending:
            self.stream.send_payloads(pending)


class FlushQueue:
    """The coalescers' deadlines in one worker, on one timer: every deadline is the same
    delay after its coalescer's first payload, so they fall due in the order queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_s: float) -> None:
        self.loop, self.delay_s = loop, delay_s
        self.queue: deque[tuple[float, Coalescer, int]] = deque()
        self.armed = False

    def schedule(self, coalescer: Coalescer) -> None:
        due = self.loop.time() + self.delay_s
        self.queue.append((due, coalescer, coalescer.generation))
        if not self.armed:
            self.armed = True
            self.loop.call_at(due, self._run)

    def _run(self) -> None:
        now, queue = self.loop.time(), self.queue
        while queue and queue[0][0] <= now:
            _, coalescer, generation = queue.popleft()
            if coalescer.generation == generation:
                coalescer.flush()
        if queue:
            self.loop.call_at(max(queue[0][0], now + 0.0005), self._run)
        else:
            self.armed = False


class Bursts:
    """Output bursts of a worker's active Macs, while sending: each pair's a Poisson process
    with a mean gap of `burst_every_s`, drawn as one process for the worker (one timer).
    A burst is 1/4 to all of `burst_bytes` payload characters, in at least two payloads of
    at most `burst_chunk`, queued at once into the Mac's coalescer."""

    def __init__(self, worker: Worker, cfg: LoadConfig) -> None:
        self.worker, self.cfg = worker, cfg
        self.rate = len(worker.active) / cfg.burst_every_s
        self.tail = payload_tail(cfg.burst_chunk)
        self.rng = random.Random()

    def start(self) -> None:
        self.worker.loop.call_later(self.rng.expovariate(self.rate), self._burst)

    def _burst(self) -> None:
        w, cfg, rng = self.worker, self.cfg, self.rng
        if not w.sending:
            return
        total = rng.randint(cfg.burst_bytes // 4, cfg.burst_bytes)
        count = max(2, math.ceil(total / cfg.burst_chunk))
        size = max(_STAMP_B64, total // count // 4 * 4)
        tail = self.tail[: size - _STAMP_B64]
        coalescer = rng.choice(w.active).coalescer
        for _ in range(count):
            coalescer.add(tail)
        w.bursts += 1
        w.loop.call_later(rng.expovariate(self.rate), self._burst)


def payload_tail(chars: int) -> bytes:
    """Random base64 text for the rest of a payload of `chars` characters after its stamp."""
    raw = random.randbytes(chars * 3 // 4 - _STAMP.size)
    return binascii.b2a_base64(raw, newline=False)


def _worker_main(index: int, cfg: LoadConfig, pair_indices: list[int], run_tag: str, pipe: Any, lone_indices: list[int]) -> None:
    """Entry point of a worker process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator ends us, by PID
    raise_nofile_limit()
    if cfg.cpus:
        try:
            os.sched_setaffinity(0, cfg.cpus)
        except OSError:
            pass
    try:
        asyncio.run(Worker(index, cfg, pair_indices, run_tag, pipe, lone_indices).run())
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
                args=(w, cfg, list(range(w, cfg.pairs, count)), run_tag, child, list(range(w, cfg.idle_macs, count))),
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
        "duration_s": cfg.duration_s if cfg.mode in TRAFFIC_MODES else None,
        "mac_urls": cfg.mac_urls,
        "ios_urls": cfg.ios_urls or cfg.mac_urls,
    }
    if cfg.mode == "realistic":
        report["payload_bytes"] = cfg.keystroke_bytes
        report["idle_macs"] = cfg.idle_macs
        report["realistic"] = {
            name: getattr(cfg, name)
            for name in (
                "keystroke_rate", "keystroke_bytes", "batch_window_s", "batch_max", "burst_every_s", "burst_bytes",
                "burst_chunk", "idle_macs_per_pair", "mac_heartbeat_s", "ios_heartbeat_s", "idle_heartbeat_s",
            )
        }  # fmt: skip
    relay: dict[str, Any] = {"pid": cfg.relay_pid}
    if cfg.relay_pid:
        relay["rss_before_kib"] = proc_rss_kib(cfg.relay_pid)
    setup_started = time.monotonic()
    try:
        workers.start()
        setups = workers.gather("setup", _PHASE_TIMEOUT_S + cfg.pairs * 0.05 + cfg.idle_macs * 0.02)
        setup_ns = sorted(t for s in setups for t in s["setup_ns"])
        report["setup"] = {
            "paired": len(setup_ns),
            "failed": sum(s["failed"] for s in setups),
            "p50_ms": _ms(_percentile(setup_ns, 50)),
            "max_ms": _ms(setup_ns[-1] if setup_ns else 0),
            "total_s": round(time.monotonic() - setup_started, 3),
        }
        if cfg.mode == "realistic":
            report["setup"]["idle_registered"] = sum(s["idle_registered"] for s in setups)
            report["setup"]["idle_failed"] = sum(s["idle_failed"] for s in setups)
            report["sockets"] = 2 * report["setup"]["paired"] + report["setup"]["idle_registered"]
        last = setups
        if cfg.mode in TRAFFIC_MODES:
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
    others_cpu0 = {name: proc_cpu_s(pid) for name, pid in cfg.other_pids.items()}
    _sleep_until(window_end)
    if cfg.relay_pid:
        relay["cpu_s"] = round(proc_cpu_s(cfg.relay_pid) - relay_cpu0, 3)
        relay["cpu_util"] = round(relay["cpu_s"] / cfg.duration_s, 3)
        relay["rss_kib"] = proc_rss_kib(cfg.relay_pid)
    if cfg.nats_pid:
        nats_cpu = proc_cpu_s(cfg.nats_pid) - nats_cpu0
        report["nats"] = {"pid": cfg.nats_pid, "cpu_s": round(nats_cpu, 3), "cpu_util": round(nats_cpu / cfg.duration_s, 3)}
    if cfg.other_pids:
        report["others"] = {}
        for name, pid in cfg.other_pids.items():
            cpu = proc_cpu_s(pid) - others_cpu0[name]
            report["others"][name] = {"pid": pid, "cpu_s": round(cpu, 3), "cpu_util": round(cpu / cfg.duration_s, 3)}
    results = workers.gather("traffic", cfg.drain_s + 30)
    latencies: list[int] = []
    sent_at: list[int] = []
    by_direction: dict[str, list[int]] = {}
    for role, direction in (("ios", "ios_to_mac"), ("mac", "mac_to_ios")):
        these = by_direction[direction] = []
        for r in results:
            these.extend(_unpack(r["latencies"][role]))
            sent_at.extend(_unpack(r["sent_at"][role]))
        latencies.extend(these)
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
        latency_ms=_latency_ms(latencies),
        lost=sent - received,
        loss_ratio=round((sent - received) / sent, 6) if sent else 0.0,
        reordered=sum(r["reordered"] for r in results),
        duplicates=sum(r["duplicates"] for r in results),
        send_failures=sum(r["send_failures"] for r in results),
        loadgen={"cpu_s": round(loadgen_cpu, 3), "cpu_util": round(loadgen_cpu / cfg.duration_s, 3)},
        latency_timeline=timeline,
    )
    heartbeats: dict[str, Any] = {}
    for r in results:
        for kind, counts in r["heartbeats"].items():
            into = heartbeats.setdefault(kind, dict.fromkeys(counts, 0))
            for name, n in counts.items():
                into[name] += n
    acks = sorted(t for r in results for t in _unpack(r["heartbeat_ack_ns"]))
    heartbeats["ack_ms"] = _latency_ms(acks)
    report["heartbeats"] = heartbeats
    if cfg.mode == "realistic":
        report["latency_by_direction"] = {d: _latency_ms(sorted(v)) for d, v in by_direction.items()}
        in_window = sum(r["delivered_in_window"] - r["batch_payloads_in_window"] + r["batches_in_window"] for r in results)
        report["delivered_frames_per_s"] = round(in_window / cfg.duration_s, 1)
        report["batches"] = {
            "sent": sum(r["batches_sent"] for r in results),
            "received": sum(r["batches_received"] for r in results),
            "payloads_received": sum(r["batch_payloads_received"] for r in results),
        }
        report["bursts"] = sum(r["bursts"] for r in results)
        if "cpu_util" in relay:
            # CPU-seconds per active pair per second of the window (idle Macs included in the cost).
            relay["cpu_per_pair"] = round(relay["cpu_util"] / cfg.pairs, 7)
    return results


def _unpack(data: bytes) -> array:
    values = array("q")
    values.frombytes(data)
    return values


def _latency_ms(sorted_ns: list[int]) -> dict[str, float]:
    return {
        "p50": _ms(_percentile(sorted_ns, 50)),
        "p90": _ms(_percentile(sorted_ns, 90)),
        "p99": _ms(_percentile(sorted_ns, 99)),
        "max": _ms(sorted_ns[-1] if sorted_ns else 0),
        "samples": len(sorted_ns),
    }


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
        "closed_by_relay": {code: sum(r["closed_by_relay"].get(code, 0) for r in results) for code in sorted({c for r in results for c in r["closed_by_relay"]})},
        "timeout_s": cfg.storm_timeout_s,
    }
    return results


# Fields every report has, by mode (the smoke test checks them); "traffic" is every
# mode of TRAFFIC_MODES, "realistic" adds its own.
REPORT_FIELDS = {
    "common": ("label", "mode", "pairs", "workers", "payload_bytes", "setup", "relay", "errors", "disconnects"),
    "traffic": (
        "sent", "received", "delivered_per_s", "latency_ms", "lost", "loss_ratio", "reordered", "duplicates", "loadgen",
        "heartbeats",
    ),
    "idle": (),
    "storm": ("storm",),
    "realistic": (
        "idle_macs", "sockets", "realistic", "delivered_frames_per_s", "latency_by_direction", "batches", "bursts",
    ),
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
    if mode == "realistic":
        lat, beats = report["latency_ms"], report["heartbeats"]
        acked = sum(beats[k]["acked"] for k in ("mac", "ios", "idle_mac"))
        unanswered = sum(beats[k]["unanswered"] for k in ("mac", "ios", "idle_mac"))
        cpu = ""
        if "cpu_util" in relay:
            cpu = (
                f", relay CPU {relay['cpu_util']:.2f} core ({relay['cpu_per_pair'] * 1e3:.3f} ms/s per pair), "
                f"RSS {relay['rss_kib'] / 1024:.1f} MiB"
            )
        return (
            f"{head} + {setup['idle_registered']} idle Macs ({report['sockets']} sockets): "
            f"{report['delivered_per_s']:.0f} payloads/s in {report['delivered_frames_per_s']:.0f} frames/s "
            f"({report['batches']['received']} batches, {report['bursts']} bursts), latency p50/p90/p99/max "
            f"{lat['p50']:.2f}/{lat['p90']:.2f}/{lat['p99']:.2f}/{lat['max']:.2f} ms, lost {report['lost']}, "
            f"reordered {report['reordered']}, duplicates {report['duplicates']}, heartbeats acked {acked} "
            f"(unanswered {unanswered}, ack p99 {beats['ack_ms']['p99']:.2f} ms){cpu}, "
            f"loadgen CPU {report['loadgen']['cpu_util']:.2f} core, {tail}"
            + (f", {setup['idle_failed']} idle Macs FAILED" if setup["idle_failed"] else "")
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
        f"verified by a frame each way, {storm['retries']} reconnect retries"
        f"{' (sockets closed by the relay: ' + ', '.join(f'{n} × {c}' for c, n in storm.get('closed_by_relay', {}).items()) + ')' if storm.get('closed_by_relay') else ''}, {tail}"
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
        "--heartbeat", type=float, default=20.0,
        help="seconds between one socket's heartbeats, all modes but realistic (TermOnMac: 1 s active Mac, 3 s iPhone)",
    )
    parser.add_argument("--storm-timeout", type=float, default=60.0)
    realistic = parser.add_argument_group("mode realistic (TermOnMac's cadence)")
    realistic.add_argument("--idle-macs-per-pair", type=int, default=5, help="Macs with no iPhone per active pair (5)")
    realistic.add_argument("--keystroke-rate", type=float, default=3.0, help="keystroke frames/s per iPhone (3)")
    realistic.add_argument("--keystroke-payload", type=int, default=40, help="keystroke and echo payload characters (40)")
    realistic.add_argument("--burst-every", type=float, default=5.0, help="mean seconds between one pair's output bursts (5; 0: none)")
    realistic.add_argument("--burst-bytes", type=int, default=32 * 1024, help="most payload characters of one burst (32768)")
    realistic.add_argument("--burst-chunk", type=int, default=4096, help="most characters of one burst payload (4096)")
    realistic.add_argument("--mac-heartbeat", type=float, default=1.0, help="a paired Mac's heartbeat interval (1 s)")
    realistic.add_argument("--ios-heartbeat", type=float, default=3.0, help="an iPhone's heartbeat interval (3 s)")
    realistic.add_argument("--idle-heartbeat", type=float, default=30.0, help="an idle Mac's heartbeat interval (30 s)")
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
        idle_macs_per_pair=args.idle_macs_per_pair,
        keystroke_rate=args.keystroke_rate,
        keystroke_bytes=args.keystroke_payload,
        burst_every_s=args.burst_every,
        burst_bytes=args.burst_bytes,
        burst_chunk=args.burst_chunk,
        mac_heartbeat_s=args.mac_heartbeat,
        ios_heartbeat_s=args.ios_heartbeat,
        idle_heartbeat_s=args.idle_heartbeat,
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
