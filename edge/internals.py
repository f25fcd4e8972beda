"""Every use the edge makes of websockets' and asyncio's internals, each checked at import.

Three shortcuts of the frame path and one of the per-socket limits lean on what the two
libraries do not promise:

- `watch_parse`: pings and pongs spend the socket's rate limit as websockets parses them,
  before it answers them (`watch_control_frames`, around `Protocol.recv_frame`). One read
  can hold ~40,000 empty pings, all answered before any code of ours would run otherwise.
- `write_at_once`: a frame from NATS is written to an idle socket there and then
  (`can_write_now`, `write_now`: the asyncio `Connection`'s `paused`, `send_in_progress`,
  `write_limit_high`, `transport`, `send_data`), without `ws.send`'s task-side waits.
- `take_at_once`: a client's message is taken as it is parsed (`TappedConnection`'s
  `process_event`) and published or answered without waking the socket's handler.
- `eager`: such a publish runs in the caller's stack up to its first wait (`run_eagerly`,
  which sets a future's `_asyncio_future_blocking` as a task would); 3.12's eager tasks
  would do, but the edge supports 3.11.

`PROBED` says which of them work with the installed releases: at import, on websockets'
own sans-I/O protocol and on a real server and client in an event loop of their own.
`shortcuts_for(settings.library_shortcuts)` is what one edge uses; each part of the edge
is handed it. Without a shortcut the edge takes the public way: the handler's `ws.recv`,
`ws.send` from the socket's backlog task, `create_task`, and control frames counted once
a read was parsed (and answered).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import types
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from edge.context import Connection

CONTROL_OPCODES = (Opcode.PING, Opcode.PONG)  # control frames a client may send any number of
# The largest WebSocket frame header the server writes (no mask): 2 + 8 bytes.
FRAME_HEADER_MAX = 10


@dataclass(frozen=True)
class Shortcuts:
    """Which internals one edge uses; each False one goes the public way."""

    watch_parse: bool = False  # pings and pongs counted as parsed, before websockets answers them
    write_at_once: bool = False  # frames from NATS written without `ws.send`
    take_at_once: bool = False  # messages taken as parsed, without the handler (needs write_at_once)
    eager: bool = False  # what a taken message starts runs now, not in a task
    why_not: str = ""  # why those that are off are off

    @property
    def all_on(self) -> bool:
        return self.watch_parse and self.write_at_once and self.take_at_once and self.eager

    def describe(self) -> str:
        """One line for the start log: which are on, and why the others are not."""
        names = ("watch_parse", "write_at_once", "take_at_once", "eager")
        on = [name for name in names if getattr(self, name)]
        off = [name for name in names if not getattr(self, name)]
        if not off:
            return "library shortcuts on (" + ", ".join(on) + ")"
        text = "library shortcuts off: " + ", ".join(off)
        if on:
            text += "; on: " + ", ".join(on)
        return text + f" ({self.why_not})"


# --- watch_parse ------------------------------------------------------------


def watch_control_frames(protocol: Protocol, allow: Callable[[], bool]) -> None:
    """Ask `allow()` before `protocol` acts on each ping or pong it parses; a frame it
    refuses is dropped (`allow` has failed the connection, `Protocol.fail`, which also
    discards the rest of the read). Data frames pass unasked: the wrapper costs them one
    call and two comparisons."""
    recv_frame = protocol.recv_frame
    ping, pong = Opcode.PING, Opcode.PONG

    def checked(frame: Frame) -> None:
        opcode = frame.opcode
        if (opcode is ping or opcode is pong) and not allow():
            return
        recv_frame(frame)

    protocol.recv_frame = checked  # type: ignore[method-assign]


# --- write_at_once ----------------------------------------------------------


def can_write_now(conn: Connection, size: int) -> bool:
    """Whether a text frame of `size` bytes can be written to the socket at once, in
    order: nothing of the socket's is queued or being written, it is open, not paused
    (from over the high-water mark until down to the low one), and this write keeps it
    under the high-water mark."""
    ws = conn.ws
    return (
        conn.drainer is None  # else it holds an item taken from the backlog: after it
        and not conn.backlog  # waiting for the session (`Session.busy`): after it
        and not conn.write_lock.locked()
        and not ws.paused
        and ws.send_in_progress is None
        and ws.protocol.state is State.OPEN
        and ws.transport.get_write_buffer_size() + size + FRAME_HEADER_MAX < ws.write_limit_high
    )


def write_now(conn: Connection, data: bytes) -> None:
    """What `ws.send` would do once `can_write_now`, without its waits (there is nothing
    to wait for) and without its per-call context manager, the largest cost of a delivery."""
    conn.ws.protocol.send_text(data)
    conn.ws.send_data()


# --- take_at_once -----------------------------------------------------------


class TappedConnection(ServerConnection):
    """websockets' server connection with a look at each frame it parses, before its queue."""

    # Attributes of ours in slots, not in the instance's dict: websockets' own 27 keep it
    # under CPython's 30 keys a dict of an instance shares with its class's other
    # instances; at 30 or more each socket's dict costs 1.3 KiB more (issue 18).
    __slots__ = ("take_message_now", "drop_messages", "last_dropped_ms", "shortcuts", "_count_control_frames", "_sees_pause")

    def __init__(self, *args: Any, shortcuts: Shortcuts | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by the edge while the socket's handler waits for its next message with nothing
        # queued: takes a whole text message there and then and says whether it did; what it
        # declines goes the usual way, through websockets' queue to the handler.
        self.take_message_now: Callable[[bytes], bool] | None = None
        # Set by the edge once it closes the socket: messages are dropped as they arrive, so
        # that a client sending fast cannot fill websockets' queue, which would stop reading
        # and leave the client's answer to the close frame unread until the close timeout.
        self.drop_messages = False
        self.last_dropped_ms = 0
        self.shortcuts = shortcuts = PROBED if shortcuts is None else shortcuts
        # Without the watch, control frames are counted once parsed (and answered).
        self._count_control_frames = not shortcuts.watch_parse
        self._sees_pause = shortcuts.write_at_once
        if shortcuts.watch_parse:
            watch_control_frames(self.protocol, self._control_frame_allowed)

    def _control_frame_allowed(self) -> bool:
        """A ping or pong arrived: whether websockets may act on it (False: the connection
        has been failed). Subclasses spend the socket's rate limit here."""
        return True

    @property
    def writes_paused(self) -> bool:
        """Whether the write buffer is over its high-water mark (and not yet down to the low
        one); without the shortcuts, always True: whoever asks checks the buffer itself."""
        return self.paused if self._sees_pause else True

    def process_event(self, event: object) -> None:
        if type(event) is Frame and event.opcode in DATA_OPCODES:
            if self.drop_messages:
                self.last_dropped_ms = int(time.time() * 1000)  # still a sign of life, for lastSeen
                return
            take = self.take_message_now
            if take is not None and event.fin and event.opcode is Opcode.TEXT and take(event.data):
                return
            self.take_message_now = None  # it queues for the handler: what follows must queue behind it
        elif self._count_control_frames and type(event) is Frame and event.opcode in CONTROL_OPCODES:
            if not self._control_frame_allowed():
                self.send_data()  # the farewell and the close frame; data_received wrote before
                return
        super().process_event(event)  # type: ignore[arg-type]


# --- eager ------------------------------------------------------------------


def run_eagerly(
    coro: Coroutine[Any, Any, None],
    create_task: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None],
) -> asyncio.Task[None] | None:
    """Run `coro` now up to its first wait. Returns None if it finished (exceptions are
    raised here), else what `create_task` (the owner's task group) made of the rest."""
    try:
        waiting_for = coro.send(None)
    except StopIteration:
        return None
    return create_task(_resume(coro, waiting_for))


