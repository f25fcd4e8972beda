"""Everything answered before a WebSocket upgrade: /ws's checks, health, the HTTP API, the
status page, /metrics.

Bounded in time, so that slow storage gives a 503 inside websockets' open timeout, and
never raising: websockets would log a traceback per request, a flood anyone could cause.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from urllib.parse import parse_qs

import msgspec

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from edge.access import Refusal
from edge.admission import Busy
from edge.api import BAD_ROOM_ID, ApiRequest, HttpReply
from edge.connection_log import RefusalLog
from edge.context import EdgeContext, WsTarget
from edge.leases import CannotServe
from edge.protocol.limits import TokenBucket
from edge.status import PATHS as STATUS_PATHS
from edge.status import StatusPage
from runtime.metrics import exposition
from schemas.subjects import ROLES, is_valid_room_id

log = logging.getLogger("edge")

# The largest WebSocket frame header a client writes (masked): 2 + 8 + 4 bytes.
CLIENT_FRAME_HEADER_MAX = 14


class _RedactCredentials(logging.Filter):
    """websockets logs request headers at DEBUG: keep API keys and tokens out of the log."""

    _HEADERS = frozenset({"authorization", "proxy-authorization", "x-sandbox-key", "cookie"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in self._HEADERS:
            record.args = (args[0], "***")
        return True


# The logger websockets uses for our server's connections (handshakes included).
ws_log = logging.getLogger("edge.websockets")
ws_log.addFilter(_RedactCredentials())


def normalised_path(target: str) -> str:
    """The path of a request target, without its query and with empty segments dropped.

    Not urlsplit: it would read "//ws" as a host name. The Mac builds "\\(serverURL)/ws",
    so a base URL with a trailing slash gives "//ws"."""
    return "/" + "/".join(part for part in target.partition("?")[0].split("/") if part)


def _reason_of(response: Response) -> str:
    """The first line of a refusal's text (the edge's own words, never the request's)."""
    body = (response.body or b"").strip()
    if not body:
        return ""
    if response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            fields = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return ""
        return str(fields.get("message") or fields.get("error") or "")[:200] if isinstance(fields, dict) else ""
    return body.decode(errors="replace").splitlines()[0][:200]


def reply(answer: HttpReply) -> Response:
    """The handshake's HTTP response for `answer`; the connection closes after it."""
    headers = Headers(
        [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            ("Connection", "close"),
            *answer.headers.items(),
        ]
    )
    return Response(answer.status, http.HTTPStatus(answer.status).phrase, headers, answer.body)


