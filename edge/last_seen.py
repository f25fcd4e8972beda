"""When a room's connected sockets last spoke, asked of the edges that hold them.

KV has lastSeen only every RELAY_LAST_SEEN_INTERVAL_MS (writing it more often for every
socket costs the latency of every frame); /status and /api/rooms want it exact.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
from nats.aio.msg import Msg

from edge.context import EdgeContext
from schemas.edge_events import LastSeenAnswer, LastSeenQuery, last_seen_answer_decoder, last_seen_query_decoder
from schemas.records import RoomRecord
from schemas.subjects import edge_last_seen_subject


class LastSeen:
    """Answers other edges' lastSeen questions, and asks them."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.ctx = ctx

    async def answer(self, msg: Msg) -> None:
        """Another edge asks when our sockets last sent something."""
        try:
            query = last_seen_query_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        seen = {}
        for socket_id in query.socket_ids:
            conn = self.ctx.connections.get(socket_id)
            if conn is not None and conn.last_message_ms:
                seen[socket_id] = conn.last_message_ms
        with contextlib.suppress(nats.errors.Error):
            await msg.respond(msgspec.json.encode(LastSeenAnswer(last_seen=seen)))

    async def of_room(self, record: RoomRecord) -> tuple[int | None, int | None]:
        """lastSeen of the room's connected Mac and iPhone; None for a socket not connected
        or an edge that does not answer in time (the caller then has KV's)."""
        ctx = self.ctx
        own = ctx.settings.edge_id
        holders = [h if h is not None and ctx.is_alive(h) else None for h in (record.mac, record.ios)]
        by_edge: dict[str, list[str]] = {}
        for holder in holders:
            if holder is not None and holder.edge_id != own:
                by_edge.setdefault(holder.edge_id, []).append(holder.socket_id)

        async def ask(edge_id: str, socket_ids: list[str]) -> dict[str, int]:
            try:
                reply = await ctx.nc.request(
                    edge_last_seen_subject(edge_id),
                    msgspec.json.encode(LastSeenQuery(socket_ids=socket_ids)),
                    timeout=ctx.settings.last_seen_query_timeout_ms / 1000,
                )
                return last_seen_answer_decoder.decode(reply.data).last_seen
            except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
                return {}

        answers: dict[str, int] = {}
        for found in await asyncio.gather(*(ask(e, ids) for e, ids in by_edge.items())):
            answers.update(found)
        for holder in holders:
            if holder is not None and holder.edge_id == own:
                conn = ctx.connections.get(holder.socket_id)
                if conn is not None and conn.last_message_ms:
                    answers[holder.socket_id] = conn.last_message_ms
        mac, ios = (answers.get(h.socket_id) if h is not None else None for h in holders)
        return mac, ios
