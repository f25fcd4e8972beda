"""This edge's lease (one running process per edge id) and the view of the other edges' leases.

What to do about a lease held by another incarnation, and about a renewal that lost its
compare-and-set, is decided in `edge.protocol.leases`; this module talks to NATS. The
lease is read and written on a connection of its own, beside the main one
(`edge.lease_connection`); the watcher of every edge's lease is on the main connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from edge.carrier import Carrier
from edge.context import EdgeContext
from edge.lease_connection import LeaseConnection
from edge.protocol.leases import (
    GONE, RUNNING, STOPPING, AfterLostRace, Holder, after_lost_race, judge_holder, renewal_overdue,
)  # fmt: skip
from edge.protocol.plans import adopt_view, edges_gone
from edge.store import Presence
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS, try_another_node
from runtime.service import StartError, keep_running
from schemas.client import CloseCode, DisconnectReason
from schemas.records import EdgeLease
from schemas.subjects import edge_id_of_lease_key, edge_incarnation_subject

log = logging.getLogger("edge")


class CannotServe(StartError):
    """The edge cannot start, or cannot go on; the message is one line: the cause and what to do."""


class Leases:
    """Takes and renews this edge's lease; keeps `ctx.live_edges` current."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        self.revision = 0  # of our lease's last write
        self.dropping = asyncio.Event()  # set by the shutdown once the slots are released
        # The incarnations this process has been, each answering on its subject until the
        # next one holds the lease.
        self._incarnations: dict[str, Any] = {}
        self._watcher: Any = None
        # One storage call's bound (its reply timeout, and a second for the publish).
        self._attempt_s = ctx.settings.jetstream_timeout_ms / 1000 + 1
        # The lease's own reads and writes (not the watcher: it is restarted with the main
        # connection's reconnects): never behind the main connection's traffic.
        self.connection = LeaseConnection(ctx.settings)

    async def take(self) -> None:
        """Take this edge id's lease for this incarnation: at start, and when starting over.

        A lease another incarnation holds is taken only once that one is known to be gone
        (`judge_holder`). Every write is a compare-and-set on what was read: of two
        processes starting at once, one takes the lease and the other finds it held.
        """
        ctx = self.ctx
        edge_id, ttl_s = ctx.settings.edge_id, ctx.settings.edge_lease_ttl_ms / 1000
        await self._answer_as_incarnation(ctx.boot_id)
        waited_for: tuple[str, int] | None = None  # (boot id, revision) of a silent holder waited for
        lost_races = 0
        while True:
            holder, revision = await (await self._presence()).read_lease(edge_id)
            if holder is not None and holder.boot_id not in self._incarnations:
                answer = await self._ask_incarnation(holder.boot_id)
                renewed = waited_for is not None and waited_for[0] == holder.boot_id and waited_for[1] != revision
                verdict = judge_holder(answer, renewed)
                if verdict is Holder.REFUSE:
                    raise await self._id_in_use(holder.boot_id)
                if verdict is Holder.WAIT:
                    if waited_for is None or waited_for[0] != holder.boot_id:
                        log.warning(
                            "edge %s: its incarnation %s holds the lease and %s; waiting for the lease "
                            "to go (up to %.0fs)", edge_id, holder.boot_id,
                            "is stopping" if answer == STOPPING else "does not answer", ttl_s,
                        )  # fmt: skip
                    if answer != STOPPING:
                        waited_for = (holder.boot_id, revision)
                    await asyncio.sleep(min(1.0, ttl_s / 5))
                    continue
                log.warning(
                    "edge %s: its incarnation %s holds the lease but is gone from NATS (crashed?); "
                    "taking the lease over", edge_id, holder.boot_id,
                )  # fmt: skip
            lease = EdgeLease(edge_id=edge_id, boot_id=ctx.boot_id, started_at=now_ms())
            try:  # a compare-and-set on what was read (revision 0: nothing there)
                self.revision = await (await self._presence()).renew_lease(lease, ttl_s, revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                # Taken, renewed or gone meanwhile: look again; at once the first time, then
                # paced (reads answered from behind would make every attempt lose).
                lost_races += 1
                if lost_races > 1:
                    await asyncio.sleep(min(1.0, ttl_s / 5))
                continue
            break
        ctx.live_edges[edge_id] = ctx.boot_id
        for boot_id in [b for b in self._incarnations if b != ctx.boot_id]:
            with contextlib.suppress(nats.errors.Error):
                await self._incarnations.pop(boot_id).unsubscribe()

    async def _answer_as_incarnation(self, boot_id: str) -> None:
        """Answer on incarnation `boot_id`'s subject from now on; the server has it on return."""
        if boot_id in self._incarnations:
            return
        ctx = self.ctx

        async def answer(msg: Msg) -> None:
            if msg.reply:
                with contextlib.suppress(nats.errors.Error):
                    await msg.respond(STOPPING if ctx.stopping.is_set() else RUNNING)

        self._incarnations[boot_id] = await ctx.nc.subscribe(
            edge_incarnation_subject(ctx.settings.edge_id, boot_id), cb=answer
        )
        await ctx.nc.flush()

    async def _ask_incarnation(self, boot_id: str) -> bytes | None:
        """What incarnation `boot_id` of our edge id answers: RUNNING, STOPPING; None if it
        does not answer in time; GONE if nobody subscribes for it."""
        ctx = self.ctx
        try:
            subject = edge_incarnation_subject(ctx.settings.edge_id, boot_id)
        except ValueError:
            return GONE  # not a boot id any edge makes: no process answers to it
        try:
            return (await ctx.nc.request(subject, b"", timeout=ctx.settings.incarnation_probe_timeout_ms / 1000)).data
        except nats.errors.NoRespondersError:
            return GONE
        except nats.errors.TimeoutError:
            return None

    async def _id_in_use(self, holder: str) -> CannotServe:
        """Why this process cannot serve its edge id; a serving edge first closes its sockets
        (1001: they reconnect elsewhere; their peers were told `timeout` when the lease changed)."""
        edge_id = self.ctx.settings.edge_id
        if not self.ctx.accepted:
            line = (
                f"edge id {edge_id} is in use by a running edge (its incarnation {holder} holds the lease "
                f"and answers); give this edge its own --edge-id / RELAY_EDGE_ID, or stop the other first"
            )
        else:  # logged: this ends a serving edge
            line = (
                f"edge id {edge_id} was taken by another running edge (incarnation {holder}) while this one "
                f"could not renew its lease; this process stops (give each edge its own --edge-id / RELAY_EDGE_ID)"
            )
            log.error("%s", line)
            await self.carrier.close_all(CloseCode.GOING_AWAY, "relay edge stopping", DisconnectReason.TIMEOUT)
        return CannotServe(line)

    async def renew_loop(self) -> None:
        """Renew our lease every third of its TTL, until the shutdown drops it.

        A renewal that fails (NATS slow or away, or this event loop too busy to read the
        answer in time) is retried within a second, not a third of the TTL later; one that
        lost its compare-and-set is judged by `after_lost_race`. Renewed through the
        shutdown too, until it drops the lease: releasing the slots may outlast the lease,
        and then other edges would tell our peers `timeout`.
        """
        ctx = self.ctx
        interval = ctx.settings.edge_lease_renew_interval_s
        retry = min(1.0, interval / 5)
        lease_ttl = ctx.settings.edge_lease_ttl_ms / 1000
        lost = False
        delay = interval
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()  # of the last renewal storage confirmed (`take` just did)
        moved_at = renewed_at  # when the connection was last sent to another node
        renewing_again = False  # the last renewal lost its race to one of our own
        while True:
            due = loop.time() + delay
            if await ctx.sleep(delay, until=self.dropping):
                return
            late = loop.time() - due
            if late > interval / 2:
                log.warning("lease renewal ran %.1fs late: the event loop was busy", late)
            delay = interval
            try:
                if not lost:
                    lease = EdgeLease(edge_id=ctx.settings.edge_id, boot_id=ctx.boot_id, started_at=now_ms())
                    try:
                        # Bounded as a whole: on a connection that died without a word, the
                        # publish itself waits for a buffer nobody reads, past any reply timeout.
                        async with asyncio.timeout(self._attempt_s):
                            self.revision = await (await self._presence()).renew_lease(lease, lease_ttl, self.revision)
                        renewed_at = loop.time()
                        renewing_again = False
                        continue
                    except nats.js.errors.KeyWrongLastSequenceError:
                        step = after_lost_race(await self._still_ours(), ctx.stopping.is_set())
                        if step is AfterLostRace.RENEW_NOW:
                            # Once at once; again and again, storage contradicts itself (reads
                            # answered from behind): no spinning, and a TTL of it is a TTL
                            # without a renewal.
                            if not renewing_again:
                                log.warning("edge %s: a lease renewal landed unseen; renewing again", ctx.settings.edge_id)
                            delay = retry if renewing_again else 0.0
                            renewing_again = True
                            if renewal_overdue(loop.time() - renewed_at, lease_ttl):
                                lost = await self._fence(loop.time() - renewed_at, trust_reads=False)
                                moved_at = loop.time()
                            continue
                        if step is AfterLostRace.STOP:
                            return
                        # Other edges have told our sockets' peers that we are gone. Start over
                        # as a new incarnation, accepting no socket until then (it would belong
                        # to the dead one).
                        log.error("edge %s lost its lease; closing its sockets and starting over", ctx.settings.edge_id)
                        lost = True
                        ctx.counters.leases_lost += 1
                        ctx.ready.clear()
                        moved_at = loop.time()
                await self._reincarnate()
                renewed_at = loop.time()
                lost = False
            except STORAGE_ERRORS as exc:
                ctx.counters.lease_renewals_failed += 1
                log.warning("lease renewal failed (%s); retrying in %.2fs", type(exc).__name__, retry)
                delay = retry
                if ctx.stopping.is_set():
                    continue
                if not lost and renewal_overdue(loop.time() - renewed_at, lease_ttl):
                    lost = await self._fence(loop.time() - renewed_at)
                    if lost:
                        moved_at = loop.time()
                elif lost and renewal_overdue(loop.time() - moved_at, lease_ttl):
                    moved_at = loop.time()  # fenced, and no storage through this node either
                    await self._try_another_node()

    async def _fence(self, unrenewed_s: float, trust_reads: bool = True) -> bool:
        """Renewals have failed for a TTL: unless a read shows the lease still ours (renewals
        landed unseen; not asked when reads have said so all along while every renewal lost),
        close every socket 1001 and refuse new ones until a new incarnation holds a lease.
        True if fenced."""
        ctx = self.ctx
        if trust_reads:
            with contextlib.suppress(*STORAGE_ERRORS):
                async with asyncio.timeout(self._attempt_s):
                    if await self._still_ours():
                        return False
        log.error(
            "edge %s could not renew its lease for %.1fs (its TTL is %.0fs): the other edges take it "
            "for gone; closing its %d sockets 1001 and refusing new ones until it holds a lease again",
            ctx.settings.edge_id, unrenewed_s, ctx.settings.edge_lease_ttl_ms / 1000, len(ctx.connections),
        )  # fmt: skip
        ctx.counters.leases_lost += 1
        ctx.ready.clear()
        # Another node first: the departures' slot releases then go through it.
        await self._try_another_node()
        await self.carrier.close_all(CloseCode.GOING_AWAY, "relay edge lost its storage", DisconnectReason.TIMEOUT)
        return True

    async def _presence(self) -> Presence:
        return await self.connection.presence_beside(self.ctx.nc)

    async def _try_another_node(self) -> None:
        await try_another_node(self.ctx.nc, f"edge {self.ctx.settings.edge_id}", log)

    async def _still_ours(self) -> bool:
        """Whether our lease key still holds this incarnation's lease (then its revision is
        adopted). A lease that expired is never ours again: a new one has a new boot id."""
        lease, revision = await (await self._presence()).read_lease(self.ctx.settings.edge_id)
        if lease is None or lease.boot_id != self.ctx.boot_id:
            return False
        self.revision = revision
        return True

    async def _reincarnate(self) -> None:
        """Take a lease under a new boot id, then close the sockets of every older one."""
        ctx = self.ctx
        ctx.boot_id = secrets.token_hex(8)
        # May find the id taken by a newer process: then this one ends. Its sockets are
        # closed once the new lease is held (they come back at once, and find the edge
        # ready), or, if storage is slow to give one, after an attempt's bound: their
        # peers were told they are gone.
        taking = asyncio.ensure_future(self.take())
        try:
            if not (await asyncio.wait({taking}, timeout=self._attempt_s))[0]:
                await self.carrier.close_all(
                    CloseCode.GOING_AWAY, "relay edge restarting", DisconnectReason.TIMEOUT, unless_boot=ctx.boot_id
                )
            await taking
        finally:
            taking.cancel()  # nothing once it is done; ends it if this is cancelled meanwhile
        if not ctx.stopping.is_set():
            ctx.ready.set()
        # 1001 makes clients reconnect at once; their peers already heard `timeout`.
        await self.carrier.close_all(
            CloseCode.GOING_AWAY, "relay edge restarting", DisconnectReason.TIMEOUT, unless_boot=ctx.boot_id
        )

    async def drop(self) -> None:
        """At shutdown, once the slots are released: stop renewing, and drop the lease if it
        is still this incarnation's."""
        self.dropping.set()
        with contextlib.suppress(Exception):
            await self.ctx.nc.flush(timeout=2)
            await (await self._presence()).drop_lease(self.ctx.settings.edge_id, self.ctx.boot_id)
        await self.connection.close()

    async def watch(self, watching: asyncio.Event) -> None:
        """Keep `live_edges` current and tell our sockets when their peer's edge dies.

        Each (re)start of the watcher rebuilds the whole view from the current leases, so
        an edge that died while we were not watching (its expiry marker long gone) is
        noticed too. The watcher is restarted after every NATS reconnect (`restart_watch`).
        """
        ctx = self.ctx

        async def watch_once() -> None:
            self._watcher = watcher = await ctx.presence.watch_leases()
            fresh: dict[str, str] | None = {}  # the initial view, until it is complete
            async for entry in watcher:
                if entry is None:  # the initial values are all in
                    self._set_live_edges(fresh or {})
                    fresh = None
                    watching.set()
                    continue
                edge_id, lease = edge_id_of_lease_key(entry.key), Presence.decode_lease(entry)
                view = dict(ctx.live_edges) if fresh is None else fresh
                if lease is None:
                    view.pop(edge_id, None)
                else:
                    view[edge_id] = lease.boot_id
                if fresh is None:
                    self._set_live_edges(view)

        await keep_running("lease watcher", watch_once, ctx.stopping)

    def restart_watch(self) -> None:
        """Leases may have come and gone unseen (a NATS reconnect): rebuild the view from scratch."""
        if self._watcher is not None:
            self.ctx.spawn(self._watcher.stop(), "restart the lease watcher")

    def _set_live_edges(self, view: dict[str, str]) -> None:
        """Adopt `view` (edge_id → boot_id of live leases); the incarnations it lost are dead."""
        ctx = self.ctx
        own = ctx.settings.edge_id
        adopted = adopt_view(ctx.live_edges, view, ctx.gone_incarnations)
        for edge_id in (e for e in view if adopted.get(e) != view[e] and e != own):
            log.warning("edge %s: its lease read as incarnation %s, gone already (a stale read); ignored", edge_id, view[edge_id])
        view = {**adopted, own: ctx.live_edges.get(own, ctx.boot_id)}  # our own lease is the renewal loop's business
        for edge_id, boot_id in edges_gone(ctx.live_edges, view):
            log.warning("edge %s (%s) is gone; telling the peers of its sockets", edge_id, boot_id)
            ctx.note_gone(edge_id, boot_id)
            for conn in list(ctx.connections.values()):
                if conn.session.depends_on_edge(edge_id, boot_id):
                    ctx.spawn(
                        self.carrier.decide_in_order(conn, functools.partial(conn.session.edge_died, edge_id, boot_id)),
                        "tell a socket its peer's edge died",
                    )
        ctx.live_edges = view
