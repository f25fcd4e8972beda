"""Traffic through the topology, with exact accounting, for the fault tests (issue 15).

`TrafficDriver` runs N pairs (a Mac and an iPhone per room) that connect through nginx
only (`Topology.url`). Each side sends a numbered `relay` frame every `interval_s` (0.1 s:
10 frames/s per side), the payload naming its direction, its pair and its sequence number
(`M.<pair>.<seq>` from the Mac, `I.<pair>.<seq>` from the iPhone). Clients behave as the
Mac agent does (protocol.md §5.2): a socket closed with 1001 or 4000 reconnects at once,
any other end (a dropped TCP connection, 1011, a refused upgrade, an HTTP 502/503 from
nginx) after a back-off of 0.5 s doubling to 8 s, reset by every successful upgrade; the
Mac re-registers the same room (same secret and identity key, a fresh nonce and ephemeral
key), the iPhone re-joins it with the room's secret. The Mac heartbeats every second, the
iPhone every 3 s; a Mac without `room_registered` 10 s after its register, or a side with
no `heartbeat_ack` for 60 s (Mac) / 15 s (iPhone), closes and reconnects, as they do.

The clients are not websockets' asyncio client (a task, a queue and a lock per message):
websockets' Sans-I/O protocol does the opening handshake, then frames are read and written
directly (as `bench/loadgen.py` does), so that 400 sockets at 8,000 frames/s (4,000 sent,
4,000 received) cost this machine little. They run in `workers` child processes (spawned;
default: one per 100 pairs, at most 2), each with its own event loop (uvloop if
installed); the parent talks to them over a pipe. `time.monotonic()` is the one clock of
every process (CLOCK_MONOTONIC), so times from workers and the parent compare.

What is recorded, per pair and direction: every sequence number sent, when, on which of the
sender's sockets (its incarnation) and whether that socket was open (a frame "sent" while
the side is disconnected is counted but never written); every sequence received, when, and
on which socket; per socket: when it was opened, paired (`peer_joined`), told
`peer_disconnected` (and why), closed (the relay's close code, if it sent one), every
`error` (code, time). `TrafficDriver.collect()` returns a `TrafficReport`, which says:

- duplicates and reorderings per direction (a frame received twice, or after a later one),
  and misrouted frames (a payload of another pair: never expected);
- frames lost (written, never received), each with its send time relative to the fault and
  a cause: `refused` (answered `error NO_PEER`; matched in order, see `_match_refusals`),
  `sender_socket_ended` (in flight on a socket of the sender that ended within the in-flight
  window after it was sent), `session_replaced` (in flight to a peer socket that a new one
  replaced: the sender heard a new `peer_joined` within that window), `receiver_socket_ended`
  (in flight to a socket of the receiver that ended within that window after it was sent,
  or had ended at most that long before: its edge's `peer_left` not yet heard by the
  sender's; the receiver's socket a frame went to is the one the sender's last
  `peer_joined` named, by its session nonce, else the one open when it was sent), `before_peer_disconnected` (the receiver's socket lived on, and the sender was
  told `peer_disconnected` only within that window after it: no `NO_PEER`, no word until
  then), `receiver_away` (the receiver had had no open socket for longer), or `unexplained`;
- whether every pair is paired again, and the time each disrupted pair took;
- when peers heard `peer_disconnected`, and with which reason.

    driver = TrafficDriver(topo.url, pairs=200)
    await driver.start()                 # connect and pair everyone, then traffic
    await asyncio.sleep(5)
    fault_at = time.monotonic(); topo.kill("edge2")
    await driver.wait_all_paired(timeout=30)
    report = await driver.collect()      # stops sending, waits for the last frames, closes
    print(report.summary(fault_at))
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import statistics
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.loadgen import b64_key, client_frame, split_frames

log = logging.getLogger("tests.topology_traffic")

ROLES = ("mac", "ios")
TAG = {"mac": "M", "ios": "I"}
ROLE_OF_TAG = {"M": "mac", "I": "ios"}
OTHER = {"mac": "ios", "ios": "mac"}

#: The Mac agent's reconnect rules (protocol.md §5.2).
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0
IMMEDIATE_RECONNECT_CODES = frozenset({1001, 4000})
OPEN_TIMEOUT_S = 30.0  # upgrade timeout (M-WS)
REGISTER_TIMEOUT_S = 10.0
HEARTBEAT_S = {"mac": 1.0, "ios": 3.0}  # Mac while active; iPhone flat (§5.2, §5.3)
ACK_TIMEOUT_S = {"mac": 60.0, "ios": 15.0}

_RELAY_PREFIX = b'{"type":"relay","payload":"'
_RELAY_PREFIX_LEN = len(_RELAY_PREFIX)
_ACK_PREFIX = b'{"type":"heartbeat_ack"'
_ACK_PREFIX_LEN = len(_ACK_PREFIX)
_HEARTBEAT = b'{"type":"heartbeat"}'

# Flags of a frame sent.
SENT_OPEN = 1  # written to an open socket
SENT_PAIRED = 2  # the sender believed it had a peer (it had `peer_joined` on that socket)

_TICK_S = 0.01  # the send schedule's step: each side sends in one of interval/step slots


# --- the WebSocket client ------------------------------------------------------------------

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class Conn(asyncio.Protocol):
    """One socket of one side."""

    def __init__(self, side: "Side", url: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.side = side
        self.handshake: Any = ClientProtocol(parse_uri(url), max_size=None)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = side.worker.loop.create_future()
        self.is_open = False
        self.close_code: int | None = None  # the relay's, from its close frame
        self.lost = False  # the connection has ended (perhaps in the read that brought the 101)
        self._buffer = b""
        self._fragments: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        request = self.handshake.connect()
        request.headers["User-Agent"] = "termrelay-topology-traffic"
        self.handshake.send_request(request)
        transport.write(b"".join(self.handshake.data_to_send()))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.handshake is not None:
            proto = self.handshake
            proto.receive_data(data)
            from websockets.frames import Frame
            from websockets.http11 import Response

            for event in proto.events_received():
                if isinstance(event, Response):
                    if proto.handshake_exc is not None:
                        self._settle(ConnectionError(f"upgrade refused: {proto.handshake_exc}"))
                        self.transport.close()  # type: ignore[union-attr]
                        return
                    self.handshake = None
                    self.is_open = True
                    self._settle(None)
                elif isinstance(event, Frame):  # frames in the same read as the 101
                    self._frame(int(event.opcode) | (0x80 if event.fin else 0), event.data)
            return
        self._buffer = split_frames(self._buffer + data if self._buffer else data, self._frame)

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == _OP_TEXT or opcode == _OP_BINARY:
            if b0 & 0x80:
                self.side.on_message(self, payload)
            else:
                self._fragments = [payload]
        elif opcode == _OP_CONT and self._fragments is not None:
            self._fragments.append(payload)
            if b0 & 0x80:
                message, self._fragments = b"".join(self._fragments), None
                self.side.on_message(self, message)
        elif opcode == _OP_CLOSE:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
            if self.is_open:
                self.is_open = False
                self.transport.write(client_frame(_OP_CLOSE, payload[:2]))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]
        elif opcode == _OP_PING:
            self.transport.write(client_frame(_OP_PONG, payload))  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        self.lost = True
        self._settle(ConnectionError(f"connection lost before the upgrade: {exc}"))
        self.side.on_lost(self)

    def _settle(self, exc: BaseException | None) -> None:
        if self.opened.done():
            return
        if exc is None:
            self.opened.set_result(None)
        else:
            self.opened.set_exception(exc)
            self.opened.exception()  # seen: nobody may wait any more

    def write(self, data: bytes) -> bool:
        if not self.is_open or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(client_frame(_OP_TEXT, data))
        return True

    def close(self, code: int = 1000) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.is_open:
            self.is_open = False
            self.transport.write(client_frame(_OP_CLOSE, code.to_bytes(2, "big")))
        self.transport.close()


# --- one side of a pair -----------------------------------------------------------------------


class Side:
    """The Mac or the iPhone of one pair: its current socket, its reconnect loop, and the
    record of what it sent (frames) and saw (socket events)."""

    def __init__(self, worker: "Worker", pair: "Pair", role: str) -> None:
        self.worker, self.pair, self.role = worker, pair, role
        self.url = worker.base_url.rstrip("/") + f"/ws?room_id={pair.room_id}&role={role}"
        self.conn: Conn | None = None
        self.inc = -1  # the current socket's incarnation (index into `sockets`)
        self.paired = False
        self.registered = False
        self.backoff = BACKOFF_FIRST_S
        self.stopped = False
        self.opened_at = 0.0
        self.last_ack = 0.0
        self.next_heartbeat = 0.0
        self.head = f'{{"type":"relay","payload":"{TAG[role]}.{pair.index}.'.encode()
        # What it sent: index = sequence number.
        self.sent_t = array("d")
        self.sent_flags = array("b")
        self.sent_inc = array("i")
        # What it received from its peer.
        self.recv_seq = array("q")
        self.recv_t = array("d")
        self.recv_inc = array("i")
        # One record per socket: see `SocketRecord`.
        self.sockets: list[dict[str, Any]] = []
        self.connect_failures: list[tuple[float, str]] = []
        self.reconnecting: asyncio.Task[None] | None = None

    # sending

    def tick(self, now: float) -> None:
        conn = self.conn
        seq = len(self.sent_t)
        flags = 0
        if conn is not None and conn.is_open and self.worker.sending:
            if conn.write(self.head + str(seq).encode() + b'"}'):
                flags = SENT_OPEN | (SENT_PAIRED if self.paired else 0)
        if self.worker.sending:
            self.sent_t.append(now)
            self.sent_flags.append(flags)
            self.sent_inc.append(self.inc if flags else -1)
        if conn is not None and conn.is_open:
            if now >= self.next_heartbeat:
                self.next_heartbeat = now + HEARTBEAT_S[self.role]
                conn.write(_HEARTBEAT)
            if now - max(self.last_ack, self.opened_at) > ACK_TIMEOUT_S[self.role]:
                self._give_up(conn, "no heartbeat_ack")
            elif self.role == "mac" and not self.registered and now - self.opened_at > REGISTER_TIMEOUT_S:
                self._give_up(conn, "no room_registered")

    def _give_up(self, conn: Conn, why: str) -> None:
        self.sockets[self.inc]["gave_up"] = why
        conn.close(1001)  # as the Mac's own close; the reconnect follows from on_lost

    # the socket's life

    def start(self, delay: float = 0.0) -> None:
        if self.stopped:
            return
        self.reconnecting = self.worker.loop.create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        loop = self.worker.loop
        while not self.stopped:
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopped:
                return
            conn = Conn(self, self.url)
            started = time.monotonic()
            parts = urlsplit(self.url)
            try:
                await asyncio.wait_for(loop.create_connection(lambda: conn, parts.hostname, parts.port or 80), OPEN_TIMEOUT_S)
                await asyncio.wait_for(asyncio.shield(conn.opened), OPEN_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                if conn.transport is not None:
                    conn.transport.abort()
                self.connect_failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
                delay = self.backoff  # the Mac: sleep, then double (0.5, 1, 2, 4, 8, 8, ...)
                self.backoff = max(BACKOFF_FIRST_S, min(2 * self.backoff, BACKOFF_MAX_S))
                continue
            now = time.monotonic()
            self.backoff = BACKOFF_FIRST_S  # reset after every successful upgrade
            self.conn = conn
            self.inc = len(self.sockets)
            nonce = b64_key()  # this socket's session, as its peer's `peer_joined` names it
            self.sockets.append({
                "connect_started": started, "opened": now, "ended": None, "code": None, "paired": [], "paired_with": [],
                "unpaired": [], "errors": [], "gave_up": None, "nonce": nonce,
            })  # fmt: skip
            self.opened_at = self.last_ack = now
            self.next_heartbeat = now + HEARTBEAT_S[self.role]
            self.registered = False
            self.paired = False
            if self.role == "mac":
                conn.write(self.pair.register_message(nonce))
            else:
                conn.write(self.pair.join_message(nonce))
            self.reconnecting = None
            if conn.lost:
                # Closed by the relay in the read that brought the 101 (an edge closing its
                # sockets right after the upgrade): its end came before it was ours to note.
                # Before, the side kept the dead socket for good and never reconnected.
                self.on_lost(conn)
            return

    def on_lost(self, conn: Conn) -> None:
        if conn is not self.conn:
            return  # a socket that never opened, or one given up already
        now = time.monotonic()
        record = self.sockets[self.inc]
        record["ended"] = now
        record["code"] = conn.close_code
        if self.paired:
            record["unpaired"].append((now, "socket_ended"))
        self.paired = False
        self.conn = None
        if self.stopped:
            return
        code = conn.close_code
        if code in IMMEDIATE_RECONNECT_CODES and record["gave_up"] is None:
            self.start(0.0)
        else:
            delay = self.backoff
            self.backoff = max(BACKOFF_FIRST_S, min(2 * self.backoff, BACKOFF_MAX_S))
            self.start(delay)

    def on_message(self, conn: Conn, data: bytes) -> None:
        now = time.monotonic()
        if data[:_RELAY_PREFIX_LEN] == _RELAY_PREFIX:
            payload = data[_RELAY_PREFIX_LEN:-2]
            try:
                tag, pair, seq = payload.split(b".")
                seq_n = int(seq)
                ok = ROLE_OF_TAG[tag.decode()] == OTHER[self.role] and int(pair) == self.pair.index
            except (ValueError, KeyError):
                ok = False
            if not ok:
                self.worker.misrouted.append((now, self.role, self.pair.index, payload[:60].decode("utf-8", "replace")))
                return
            self.recv_seq.append(seq_n)
            self.recv_t.append(now)
            self.recv_inc.append(self.inc if conn is self.conn else -2)
            return
        if data[:_ACK_PREFIX_LEN] == _ACK_PREFIX:
            self.last_ack = now
            return
        try:
            message = json.loads(data)
        except ValueError:
            self.worker.unexpected.append((now, self.role, data[:80].decode("utf-8", "replace")))
            return
        if conn is not self.conn:
            return
        record = self.sockets[self.inc]
        kind = message.get("type")
        if kind == "peer_joined":
            record["paired"].append(now)
            record["paired_with"].append(message.get("session_nonce"))
            self.paired = True
        elif kind == "peer_disconnected":
            record["unpaired"].append((now, str(message.get("reason"))))
            self.paired = False
        elif kind == "room_registered":
            self.registered = True
        elif kind == "error":
            record["errors"].append((now, str(message.get("code"))))
        elif kind == "heartbeat_ack":
            self.last_ack = now
        else:
            self.worker.unexpected.append((now, self.role, data[:120].decode("utf-8", "replace")))

    def stop(self) -> None:
        self.stopped = True
        if self.reconnecting is not None:
            self.reconnecting.cancel()
        if self.conn is not None:
            self.conn.close(1000)

    def export(self) -> dict[str, Any]:
        return {
            "sent_t": self.sent_t.tobytes(),
            "sent_flags": self.sent_flags.tobytes(),
            "sent_inc": self.sent_inc.tobytes(),
            "recv_seq": self.recv_seq.tobytes(),
            "recv_t": self.recv_t.tobytes(),
            "recv_inc": self.recv_inc.tobytes(),
            "sockets": self.sockets,
            "connect_failures": self.connect_failures,
        }


class Pair:
    def __init__(self, worker: "Worker", index: int, run_tag: str) -> None:
        self.index = index
        self.room_id = f"F{run_tag}{index:04d}".upper()
        secret = secrets.token_hex(16)
        self.secret_hash = hashlib.sha256(secret.encode()).hexdigest()
        self.mac_key = b64_key()
        self.ios_key = b64_key()
        self.sides = {role: Side(worker, self, role) for role in ROLES}

    def register_message(self, session_nonce: str) -> bytes:
        return json.dumps(
            {"type": "register_room", "room_id": self.room_id, "secret_hash": self.secret_hash, "public_key": self.mac_key,
             "session_nonce": session_nonce, "ephemeral_key": b64_key()}  # fmt: skip
        ).encode()

    def join_message(self, session_nonce: str) -> bytes:
        return json.dumps(
            {"type": "join_room", "room_id": self.room_id, "public_key": self.ios_key, "secret_hash": self.secret_hash,
             "session_nonce": session_nonce, "ephemeral_key": b64_key()}  # fmt: skip
        ).encode()

    @property
    def is_paired(self) -> bool:
        return all(s.paired for s in self.sides.values())


# --- a worker process ------------------------------------------------------------------------


class Worker:
    """The pairs of one process and the commands it takes from the parent."""

    def __init__(self, base_url: str, indices: list[int], run_tag: str, interval_s: float) -> None:
        self.base_url, self.indices, self.run_tag, self.interval_s = base_url, indices, run_tag, interval_s
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.pairs: list[Pair] = []
        self.sending = False
        self.ticking = True
        self.misrouted: list[tuple[float, str, int, str]] = []
        self.unexpected: list[tuple[float, str, str]] = []
        self.slots: list[list[Side]] = []

    async def setup(self, concurrency: int = 50) -> dict[str, Any]:
        self.loop = asyncio.get_running_loop()
        self.pairs = [Pair(self, i, self.run_tag) for i in self.indices]
        gate = asyncio.Semaphore(concurrency)
        failed: list[str] = []

        async def one(pair: Pair) -> None:
            async with gate:
                mac, ios = pair.sides["mac"], pair.sides["ios"]
                mac.start()
                deadline = time.monotonic() + 60
                while not mac.registered:  # the room must exist before the iPhone joins
                    if time.monotonic() > deadline:
                        failed.append(f"pair {pair.index}: no room_registered")
                        return
                    await asyncio.sleep(0.01)
                ios.start()
                while not pair.is_paired:
                    if time.monotonic() > deadline:
                        failed.append(f"pair {pair.index}: not paired")
                        return
                    await asyncio.sleep(0.01)

        self._start_ticking()
        started = time.monotonic()
        await asyncio.gather(*(one(p) for p in self.pairs))
        return {"failed": failed, "seconds": time.monotonic() - started}

    def _start_ticking(self) -> None:
        """Every side at its own slot of the interval, one timer for all (a step of 10 ms)."""
        n = max(1, round(self.interval_s / _TICK_S))
        self.slots = [[] for _ in range(n)]
        sides = [s for p in self.pairs for s in p.sides.values()]
        for k, side in enumerate(sides):
            self.slots[k % n].append(side)
        start = self.loop.time()

        def step(k: int) -> None:
            if not self.ticking:
                return
            now = time.monotonic()
            for side in self.slots[k % n]:
                side.tick(now)
            # On the grid, so that a late step does not shift the schedule for good.
            self.loop.call_at(max(self.loop.time(), start + (k + 1) * _TICK_S), step, k + 1)

        self.loop.call_soon(step, 0)

    def status(self) -> dict[str, Any]:
        sides = [s for p in self.pairs for s in p.sides.values()]
        return {
            "pairs": len(self.pairs),
            "paired": sum(p.is_paired for p in self.pairs),
            "open": sum(1 for s in sides if s.conn is not None and s.conn.is_open),
            "cpu_s": time.process_time(),
            "sent": sum(len(s.sent_t) for s in sides),
            "received": sum(len(s.recv_seq) for s in sides),
        }

    def export(self) -> dict[str, Any]:
        return {
            "pairs": {p.index: {role: s.export() for role, s in p.sides.items()} for p in self.pairs},
            "misrouted": self.misrouted,
            "unexpected": self.unexpected[:200],
            "unexpected_count": len(self.unexpected),
        }

    def close(self) -> None:
        self.ticking = False
        for p in self.pairs:
            for s in p.sides.values():
                s.stop()


def _worker_main(pipe: Any, base_url: str, indices: list[int], run_tag: str, interval_s: float) -> None:
    """A worker process: its own event loop, commands from the pipe."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        from runtime.service import raise_open_files_limit

        raise_open_files_limit(log)
    except Exception:  # noqa: BLE001 - a default limit is enough for a few hundred sockets
        pass
    asyncio.run(_worker_loop(pipe, Worker(base_url, indices, run_tag, interval_s)))


