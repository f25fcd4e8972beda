"""`register_room` and `join_room` against storage: the room's record by compare-and-set,
the user's room-limit claim, the guessing limits, then the session's decision.

What each step means is decided in `edge.protocol` (`requests`, `rooms`, `guessing`);
this module reads and writes storage around it and hands the outcome to the session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors

from edge.access import Refusal
from edge.admission import Busy
from edge.carrier import Carrier
from edge.connection_log import socket_event
from edge.context import Connection, EdgeContext
from edge.log_budget import WarningBudget
from edge.protocol import guessing, rooms
from edge.protocol.actions import Action, Send
from edge.protocol.requests import (
    RoomRequestContext,
    account_mismatch_error,
    decide_room_request,
    is_account_mismatch,
    needs_room_claim,
    room_limit_close,
)
from edge.slot_liveness import SlotLiveness
from edge.store import StorageConflict
from runtime.backoff import Backoff
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS
from schemas.client import Error, JoinRoom, RegisterRoom
from schemas.records import RoomRecord

log = logging.getLogger("edge")
outage_log = WarningBudget(log)  # one per register or join in an outage


class SocketClosing(Exception):
    """The socket's close began while its room request was in flight: the request stops."""


class RoomRequests:
    """Runs a socket's room requests and keeps its room registration alive."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        s = ctx.settings
        # The retries' budget, a last attempt's timeout, and the writes around them.
        self._bound_s = (s.storage_retry_budget_ms + 3 * s.jetstream_timeout_ms) / 1000

    async def carry_out(self, conn: Connection, message: RegisterRoom | JoinRoom) -> None:
        """Run a register/join against the room's record, then what the session makes of it."""
        ctx, session, decide_in_order = self.ctx, conn.session, self.carrier.decide_in_order
        if not session.in_room:
            # A user locked out for guessing room credentials tries nothing (issue 16 item 7).
            # A socket in its room already has proven itself (a secret rotation goes on).
            wait = ctx.access.room_guesses.user_retry_after(session.user_id, time.monotonic())
            if wait > 0:
                await decide_in_order(conn, functools.partial(session.apply, guessing.locked_out(wait)))
                return
        # Storage is asked at the rate it answers (`edge.admission`): in a storm the rest
        # wait their turn, up to a bound, and are then told to come back later (1013).
        try:
            async with ctx.gates.room_requests.place():
                # Bounded as a whole, past the retries' own budget: a storage call that never
                # returns (seen once after a NATS node was cut off without a word and the
                # connection was made again) would leave the socket waiting for ever.
                async with asyncio.timeout(self._bound_s):
                    await self._against_storage(conn, message)
        except Busy:
            await decide_in_order(conn, session.too_busy)
        except TimeoutError:
            outage_log.warning("request hung", "room %s: request unanswered in %.0fs; closed 1011", session.room_id, self._bound_s)
            await decide_in_order(conn, session.request_failed)

    async def _against_storage(self, conn: Connection, message: RegisterRoom | JoinRoom) -> None:
        ctx, session, decide_in_order = self.ctx, conn.session, self.carrier.decide_in_order
        claimed = False
        if needs_room_claim(message, session.in_room, conn.target.room_settled):
            # Claimed by compare-and-set on the user's claims (issue 16 item 4), so registers
            # at once, on any edges, cannot pass the limit together.
            try:
                claimed = await ctx.access.claim_room(conn.target.principal, session.room_id)
            except Refusal as refusal:
                if refusal.status == 503:
                    await decide_in_order(conn, session.request_failed)
                else:
                    await decide_in_order(conn, functools.partial(room_limit_close, refusal.message))
                return
        try:
            outcome, revision = await self._with_retries(conn, message)
        except SocketClosing:
            if claimed:
                await self._give_back_claim(conn)
            await decide_in_order(conn, session.request_abandoned)
            return
        except (nats.errors.Error, asyncio.TimeoutError, StorageConflict) as exc:
            # No traceback: in a storage outage this is every register and join.
            outage_log.warning("request failed", "room %s: request failed (%s); closed 1011", session.room_id, type(exc).__name__)
            if claimed:
                await self._give_back_claim(conn)
            await decide_in_order(conn, session.request_failed)
            return
        if claimed and not outcome.accepted:
            await self._give_back_claim(conn)  # a refused register holds no place
        if guessing.guessed_wrong(outcome):
            outcome = self._count_wrong_guess(conn, outcome)
        if outcome.notice:
            log.info("room %s: %s", session.room_id, outcome.notice)
        mismatch = None
        if is_account_mismatch(message, outcome, session.user_id):
            # The slot is ours already: should anything below fail, it is released on leave.
            session.may_hold_a_slot()
            mismatch = await self._account_mismatch_error(outcome.owner_user_id, conn)
        if outcome.accepted and isinstance(message, RegisterRoom):
            # Registered before the Mac hears room_registered: a GET /api/rooms it makes
            # next must list the room (and the room limit counts it the sooner).
            if conn.registered_at is None:
                conn.registered_at = now_ms()
            await self.refresh_registration(conn)
        decide: Callable[[], list[Action]] = functools.partial(session.apply, outcome, revision, mismatch)
        await decide_in_order(conn, decide)
        registering = isinstance(message, RegisterRoom)
        if outcome.accepted:
            socket_event(session, "registered" if registering else "joined", peer=outcome.peer.socket_id if outcome.peer else None)
        else:
            socket_event(session, "register_refused" if registering else "join_refused", code=_error_code(outcome))

    def _count_wrong_guess(self, conn: Connection, outcome: rooms.Outcome) -> rooms.Outcome:
        """Count a register/join refused for a wrong secret or pairing token against its user
        and (another account's) room; log a lock-out it starts, once (ids and counts, never
        a secret). Once locked out, the socket that failed is closed too (1008): one socket
        cannot go on guessing (a failed register leaves it open otherwise)."""
        session, s, now = conn.session, self.ctx.settings, time.monotonic()
        guesses, owner = self.ctx.access.room_guesses, outcome.owner_user_id
        for started in guesses.failed(session.room_id, owner, session.user_id, now):
            what = f"user {session.user_id}" if started == guessing.USER else f"room {session.room_id} (from other accounts than its owner's)"
            log.warning(
                "%s: %d failed room authentications (wrong secret or pairing token) within %d s on this edge; "
                "further joins and registers refused (RATE_LIMITED, close 1008) until they age out",
                what, s.room_auth_failure_limit, s.room_auth_failure_window_s,
            )
        if guesses.user_retry_after(session.user_id, now) > 0 or guesses.room_retry_after(session.room_id, owner, session.user_id, now) > 0:
            return guessing.with_lock_out_close(outcome)
        return outcome

    async def _give_back_claim(self, conn: Connection) -> None:
        """Free the room-limit claim a register took and did not use (best effort: a claim
        left behind lapses with ROOM_REG_TTL)."""
        try:
            await self.ctx.access.release_room(conn.session.user_id, conn.session.room_id)
        except STORAGE_ERRORS as exc:
            log.warning("room %s: its room-limit claim not given back (%s); it lapses by itself", conn.session.room_id, exc)

    async def _account_mismatch_error(self, owner_user_id: str | None, conn: Connection) -> Send:
        """`error ACCOUNT_MISMATCH` for an iPhone of another account than the Mac's (§12 item 15)."""
        ios_user = conn.target.principal.user
        mac_email, ios_email = None, ios_user.email if ios_user is not None else None
        try:
            owner = await self.ctx.access.store.get_user(owner_user_id) if owner_user_id else None
            mac_email = owner.email if owner is not None else None
        except Exception as exc:  # the flag matters more than the addresses in it
            log.warning("room owner %s: e-mail not read (%s)", owner_user_id, type(exc).__name__)
        return account_mismatch_error(mac_email, ios_email)

    @staticmethod
    def holds_registered_room(conn: Connection) -> bool:
        session = conn.session
        return session.role == "mac" and session.in_room and not session.replaced and not conn.closing

    async def refresh_registration(self, conn: Connection) -> None:
        """Keep a registered Mac's room registration alive (ROOM_REG_TTL); a failure is retried by the loop."""
        try:
            await self.ctx.access.register_room(conn.target.principal, conn.session.room_id, conn.registered_at)
        except STORAGE_ERRORS as exc:
            log.warning("room %s: registration not written (%s); the refresh loop retries", conn.session.room_id, exc)

    async def _with_retries(self, conn: Connection, message: RegisterRoom | JoinRoom) -> tuple[rooms.Outcome, int]:
        """A room request, retried through brief storage trouble (a leader election) for up to
        `storage_retry_budget_ms`, inside the Mac's 10 s register timer. Failing costs more
        than waiting: the client reconnects, and a rotation that never landed would turn
        into an AUTH_FAILED on its next register."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.storage_retry_budget_ms / 1000
        backoff = Backoff(0.1, 1.0)
        while True:
            if conn.closing:
                raise SocketClosing()
            try:
                return await self._once(conn, message)
            except (nats.errors.TimeoutError, asyncio.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                wait = backoff.next()
                if loop.time() + wait >= deadline:
                    raise
                outage_log.warning("request retried", "room %s: storage did not answer (%s); retrying", conn.session.room_id, type(exc).__name__)
                await asyncio.sleep(wait)

    async def _once(self, conn: Connection, message: RegisterRoom | JoinRoom) -> tuple[rooms.Outcome, int]:
        ctx, session = self.ctx, conn.session
        s, now = ctx.settings, now_ms()
        alive = SlotLiveness(ctx)
        request = RoomRequestContext(
            message=message,
            holder=session.holder,
            user_id=session.user_id,
            now_ms=now,
            now_s=time.monotonic(),
            is_alive=alive,
            room_idle_timeout_ms=s.room_idle_timeout_ms,
            max_sessions=conn.target.principal.tier.max_sessions,
            registered_before=session.in_room,
            refuse_cross_account=s.refuse_cross_account,
            guesses=ctx.access.room_guesses,
        )

        def decide(stored: RoomRecord | None, seen: tuple[int | None, ...]) -> tuple[RoomRecord | None, rooms.Outcome]:
            if conn.closing:  # closed while storage was read: write nothing
                raise SocketClosing()
            return decide_room_request(stored, seen, request)

        return await ctx.rooms.transact(session.room_id, decide, self._before_deciding(now, alive))

    def _before_deciding(self, now: int, alive: SlotLiveness) -> Callable[[RoomRecord], Awaitable[tuple[int | None, ...]]]:
        """What the decision needs from storage besides the record: the leases of slot
        holders the lease view does not know, and lastSeen if the room looks idle."""
        ctx = self.ctx

        async def before_deciding(record: RoomRecord) -> tuple[int | None, ...]:
            await alive.learn(record)
            # lastSeen only matters to a room that looks idle by its record alone.
            if rooms.expire_idle(record, now, ctx.settings.room_idle_timeout_ms, alive) is record:
                return ()
            return await ctx.presence.get_room_last_seen(record.room_id)

        return before_deciding


def _error_code(outcome: rooms.Outcome) -> str | None:
    """The error code a refused register or join answered (None if it only closed)."""
    return next((reply.code for reply in outcome.replies if isinstance(reply, Error)), None)
