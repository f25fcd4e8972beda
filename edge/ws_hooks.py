"""The websockets internals the per-socket abuse limits hook into, checked once at import.

websockets' sans-I/O protocol answers a PING with a PONG while it parses what was read,
before the application hears of the frame: `Protocol.parse` calls `self.recv_frame(frame)`
for each frame of the read, and `recv_frame` writes the pong into the protocol's output,
which the asyncio connection hands to the transport as soon as the read is parsed. One
read can hold ~40,000 empty pings, all answered before any code of ours runs.

`watch_control_frames` puts a check in front of `recv_frame` on one protocol object: each
ping and pong is shown to `allow` before websockets acts on it. `allow` returning False
means it has failed the connection (`Protocol.fail`, which also discards the rest of the
read): that frame and everything after it go unanswered.

`HOOKED` says whether this works with the installed websockets: at import, a real
`ServerProtocol` is fed three pings with a check that refuses the second, and must answer
with exactly one pong and the close frame. When it does not (a release that parses
differently), `edge.front.HttpConnection` counts control frames as events instead, after
the read was parsed and answered: coarser (one read's worth of pongs gets out), still
counted. The edge logs which one it uses when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

CONTROL_OPCODES = (Opcode.PING, Opcode.PONG)  # control frames a client may send any number of


def watch_control_frames(protocol: Protocol, allow: Callable[[], bool]) -> None:
    """Ask `allow()` before `protocol` acts on each ping or pong it parses; a frame it
    refuses is dropped (`allow` has failed the connection). Data frames pass unasked:
    the wrapper costs them one call and two comparisons."""
    recv_frame = protocol.recv_frame
    ping, pong = Opcode.PING, Opcode.PONG

    def checked(frame: Frame) -> None:
        opcode = frame.opcode
        if (opcode is ping or opcode is pong) and not allow():
            return
        recv_frame(frame)

    protocol.recv_frame = checked  # type: ignore[method-assign]


def _probe() -> bool:
    """Whether `watch_control_frames` sheds pings as intended with this websockets."""
    try:
        protocol = ServerProtocol(state=State.OPEN, logger=logging.getLogger("edge.websockets.probe"))
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
        return asked == 2 and written == pong + close and protocol.events_received() == [
            Frame(Opcode.PING, b"")
        ]
    except Exception:
        return False


HOOKED = _probe()