def run_in_a_task(
    coro: Coroutine[Any, Any, None],
    create_task: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None] | None],
) -> asyncio.Task[None] | None:
    """`run_eagerly`'s public-API stand-in: all of `coro` runs in a task."""
    return create_task(coro)


async def _resume(coro: Coroutine[Any, Any, None], waiting_for: Any) -> None:
    """Go on with `coro`, stopped on `waiting_for` (a future, or None for a bare yield),
    as a task would: wake it when the future is done, pass on a cancellation."""
    while True:
        try:
            if waiting_for is None:
                await asyncio.sleep(0)
            else:
                waiting_for._asyncio_future_blocking = False  # what a task does with what it is given
                await asyncio.wait([waiting_for])  # the coroutine reads the result (or error) itself
        except asyncio.CancelledError as cancelled:
            if waiting_for is not None:
                waiting_for.cancel()
            step = functools.partial(coro.throw, cancelled)
        else:
            step = functools.partial(coro.send, None)
        try:
            waiting_for = step()
        except StopIteration:
            return


# --- the probes -------------------------------------------------------------

_probe_log = logging.getLogger("edge.internals.probe")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _probe_parse() -> str:
    """Why `watch_control_frames` does not shed pings as intended, or "": a real
    `ServerProtocol` is fed three pings with a check that refuses the second, and must
    answer with exactly one pong and the close frame."""
    try:
        protocol = ServerProtocol(state=State.OPEN, logger=_probe_log)
        asked = 0

        def allow() -> bool:
            nonlocal asked
            asked += 1
            if asked == 1:
                return True
            protocol.fail(1008, "probe")
            return False

        watch_control_frames(protocol, allow)
        empty_ping = b"\x89\x80\x00\x00\x00\x00"  # masked, zero key, no payload
        protocol.receive_data(empty_ping * 3)
        written = b"".join(protocol.data_to_send())
        pong, close = b"\x8a\x00", b"\x88\x07" + (1008).to_bytes(2, "big") + b"probe"
        if asked == 2 and written == pong + close and protocol.events_received() == [Frame(Opcode.PING, b"")]:
            return ""
        return "Protocol.recv_frame does not see each parsed frame"
    except Exception as exc:
        return f"Protocol.recv_frame: {_why(exc)}"


