"""Plain HTTP requests on the WebSocket port: methods other than GET, and request bodies.

`websockets` reads only what an opening handshake needs: a GET without a body. The HTTP
API also needs `POST /auth/refresh` with a JSON body and `DELETE /api/rooms/{id}`
(protocol.md §8.2), on the same host and port. `HttpConnection` reads the request head
(and body) itself, remembers the method and body, and hands `websockets` the head as a
bodiless GET; `process_request` then answers with `http_method` and `http_body` in hand.
A WebSocket upgrade passes through unchanged.

It also holds the per-socket limits that need websockets' internals (`edge.ws_hooks`):
pings and pongs spend the socket's rate limit as they are parsed, and the edge is asked
to check the socket's whole outgoing buffer after a read that websockets answered while
the write buffer was over its high-water mark.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import State

from edge import ws_hooks
from edge.limits import TokenBucket
from schemas.client import CloseCode, Error, ErrorCode, encode

# Limits for the requests this front reads itself; WebSocket upgrades are websockets' business.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024

# What a socket over its rate limit with pings or pongs hears before its close 1008.
CONTROL_FLOOD_FAREWELL = encode(Error(code=ErrorCode.RATE_LIMITED, message="Too many control frames; slow down"))


class HttpConnection(ServerConnection):
    """A `websockets` server connection that also carries the HTTP API's requests."""

    http_method: str = "GET"
    http_body: bytes = b""
    # Set by the edge while the socket's handler waits for its next message with nothing
    # queued: takes a whole text message there and then and says whether it did; what it
    # declines goes the usual way, through websockets' queue to the handler.
    take_message_now: Callable[[bytes], bool] | None = None
    # Set by the edge once it closes the socket: messages are dropped as they arrive, so
    # that a client sending fast cannot fill websockets' queue, which would stop reading
    # and leave the client's answer to the close frame unread until the close timeout.
    drop_messages: bool = False
    last_dropped_ms: int = 0
    # The socket's inbound rate limit, the one its session spends a token of per message,
    # set by the edge at the upgrade: every ping and pong spends one too (protocol.md §12
    # item 6). Past it the socket hears `error RATE_LIMITED` and a close 1008 at once,
    # from inside the parse: the rest of that read is discarded unanswered, and so is
    # whatever it sends after. The TCP connection is aborted a close timeout later if the
    # client has not closed it by then (one that never reads never would).
    rate: TokenBucket | None = None
    # Told once, by the edge, when the socket is closed for a control-frame flood.
    on_control_flood: Callable[[], None] | None = None
    # Called after a read while the write buffer is over its high-water mark (websockets
    # wrote pongs for that read, which no queue of ours bounds): the edge checks the
    # socket's whole outgoing buffer against its bound.
    check_outgoing: Callable[[], None] | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._front_buffer: bytes | None = b""  # None once the request went to websockets
        if ws_hooks.HOOKED:
            ws_hooks.watch_control_frames(self.protocol, self._control_frame_allowed)

    def _control_frame_allowed(self) -> bool:
        """A ping or pong arrived: spend a token of the socket's rate, or shed the socket."""
        rate = self.rate
        if rate is None or rate.take(time.monotonic()):
            return True
        self.rate = None  # shed once; the parser discards what follows
        protocol = self.protocol
        if protocol.state is State.OPEN:
            protocol.send_text(CONTROL_FLOOD_FAREWELL)
        protocol.fail(CloseCode.POLICY, "rate limit exceeded")  # close frame, EOF, the rest discarded
        self.loop.call_later(self.close_timeout or 10.0, self.transport.abort)
        if self.on_control_flood is not None:
            self.on_control_flood()
        return False

    def data_received(self, data: bytes) -> None:
        if self._front_buffer is None:
            super().data_received(data)
            if self.paused and self.check_outgoing is not None:
                self.check_outgoing()
            return
        head_was_complete = b"\r\n\r\n" in self._front_buffer
        buffer = self._front_buffer + data
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                self._refuse(431, "Request Header Fields Too Large")
            else:
                self._front_buffer = buffer
            return
        head, rest = buffer[:head_end], buffer[head_end + 4 :]
        request_line, _, header_block = head.partition(b"\r\n")
        method, _, target = request_line.partition(b" ")
        headers = [line for line in header_block.split(b"\r\n") if line]
        names = [line.partition(b":")[0].strip().lower() for line in headers]
        if b"transfer-encoding" in names:
            self._refuse(411, "Length Required")
            return
        lengths = {line.partition(b":")[2].strip() for line, name in zip(headers, names) if name == b"content-length"}
        if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
            self._refuse(400, "Bad Request")
            return
        length = int(lengths.pop()) if lengths else 0
        if length > MAX_BODY_BYTES:
            self._refuse(413, "Content Too Large")
            return
        if len(rest) < length:
            if not head_was_complete and b"expect" in names:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for this on larger bodies
            self._front_buffer = buffer
            return
        if method == b"GET" and length == 0:
            self._front_buffer = None
            super().data_received(buffer)  # a handshake, or a plain GET: websockets' as it is
            return
        self.http_method = method.decode("ascii", "replace")
        self.http_body = rest[:length]
        kept = [line for line, name in zip(headers, names) if name not in (b"content-length", b"expect")]
        self._front_buffer = None
        super().data_received(b"\r\n".join([b"GET " + target, *kept]) + b"\r\n\r\n")

    def process_event(self, event: object) -> None:
        if type(event) is Frame and event.opcode in DATA_OPCODES:
            if self.drop_messages:
                self.last_dropped_ms = int(time.time() * 1000)  # still a sign of life, for lastSeen
                return
            take = self.take_message_now
            if take is not None and event.fin and event.opcode is Opcode.TEXT and take(event.data):
                return
            self.take_message_now = None  # it queues for the handler: what follows must queue behind it
        elif not ws_hooks.HOOKED and type(event) is Frame and event.opcode in ws_hooks.CONTROL_OPCODES:
            # The fallback when the parse cannot be watched: counted once parsed (and answered).
            if not self._control_frame_allowed():
                self.send_data()  # the farewell and the close frame; data_received wrote before
                return
        super().process_event(event)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request this front cannot take, and hang up."""
        self._front_buffer = None
        body = f"{reason}\n".encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        self.transport.close()