class HttpFront:
    """websockets' `process_request`: answers a request, or lets its upgrade go on (None)."""

    def __init__(self, ctx: EdgeContext, status: StatusPage) -> None:
        self.ctx = ctx
        self.status = status
        self.refusals = RefusalLog()

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        try:
            async with asyncio.timeout(self.ctx.settings.request_budget_ms / 1000):
                response = await self._answer(ws, request)
        except TimeoutError:
            log.warning("%s: storage too slow; answered 503", request.path.partition("?")[0])
            response = reply(HttpReply.text(503, "storage unavailable; try again"))
        except Exception as exc:
            log.error("%s failed: %s", request.path.partition("?")[0], type(exc).__name__)
            response = reply(HttpReply.text(500, "internal error"))
        if normalised_path(request.path) == "/ws":
            self.ctx.metrics.upgrades.labels(status="101" if response is None else str(response.status_code)).inc()
            if response is not None:
                self.refusals.refused(response.status_code, _reason_of(response), self._address(ws, request))
        return response

    def _address(self, ws: ServerConnection, request: Request) -> str:
        try:
            if self.ctx.access is not None:
                return self.ctx.access.client_address(ws.remote_address[0], request.headers)
            return str(ws.remote_address[0])
        except Exception:
            return "?"

    async def _answer(self, ws: ServerConnection, request: Request) -> Response | None:
        ctx = self.ctx
        raw_query = request.path.partition("?")[2]
        query = {name: values[0] for name, values in parse_qs(raw_query).items()}
        path = normalised_path(request.path)
        method = getattr(ws, "http_method", "GET")
        if path == "/ws":
            if method != "GET":
                return reply(HttpReply.text(405, "use GET with a WebSocket upgrade"))
            return await self._admit(ws, request, query)
        if path == "/healthz":
            return reply(HttpReply.text(200, "ok"))
        if path == "/readyz":
            if ctx.ready.is_set() and ctx.nc is not None and ctx.nc.is_connected:
                return reply(HttpReply.text(200, "ready"))
            return reply(HttpReply.text(503, "not ready"))
        if path in STATUS_PATHS:
            return await self._status(ws, request, path, method)
        if ctx.api is None or not ctx.ready.is_set():
            return reply(HttpReply.text(503, "relay is not ready"))
        route = ctx.api.route(method, path)
        if route is None:
            return reply(HttpReply.text(404, "not found"))
        if isinstance(route, HttpReply):
            return reply(route)
        api_request = ApiRequest(
            method=method,
            path=path,
            query=query,
            headers=request.headers,
            body=getattr(ws, "http_body", b""),
            address=ctx.access.client_address(ws.remote_address[0], request.headers),
        )
        return reply(await ctx.api.handle(route, api_request))

    async def _status(self, ws: ServerConnection, request: Request, path: str, method: str) -> Response:
        """The operator's status page (`edge.status`): served while draining too, when an
        operator watches most; never before storage is open (the operator check needs it)."""
        if method != "GET":
            return reply(HttpReply.text(405, "use GET"))
        access = self.ctx.access
        if access is None:
            return reply(HttpReply.text(503, "relay is not ready"))
        peer = str(ws.remote_address[0])
        try:
            access.check_operator(request.headers, peer, access.client_address(peer, request.headers))
        except Refusal as refusal:
            return reply(HttpReply.text(refusal.status, refusal.message, refusal.headers))
        return reply(await self.status.reply(path))

    async def _admit(self, ws: ServerConnection, request: Request, query: dict[str, str]) -> Response | None:
        """The checks before the 101 (protocol.md §2.3, §4.2): upgrades per address per second
        first (cheap, before any storage), the request, sockets per address, the key, sockets
        per user, the room limit (README: What the edge checks before the 101)."""
        ctx = self.ctx
        if ctx.stopping.is_set() or not ctx.ready.is_set():
            return reply(HttpReply.text(503, "relay is not ready"))
        access, s = ctx.access, ctx.settings
        address = access.client_address(ws.remote_address[0], request.headers)
        room_id, role = query.get("room_id", ""), query.get("role")
        try:
            access.refuse_if_upgrading_too_fast(address, time.monotonic())
            if not is_valid_room_id(room_id):
                return reply(HttpReply.text(400, BAD_ROOM_ID))
            if role not in (None, *ROLES):
                return reply(HttpReply.text(400, "role must be mac or ios"))
            access.refuse_if_over_socket_caps(None, address)
            # Storage is asked at the rate it answers (`edge.admission`): in a storm the
            # rest wait their turn, or are refused now, before they cost anything. A socket
            # whose register or join would be refused is not worth upgrading either.
            ctx.gates.refuse_if_room_requests_full()
            async with ctx.gates.upgrades.place():
                principal = await access.authenticate(request.headers, query.get("user_id"), address)
                if principal.user is None:
                    raise Refusal(400, "the operator token acts for a user: add ?user_id=USER")
                access.refuse_if_over_socket_caps(principal, address)
                room_settled = role == "mac" and await access.check_room_limit(principal, room_id)
            # Checked and counted in one step, after the last wait: upgrades side by side
            # cannot all take one last place. Given back when the connection is gone.
            ws.hold_until_lost(access.hold_socket(principal, address))
        except Refusal as refusal:
            return reply(HttpReply.text(refusal.status, refusal.message, refusal.headers))
        except Busy as busy:
            return reply(HttpReply.text(503, "relay busy; try again", {"Retry-After": str(int(busy.retry_after_s))}))
        ws.relay_target = WsTarget(room_id=room_id, role=role, principal=principal, room_settled=room_settled, address=address)  # type: ignore[attr-defined]
        # The socket's rate limit, from its first frame after the 101: its messages (the
        # session's) and its pings and pongs (the connection's) spend the same tokens.
        if s.socket_rate_limit_per_s > 0:
            ws.rate = TokenBucket(s.socket_rate_limit_per_s, s.socket_rate_burst)
        # And its bytes, as read (issue 16 item 9); room for the largest frame's header too.
        if s.socket_bytes_per_s > 0:
            ws.byte_rate = TokenBucket(s.socket_bytes_per_s, s.socket_bytes_burst + CLIENT_FRAME_HEADER_MAX)
        return None

    # --- /metrics, on its own port --------------------------------------------------

    async def serve_metrics(self) -> Server | None:
        """/metrics on a port of its own (RELAY_METRICS_HOST, RELAY_METRICS_PORT), never the
        public one: the counters are the operator's. None when it is not served."""
        s = self.ctx.settings
        if s.metrics_port < 0:
            return None
        try:
            return await serve(
                _never_upgraded, s.metrics_host, s.metrics_port,
                process_request=self._answer_metrics, compression=None, server_header="termrelay", logger=ws_log,
            )  # fmt: skip
        except OSError as exc:
            raise CannotServe(
                f"cannot serve /metrics on {s.metrics_host}:{s.metrics_port} ({exc.strerror or exc}); "
                "choose another --metrics-port / RELAY_METRICS_PORT (-1: not served) or --metrics-host"
            ) from exc

    async def _answer_metrics(self, ws: ServerConnection, request: Request) -> Response:
        if request.path.partition("?")[0] == "/metrics":
            body, content_type = exposition(self.ctx.metrics.registry, request.headers.get("Accept"))
            return reply(HttpReply(200, body, content_type))
        return reply(HttpReply.text(404, "not found: this port serves /metrics only"))


async def _never_upgraded(ws: ServerConnection) -> None:
    """The metrics port's connection handler: never called (every request is answered before)."""