async def _probe_connection() -> tuple[str, str]:
    """Why `can_write_now`/`write_now` and `TappedConnection`'s take do not work, or "":
    a real server and client on loopback; the server writes "hi" at once, takes the
    client's "one" as it is parsed and must find "two" in its queue."""
    write_failed, take_failed = "", ""
    taken: list[bytes] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(ws: TappedConnection) -> None:
        nonlocal write_failed, take_failed
        def take(data: bytes) -> bool:
            if data != b"one":
                return False
            taken.append(data)
            return True

        try:
            ws.take_message_now = take
            conn = types.SimpleNamespace(ws=ws, drainer=None, backlog=(), write_lock=asyncio.Lock())
            try:
                if not can_write_now(conn, 2):  # type: ignore[arg-type]
                    write_failed = "an idle connection cannot be written at once"
                else:
                    write_now(conn, b"hi")  # type: ignore[arg-type]
            except Exception as exc:
                write_failed = f"asyncio Connection: {_why(exc)}"
            if write_failed:
                await ws.send("hi")
            try:
                message = await asyncio.wait_for(ws.recv(), 2)
                if message != "two" or taken != [b"one"]:
                    take_failed = "Connection.process_event does not see each parsed message"
            except Exception as exc:
                take_failed = f"Connection.process_event: {_why(exc)}"
        finally:
            if not done.done():
                done.set_result(None)

    def tapped(*args: Any, **kwargs: Any) -> TappedConnection:
        return TappedConnection(*args, shortcuts=Shortcuts(), **kwargs)

    async with serve(handler, "127.0.0.1", 0, create_connection=tapped, compression=None, logger=_probe_log) as server:  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, logger=_probe_log) as client:
            if await asyncio.wait_for(client.recv(), 2) != "hi":
                write_failed = write_failed or "a frame written at once did not arrive"
            await client.send("one")
            await client.send("two")
            await asyncio.wait_for(done, 2)
    return write_failed, take_failed


async def _probe_eager() -> str:
    """Why `run_eagerly` does not finish a coroutine that waits on a future, or ""."""
    future = asyncio.get_running_loop().create_future()
    if not hasattr(future, "_asyncio_future_blocking"):
        return "asyncio.Future has no _asyncio_future_blocking"
    seen: list[object] = []

    async def wait() -> None:
        seen.append(await future)

    task = run_eagerly(wait(), asyncio.ensure_future)
    if task is None:
        return "a waiting coroutine finished at once"
    future.set_result("done")
    await asyncio.wait_for(task, 2)
    return "" if seen == ["done"] else "the resumed coroutine did not get the future's result"


def _probe() -> Shortcuts:
    """Try each shortcut on the installed releases, in an event loop of the probe's own."""
    parse_failed = _probe_parse()
    outcome: list[tuple[str, str, str]] = []

    async def in_a_loop() -> None:
        try:
            write_failed, take_failed = await asyncio.wait_for(_probe_connection(), 5)
        except Exception as exc:
            write_failed = take_failed = f"probe connection: {_why(exc)}"
        try:
            eager_failed = await asyncio.wait_for(_probe_eager(), 5)
        except Exception as exc:
            eager_failed = _why(exc)
        outcome.append((write_failed, take_failed, eager_failed))

    # A thread of its own: the importer may be inside a running loop already.
    thread = threading.Thread(target=asyncio.run, args=(in_a_loop(),), name="edge-internals-probe", daemon=True)
    thread.start()
    thread.join(15)
    write_failed, take_failed, eager_failed = outcome[0] if outcome else ("probe timed out",) * 3
    if not take_failed and write_failed:
        take_failed = "needs write_at_once"  # heartbeats taken at once are answered at once
    failed = {
        "watch_parse": parse_failed,
        "write_at_once": write_failed,
        "take_at_once": take_failed,
        "eager": eager_failed,
    }
    return Shortcuts(
        watch_parse=not parse_failed,
        write_at_once=not write_failed,
        take_at_once=not take_failed,
        eager=not eager_failed,
        why_not="; ".join(f"{name}: {why}" for name, why in failed.items() if why),
    )


PROBED = _probe()
"""What works with the installed websockets and asyncio (checked once, at import)."""

OFF = Shortcuts(why_not="RELAY_LIBRARY_SHORTCUTS is false")


def shortcuts_for(enabled: bool) -> Shortcuts:
    """What one edge uses: what the probe found, unless the operator turned them off."""
    return PROBED if enabled else OFF
