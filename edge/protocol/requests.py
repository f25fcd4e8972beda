"""What a `register_room` or `join_room` does, from the room's stored record to the outcome. No I/O.

The edge runs `decide_room_request` inside a compare-and-set on the room's record (again on
every lost race), so it depends on nothing but its arguments. The rules around it, which
the asyncio side only carries out: when the room limit is looked at again at the first
register, and when an iPhone of another account is told `ACCOUNT_MISMATCH`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edge.protocol import guessing, rooms
from edge.protocol.actions import Close, Send
from edge.protocol.guessing import RoomGuessGuard
from schemas.client import CloseCode, Error, ErrorCode, JoinRoom, RegisterRoom, encode
from schemas.records import RoomRecord, SlotHolder


@dataclass(frozen=True)
class RoomRequestContext:
    """Everything `decide_room_request` reads besides the record: taken once per request."""

    message: RegisterRoom | JoinRoom
    holder: SlotHolder  # the acting socket
    user_id: str
    now_ms: int
    now_s: float  # monotonic, for the guessing limits
    is_alive: rooms.IsAlive
    room_idle_timeout_ms: int
    max_sessions: int | None
    registered_before: bool  # this socket was in its room already (a secret rotation)
    refuse_cross_account: bool
    guesses: RoomGuessGuard


def decide_room_request(
    stored: RoomRecord | None, seen: tuple[int | None, ...], request: RoomRequestContext
) -> tuple[RoomRecord | None, rooms.Outcome]:
    """(the record to write, or None for none; the outcome) for `request` on `stored`, with
    `seen` the room's lastSeen values (empty unless the room looked idle by its record)."""
    record = stored
    if stored is not None:
        record = rooms.expire_idle(stored, request.now_ms, request.room_idle_timeout_ms, request.is_alive, seen)
        # Another account's guesses on this room are locked out (issue 16 item 7).
        if not request.registered_before:
            wait = request.guesses.room_retry_after(record.room_id, record.owner_user_id, request.user_id, request.now_s)
            if wait > 0:
                return (None if record is stored else record), guessing.locked_out(wait)
    message = request.message
    if isinstance(message, RegisterRoom):
        outcome = rooms.register(
            record, message, request.holder, request.now_ms, request.is_alive, request.max_sessions, request.registered_before
        )
    else:
        outcome = rooms.join(record, message, request.holder, request.now_ms, request.is_alive, request.refuse_cross_account)
    if record is not None and guessing.guessed_wrong(outcome):
        outcome = dataclasses.replace(outcome, owner_user_id=record.owner_user_id)  # whom it was guessed on
    if outcome.record is None and record is not stored:
        return record, outcome  # a refused request still stores the idle cleanup it saw
    return outcome.record, outcome


def needs_room_claim(message: RegisterRoom | JoinRoom, in_room: bool, room_settled: bool) -> bool:
    """Whether this request must claim its room under the user's room limit first.

    The limit holds at the first register, not only at the upgrade: sockets opened side by
    side all passed the upgrade's count before any of them registered (and a socket
    without `role` was not checked there at all). A room found registered at the upgrade
    (a reconnection), or a tier without a limit, needs no second look.
    """
    return isinstance(message, RegisterRoom) and not in_room and not room_settled


def room_limit_close(message: str) -> list[Close]:
    """What a register refused for the room limit gets: `error ROOM_LIMIT`, close 1008 (the
    Mac reconnects and meets the upgrade's 403)."""
    farewell = encode(Error(code=ErrorCode.ROOM_LIMIT, message=message))
    return [Close(CloseCode.POLICY, "room limit reached", farewell)]


def is_account_mismatch(message: RegisterRoom | JoinRoom, outcome: rooms.Outcome, user_id: str) -> bool:
    """Whether an accepted join comes from another account than the room owner's (§12 item 15)."""
    return outcome.accepted and isinstance(message, JoinRoom) and outcome.owner_user_id != user_id


def account_mismatch_error(mac_email: str | None, ios_email: str | None) -> Send:
    """`error ACCOUNT_MISMATCH`, naming both accounts' addresses where they are known."""
    return Send(
        encode(
            Error(
                code=ErrorCode.ACCOUNT_MISMATCH,
                message="This iPhone and the Mac are signed in to different accounts",
                mac_email=mac_email,
                ios_email=ios_email,
            )
        )
    )
