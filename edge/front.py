"""Plain HTTP requests on the WebSocket port: methods other than GET, and request bodies.

`websockets` reads only what an opening handshake needs: a GET without a body. The HTTP
API also needs `POST /auth/refresh` with a JSON body and `DELETE /api/rooms/{id}`
(protocol.md §8.2), on the same host and port. `HttpConnection` reads the request head
(and body) itself, remembers the method and body, and hands `websockets` the head as a
bodiless GET; `process_request` then answers with `http_method` and `http_body` in hand.
A WebSocket upgrade passes through unchanged.

It also holds the per-socket limits, on the hooks of `edge.internals.TappedConnection`:
pings and pongs spend the socket's rate limit as they are parsed (without that shortcut,
once the read was parsed), every read spends its bytes of the socket's byte rate limit
before it is parsed, and the edge is asked to check the socket's whole outgoing buffer
after a read that websockets answered while the write buffer was over its high-water
mark (without the shortcuts, after every read). And it gives back the socket's place under the
edge's socket caps when its connection is gone, whether or not the upgrade completed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from websockets.protocol import State

from edge.internals import TappedConnection
from edge.protocol.limits import TokenBucket
from schemas.client import CloseCode, Error, ErrorCode, encode

# Limits for the requests this front reads itself; WebSocket upgrades are websockets' business.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024

# What a socket over its rate limit with pings or pongs hears before its close 1008.
CONTROL_FLOOD_FAREWELL = encode(Error(code=ErrorCode.RATE_LIMITED, message="Too many control frames; slow down"))
# And one over its byte rate limit.
BYTE_FLOOD_FAREWELL = encode(Error(code=ErrorCode.RATE_LIMITED, message="Too much data; slow down"))
# Once a socket is shed, what it sends is read only this often, and dropped unlooked-at:
# enough to notice it close (then its connection ends at once), never enough to keep a
# flooder that ignores the close sending at the edge's full reading speed until the abort.
SHED_READ_PAUSE_S = 0.1


class HttpConnection(TappedConnection):
    """A `websockets` server connection that also carries the HTTP API's requests."""

    # In slots, as TappedConnection's (which says why).
    __slots__ = (
        "http_method", "http_body", "rate", "byte_rate", "on_shed", "check_outgoing", "relay_target",
        "_front_buffer", "_release_caps", "_lost", "_shed_done",
    )  # fmt: skip

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.http_method = "GET"
        self.http_body = b""
        # The socket's inbound rate limit, the one its session spends a token of per message,
        # set by the edge at the upgrade: every ping and pong spends one too (protocol.md §12
        # item 6). Past it the socket hears `error RATE_LIMITED` and a close 1008 at once,
        # from inside the parse: the rest of that read is discarded unanswered, and so is
        # whatever it sends after. The TCP connection is aborted a close timeout later if the
        # client has not closed it by then (one that never reads never would).
        self.rate: TokenBucket | None = None
        # The socket's inbound byte rate limit (issue 16 item 9), set by the edge at the
        # upgrade: each read spends its length (frames, headers and control frames as they
        # come off the wire) before websockets parses it. Past it, as for a control-frame
        # flood: `error RATE_LIMITED`, close 1008, that read and all after it discarded.
        self.byte_rate: TokenBucket | None = None
        # Told once, by the edge, when the socket is shed for either limit, with what it passed.
        self.on_shed: Callable[[str], None] | None = None
        # Called after a read while the write buffer is over its high-water mark (websockets
        # wrote pongs for that read, which no queue of ours bounds): the edge checks the
        # socket's whole outgoing buffer against its bound.
        self.check_outgoing: Callable[[], None] | None = None
        self.relay_target = None  # the edge's WsTarget, once the upgrade is let through
        self._front_buffer: bytes | None = b""  # None once the request went to websockets
        self._release_caps: Callable[[], None] | None = None
        self._lost = False
        self._shed_done = False

    def _control_frame_allowed(self) -> bool:
        """A ping or pong arrived: spend a token of the socket's rate, or shed the socket."""
        rate = self.rate
        if rate is None or rate.take(time.monotonic()):
            return True
        self._shed(CONTROL_FLOOD_FAREWELL, "control frames (pings, pongs) past its rate limit")
        return False

    def _shed(self, farewell: bytes, passed: str) -> None:
        """Close 1008 at once, from inside the read: `farewell`, the close frame and EOF go
        out; the rest of the read and whatever follows are discarded unparsed; the TCP
        connection is aborted a close timeout later if the client has not closed it; the
        edge is told what the socket `passed`."""
        self.rate = self.byte_rate = None  # shed once
        self._shed_done = True
        protocol = self.protocol
        if protocol.state is State.OPEN:
            protocol.send_text(farewell)
        protocol.fail(CloseCode.POLICY, "rate limit exceeded")  # close frame, EOF, the rest discarded
        self.loop.call_later(self.close_timeout or 10.0, self.transport.abort)
        if self.on_shed is not None:
            self.on_shed(passed)

    def _read_again(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def hold_until_lost(self, release: Callable[[], None]) -> None:
        """Call `release` once this connection is gone (at once if it is gone already): a
        place under the edge's socket caps, taken before the 101, is given back however the
        connection ends, the handshake failing after the checks included."""
        if self._lost:
            release()
        else:
            self._release_caps = release

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._lost = True
            release, self._release_caps = self._release_caps, None
            if release is not None:
                release()

    def data_received(self, data: bytes) -> None:
        if self._shed_done:
            # After the read that shed it: dropped, and the next read waits a while.
            transport = self.transport
            if not transport.is_closing():
                transport.pause_reading()
                self.loop.call_later(SHED_READ_PAUSE_S, self._read_again)
            return
        if self._front_buffer is None:
            byte_rate = self.byte_rate
            if byte_rate is not None and not byte_rate.take(time.monotonic(), len(data)):
                # Then websockets' parser discards this read.
                self._shed(BYTE_FLOOD_FAREWELL, "inbound bytes past its byte rate limit (RELAY_SOCKET_BYTES_PER_S)")
            super().data_received(data)
            if self.writes_paused and self.check_outgoing is not None:
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

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request this front cannot take, and hang up."""
        self._front_buffer = None
        body = f"{reason}\n".encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        self.transport.close()
