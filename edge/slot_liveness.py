"""Whether the socket a room slot names lives, for one decision about the room.

The edge's view of the leases (`EdgeContext.live_edges`, kept by `edge.leases`' watcher)
lags storage for as long as its watcher takes to come back after a NATS reconnect or a
storage outage: seconds, after a restart of the whole NATS cluster. A slot held by an
incarnation the view does not know yet then looked like one of a dead edge, so a register
or join named no peer and told nobody, and a departure told its peer nothing: two live
sockets of one room, each taking the other for absent, for good (issue 15). A slot of
such an incarnation is judged by its edge's lease in storage instead (one read; none for
an incarnation the watcher has seen go, or that the view holds).
"""

from __future__ import annotations

from edge.context import EdgeContext
from schemas.records import RoomRecord, SlotHolder


class SlotLiveness:
    """Called with a slot holder, as the room decisions' `is_alive`; `learn` first."""

    def __init__(self, ctx: EdgeContext) -> None:
        self.ctx = ctx
        self._confirmed: set[tuple[str, str]] = set()  # incarnations whose lease storage showed alive

    def __call__(self, holder: SlotHolder) -> bool:
        return self.ctx.is_alive(holder) or (holder.edge_id, holder.boot_id) in self._confirmed

    async def learn(self, record: RoomRecord) -> None:
        """Read the lease of each edge whose slot in `record` names an incarnation the view
        neither holds nor has seen go (storage errors are the caller's)."""
        ctx = self.ctx
        for holder in (record.mac, record.ios):
            if holder is None or holder.edge_id == ctx.settings.edge_id or self(holder):
                continue
            if (holder.edge_id, holder.boot_id) in ctx.gone_incarnations:
                continue
            lease, _ = await ctx.presence.read_lease(holder.edge_id)
            if lease is not None and lease.boot_id == holder.boot_id:
                self._confirmed.add((holder.edge_id, holder.boot_id))