async def _worker_loop(pipe: Any, worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    fd = pipe.fileno()

    async def command() -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(fd)
            os.set_blocking(fd, True)  # the loop made it non-blocking: a large answer must not fail
            try:
                future.set_result(pipe.recv())
            except Exception as exc:  # EOFError: the parent is gone
                future.set_exception(exc)

        loop.add_reader(fd, readable)
        return await future

    try:
        while True:
            cmd = await command()
            kind = cmd["cmd"]
            if kind == "setup":
                pipe.send(await worker.setup())
            elif kind == "send":
                worker.sending = True
                pipe.send({"ok": True})
            elif kind == "stop_sending":
                worker.sending = False
                pipe.send({"ok": True})
            elif kind == "status":
                pipe.send(worker.status())
            elif kind == "export":
                pipe.send(worker.export())
            elif kind == "close":
                worker.close()
                await asyncio.sleep(0.3)
                pipe.send({"ok": True})
                return
    except EOFError:
        worker.close()


class _WorkerHandle:
    def __init__(self, ctx: Any, base_url: str, indices: list[int], run_tag: str, interval_s: float) -> None:
        self.parent_end, child_end = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_end, base_url, indices, run_tag, interval_s), daemon=True)
        self.process.start()
        child_end.close()
        self.lock = asyncio.Lock()

    async def ask(self, cmd: str, timeout: float = 120.0, **args: Any) -> Any:
        async with self.lock:
            self.parent_end.send({"cmd": cmd, **args})
            ready = await asyncio.wait_for(asyncio.to_thread(self.parent_end.poll, timeout), timeout + 5)
            if not ready:
                raise TimeoutError(f"traffic worker {self.process.pid}: no answer to {cmd} within {timeout}s")
            return self.parent_end.recv()

    def end(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # by its own handle: our child
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- the driver (in the test process) ------------------------------------------------------------


class TrafficDriver:
    """N pairs through `url` (nginx), frames both ways every `interval_s`; see the module."""

    def __init__(self, url: str, pairs: int = 200, *, interval_s: float = 0.1, workers: int | None = None) -> None:
        self.url, self.pairs, self.interval_s = url, pairs, interval_s
        self.workers_count = workers if workers is not None else max(1, min(2, (pairs + 99) // 100))
        self.run_tag = secrets.token_hex(2)
        self.handles: list[_WorkerHandle] = []
        self.started_at: float | None = None
        self.setup_seconds: float | None = None
        self._cpu_mark: tuple[float, float] | None = None

    async def start(self, timeout: float = 120.0) -> None:
        """Spawn the workers, connect and pair every pair, then start the traffic."""
        ctx = multiprocessing.get_context("spawn")
        indices = [list(range(self.pairs))[k :: self.workers_count] for k in range(self.workers_count)]
        self.handles = [_WorkerHandle(ctx, self.url, idx, self.run_tag, self.interval_s) for idx in indices]
        t0 = time.monotonic()
        answers = await asyncio.gather(*(h.ask("setup", timeout=timeout) for h in self.handles))
        failed = [f for a in answers for f in a["failed"]]
        if failed:
            raise AssertionError(f"{len(failed)} pairs could not be set up: {failed[:5]}")
        self.setup_seconds = time.monotonic() - t0
        await asyncio.gather(*(h.ask("send") for h in self.handles))
        self.started_at = time.monotonic()

    async def status(self) -> dict[str, Any]:
        answers = await asyncio.gather(*(h.ask("status") for h in self.handles))
        total: dict[str, Any] = {k: sum(a[k] for a in answers) for k in ("pairs", "paired", "open", "sent", "received")}
        total["cpu_s"] = sum(a["cpu_s"] for a in answers)
        return total

    async def mark_cpu(self) -> None:
        s = await self.status()
        self._cpu_mark = (time.monotonic(), s["cpu_s"])

    async def cpu_since_mark(self) -> float:
        """The workers' CPU (cores, user + system of their event loops) since `mark_cpu`."""
        assert self._cpu_mark is not None
        s = await self.status()
        return (s["cpu_s"] - self._cpu_mark[1]) / (time.monotonic() - self._cpu_mark[0])

    async def wait_all_paired(self, timeout: float, settle: float = 0.0) -> float:
        """Wait until every pair is paired (both sides have `peer_joined` on their current
        socket), for `settle` seconds in a row; returns when that began."""
        deadline = time.monotonic() + timeout
        since: float | None = None
        while True:
            s = await self.status()
            now = time.monotonic()
            if s["paired"] == s["pairs"]:
                since = since or now
                if now - since >= settle:
                    return since
            else:
                since = None
            if now > deadline:
                raise AssertionError(f"{s['pairs'] - s['paired']} of {s['pairs']} pairs not paired {timeout:.0f}s on ({s['open']} sockets open)")
            await asyncio.sleep(0.1)

    async def collect(self, drain_s: float = 3.0) -> "TrafficReport":
        """Stop sending, give the last frames `drain_s` to arrive, export every record and
        close every socket."""
        await asyncio.gather(*(h.ask("stop_sending") for h in self.handles))
        stopped_at = time.monotonic()
        await asyncio.sleep(drain_s)
        exports = await asyncio.gather(*(h.ask("export", timeout=120) for h in self.handles))
        await self.close()
        return TrafficReport.from_exports(exports, self.interval_s, stopped_at)

    async def close(self) -> None:
        for h in self.handles:
            if h.process.is_alive():
                try:
                    await h.ask("close", timeout=10)
                except (TimeoutError, EOFError, BrokenPipeError, OSError):
                    pass
            h.end()
        self.handles = []

    async def __aenter__(self) -> "TrafficDriver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- the report ----------------------------------------------------------------------------------


@dataclass
class Lost:
    pair: int
    sender: str
    seq: int
    sent_at: float
    cause: str


@dataclass
class SideRecord:
    sent_t: array
    sent_flags: array
    sent_inc: array
    recv_seq: array
    recv_t: array
    recv_inc: array
    sockets: list[dict[str, Any]]
    connect_failures: list[tuple[float, str]]

    @classmethod
    def load(cls, d: dict[str, Any]) -> "SideRecord":
        def arr(code: str, raw: bytes) -> array:
            a = array(code)
            a.frombytes(raw)
            return a

        return cls(
            arr("d", d["sent_t"]), arr("b", d["sent_flags"]), arr("i", d["sent_inc"]), arr("q", d["recv_seq"]),
            arr("d", d["recv_t"]), arr("i", d["recv_inc"]), d["sockets"], d["connect_failures"],
        )  # fmt: skip

    def socket_at(self, t: float) -> int | None:
        """The incarnation open at time t (None: none)."""
        for k, s in enumerate(self.sockets):
            if s["opened"] <= t and (s["ended"] is None or t < s["ended"]):
                return k
        return None

    def socket_of_session(self, nonce: str | None) -> int | None:
        """The incarnation whose register or join carried this session nonce (None: none)."""
        for k, s in enumerate(self.sockets):
            if nonce is not None and s.get("nonce") == nonce:
                return k
        return None


@dataclass
class TrafficReport:
    pairs: dict[int, dict[str, SideRecord]]
    interval_s: float
    stopped_at: float
    misrouted: list[tuple[float, str, int, str]]
    unexpected: list[tuple[float, str, str]]
    unexpected_count: int
    inflight_window_s: float = 1.0
    # Filled by `analyse`.
    lost: list[Lost] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    reorderings: dict[str, int] = field(default_factory=dict)
    refusals_unmatched: list[tuple[int, str, float]] = field(default_factory=list)

    @classmethod
    def from_exports(cls, exports: list[dict[str, Any]], interval_s: float, stopped_at: float) -> "TrafficReport":
        pairs: dict[int, dict[str, SideRecord]] = {}
        misrouted: list = []
        unexpected: list = []
        count = 0
        for e in exports:
            for index, sides in e["pairs"].items():
                pairs[int(index)] = {role: SideRecord.load(d) for role, d in sides.items()}
            misrouted += e["misrouted"]
            unexpected += e["unexpected"]
            count += e["unexpected_count"]
        report = cls(pairs, interval_s, stopped_at, misrouted, unexpected, count)
        report.analyse()
        return report

    # --- the analysis ---------------------------------------------------------------------------

    def analyse(self, inflight_window_s: float | None = None) -> None:
        """Duplicates, reorderings and every lost frame with its cause. The in-flight window:
        a frame sent at most this long before its sender's or receiver's socket ended may
        have been in flight on it (README: frames in flight when a socket is replaced or its
        edge dies are dropped)."""
        if inflight_window_s is not None:
            self.inflight_window_s = inflight_window_s
        w = self.inflight_window_s
        self.lost = []
        self.duplicates = {r: 0 for r in ROLES}
        self.reorderings = {r: 0 for r in ROLES}
        self.refusals_unmatched = []
        for index, sides in self.pairs.items():
            for sender in ROLES:
                s, r = sides[sender], sides[OTHER[sender]]
                seen: set[int] = set()
                last = -1
                for seq in r.recv_seq:
                    if seq in seen:
                        self.duplicates[sender] += 1
                    seen.add(seq)
                    if seq < last:
                        self.reorderings[sender] += 1
                    last = max(last, seq)
                lost_here: list[tuple[int, float, int]] = []  # seq, sent_at, incarnation
                for seq, (t, flags, inc) in enumerate(zip(s.sent_t, s.sent_flags, s.sent_inc)):
                    if flags & SENT_OPEN and seq not in seen:
                        lost_here.append((seq, t, inc))
                refused = self._match_refusals(index, sender, s, lost_here)
                for seq, t, inc in lost_here:
                    if seq in refused:
                        cause = "refused"
                    else:
                        mine = s.sockets[inc]
                        theirs_k = _addressed(mine, r, t)
                        if mine["ended"] is not None and mine["ended"] - t <= w:
                            cause = "sender_socket_ended"
                        elif _new_session_after(mine, t, w):
                            cause = "session_replaced"
                        elif (
                            theirs_k is not None
                            and not (r.sockets[theirs_k]["ended"] is not None and r.sockets[theirs_k]["ended"] - t <= w)
                            and any(t < at <= t + w and why != "socket_ended" for at, why in mine["unpaired"])
                        ):
                            # The receiver's socket lived on, and the sender heard only later
                            # that its peer was gone: lost with no word in between.
                            cause = "before_peer_disconnected"
                        elif theirs_k is None:
                            # The receiver's socket had just ended: the sender's edge had not
                            # heard its peer_left yet (a frame to a closing socket is dropped).
                            ended = [x["ended"] for x in r.sockets if x["ended"] is not None and x["ended"] <= t]
                            cause = "receiver_socket_ended" if ended and t - max(ended) <= w else "receiver_away"
                        elif r.sockets[theirs_k]["ended"] is not None and r.sockets[theirs_k]["ended"] - t <= w:
                            cause = "receiver_socket_ended"
                        else:
                            cause = "unexplained"
                    self.lost.append(Lost(index, sender, seq, t, cause))

    def _match_refusals(self, index: int, sender: str, s: SideRecord, lost_here: list[tuple[int, float, int]]) -> set[int]:
        """Which lost frames the relay refused with `error NO_PEER`. A NO_PEER on a socket
        refers to a frame sent on it before it arrived that never arrived: each, in the order
        they came, is matched to the latest such frame not matched yet. The frames a NO_PEER
        can refer to grow with time (they are the lost ones sent before it), so matching in
        time order, whichever frame is picked, matches as many as can be: a NO_PEER left
        without a frame (`refusals_unmatched`) means more refusals than frames lost on that
        socket by then, i.e. a frame refused (and refunded) that arrived all the same. The
        latest one is picked because a refusal usually comes within a round trip."""
        refused: set[int] = set()
        by_inc: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for seq, t, inc in lost_here:
            by_inc[inc].append((seq, t))
        for inc, sock in enumerate(s.sockets):
            candidates = by_inc.get(inc, [])
            taken = [False] * len(candidates)
            for at, code in sock["errors"]:
                if code != "NO_PEER":
                    continue
                best = None
                for pos in range(len(candidates) - 1, -1, -1):
                    if not taken[pos] and candidates[pos][1] <= at:
                        best = pos
                        break
                if best is None:
                    self.refusals_unmatched.append((index, sender, at))
                    continue
                taken[best] = True
                refused.add(candidates[best][0])
        return refused

    # --- what the tests read ---------------------------------------------------------------------

    @property
    def sent_written(self) -> int:
        return sum(sum(1 for f in side.sent_flags if f & SENT_OPEN) for sides in self.pairs.values() for side in sides.values())

    @property
    def sent_total(self) -> int:
        return sum(len(side.sent_t) for sides in self.pairs.values() for side in sides.values())

    @property
    def received(self) -> int:
        return sum(len(side.recv_seq) for sides in self.pairs.values() for side in sides.values())

    @property
    def received_unique(self) -> int:
        return sum(len(set(side.recv_seq)) for sides in self.pairs.values() for side in sides.values())

    def lost_by_cause(self) -> Counter:
        return Counter(l.cause for l in self.lost)  # noqa: E741

    def errors(self, since: float | None = None) -> Counter:
        c: Counter = Counter()
        for sides in self.pairs.values():
            for side in sides.values():
                for sock in side.sockets:
                    for at, code in sock["errors"]:
                        if since is None or at >= since:
                            c[code] += 1
        return c

    def closes(self, since: float | None = None) -> Counter:
        """Sockets that ended (before the driver closed them), by the relay's close code
        (None: the connection ended without one)."""
        c: Counter = Counter()
        for sides in self.pairs.values():
            for side in sides.values():
                for sock in side.sockets:
                    if sock["ended"] is not None and sock["ended"] < self.stopped_at + 1 and (since is None or sock["ended"] >= since):
                        c[sock["code"]] += 1
        return c

    def peer_disconnects(self, since: float) -> list[tuple[int, str, float, str]]:
        """(pair, role told, time, reason) of every `peer_disconnected` at or after `since`."""
        out = []
        for index, sides in self.pairs.items():
            for role, side in sides.items():
                for sock in side.sockets:
                    for at, reason in sock["unpaired"]:
                        if at >= since and reason != "socket_ended":
                            out.append((index, role, at, reason))
        return out

    def sockets_ended_between(self, start: float, end: float) -> list[tuple[int, str, int]]:
        """(pair, role, incarnation) of every socket that ended (not closed by the driver) in [start, end]."""
        return [
            (index, role, k)
            for index, sides in self.pairs.items()
            for role, side in sides.items()
            for k, sock in enumerate(side.sockets)
            if sock["ended"] is not None and start <= sock["ended"] <= end and sock["ended"] < self.stopped_at
        ]

    def received_sent_on(self, sockets: list[tuple[int, str, int]], since: float) -> int:
        """Frames sent on these sockets at or after `since` that their receivers got."""
        count = 0
        for index, role, k in sockets:
            s, r = self.pairs[index][role], self.pairs[index][OTHER[role]]
            got = set(r.recv_seq)
            count += sum(1 for seq, (t, inc) in enumerate(zip(s.sent_t, s.sent_inc)) if inc == k and t >= since and seq in got)
        return count

    def repair_times(self, since: float) -> dict[int, float | None]:
        """For each pair disrupted at or after `since` (a socket of it ended, or a side was
        told `peer_disconnected`): how long after `since` it was paired again for good (both
        sides with `peer_joined` on their last socket, nothing after); None: never."""
        out: dict[int, float | None] = {}
        for index, sides in self.pairs.items():
            disrupted = False
            last_join = since
            for side in sides.values():
                for sock in side.sockets:
                    ended = sock["ended"] if sock["ended"] is not None and sock["ended"] < self.stopped_at else None
                    if (ended is not None and ended >= since) or any(at >= since for at, _ in sock["unpaired"]):
                        disrupted = True
            if not disrupted:
                continue
            ok = True
            for side in sides.values():
                last = side.sockets[-1] if side.sockets else None
                # Paired at the end: a peer_joined after the last peer_disconnected on the last socket.
                if last is None or (last["ended"] is not None and last["ended"] < self.stopped_at) or not last["paired"]:
                    ok = False
                    continue
                joined, unpaired = last["paired"][-1], [at for at, _ in last["unpaired"] if at < self.stopped_at]
                if unpaired and unpaired[-1] > joined:
                    ok = False
                    continue
                last_join = max(last_join, joined)
            out[index] = (last_join - since) if ok else None
        return out

    def unpaired_at_end(self) -> list[int]:
        bad = []
        for index, sides in self.pairs.items():
            for side in sides.values():
                last = side.sockets[-1] if side.sockets else None
                if last is None or (last["ended"] is not None and last["ended"] < self.stopped_at) or not last["paired"]:
                    bad.append(index)
                    break
                if [at for at, _ in last["unpaired"] if at < self.stopped_at and at > last["paired"][-1]]:
                    bad.append(index)
                    break
        return bad

    def silent_tail(self, seconds: float) -> list[tuple[int, str]]:
        """(pair, sender) of every direction none of whose frames sent in the last `seconds`
        before the stop arrived (a pair paired in name only)."""
        out = []
        for index, sides in self.pairs.items():
            for sender in ROLES:
                s, r = sides[sender], sides[OTHER[sender]]
                got = set(r.recv_seq)
                tail = [seq for seq, (t, f) in enumerate(zip(s.sent_t, s.sent_flags)) if t >= self.stopped_at - seconds and f & SENT_OPEN]
                if not tail or not any(seq in got for seq in tail):
                    out.append((index, sender))
        return out

    def connect_failures(self, since: float | None = None) -> Counter:
        """Failed connection attempts (refused upgrades, timeouts...), by reason."""
        c: Counter = Counter()
        for sides in self.pairs.values():
            for side in sides.values():
                for at, why in side.connect_failures:
                    if since is None or at >= since:
                        c[why[:120]] += 1
        return c

    def summary(self, fault_at: float | None = None) -> str:
        ref = fault_at if fault_at is not None else self.stopped_at
        lines = [
            f"frames: {self.sent_total} due, {self.sent_written} written, {self.received} received ({self.received_unique} distinct)",
            f"duplicates {self.duplicates}, reorderings {self.reorderings}, misrouted {len(self.misrouted)}, unexpected messages {self.unexpected_count}",
            f"lost {len(self.lost)}: {dict(self.lost_by_cause())}; NO_PEER without a lost frame: {len(self.refusals_unmatched)}",
            f"errors {dict(self.errors())}; closes {dict(self.closes())}",
        ]
        if self.lost:
            rel = sorted(l.sent_at - ref for l in self.lost)  # noqa: E741
            lines.append(f"lost frames sent {rel[0]:+.2f}..{rel[-1]:+.2f}s from the fault")
            by_cause: dict[str, list[float]] = defaultdict(list)
            for l in self.lost:  # noqa: E741
                by_cause[l.cause].append(l.sent_at - ref)
            for cause, ts in sorted(by_cause.items()):
                lines.append(f"  {cause}: {len(ts)}, sent {min(ts):+.2f}..{max(ts):+.2f}s")
        if fault_at is not None:
            rt = self.repair_times(fault_at)
            done = [v for v in rt.values() if v is not None]
            lines.append(
                f"pairs disrupted {len(rt)}, paired again {len(done)}"
                + (f", in {min(done):.2f}..{max(done):.2f}s (median {statistics.median(done):.2f}s)" if done else "")
            )
            pd = self.peer_disconnects(fault_at)
            if pd:
                reasons = Counter(r for *_, r in pd)
                ts = sorted(at - fault_at for _, _, at, _ in pd)
                lines.append(f"peer_disconnected {dict(reasons)} at {ts[0]:.2f}..{ts[-1]:.2f}s")
        return "\n".join(lines)


def _addressed(mine: dict[str, Any], receiver: SideRecord, t: float) -> int | None:
    """The receiver's socket that a frame sent at `t` on socket `mine` went to: the one its
    last `peer_joined` before `t` named (a room record read while a slot's release waited
    for storage can name one that has ended), else the one open at `t`."""
    named = [nonce for at, nonce in zip(mine["paired"], mine.get("paired_with", ())) if at <= t]
    addressed = receiver.socket_of_session(named[-1]) if named else None
    return addressed if addressed is not None else receiver.socket_at(t)


def _new_session_after(sock: dict[str, Any], t: float, window: float) -> bool:
    """Whether the sender's socket heard a new `peer_joined` within `window` after `t`
    with no `peer_disconnected` between: the peer it was sending to had been replaced (a
    new socket of the peer took the slot), so a frame in flight to the old one is dropped
    and the new session starts afresh (README: frames in flight when a socket is replaced
    are dropped)."""
    joins = [j for j in sock["paired"] if t < j <= t + window]
    if not joins:
        return False
    return not any(t < at < joins[0] for at, _ in sock["unpaired"])


def lost_times(report: TrafficReport, fault_at: float) -> list[float]:
    return sorted(l.sent_at - fault_at for l in report.lost)  # noqa: E741


__all__ = ["TrafficDriver", "TrafficReport", "Lost", "lost_times"]
