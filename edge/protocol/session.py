"""One client socket's protocol state. No I/O: frames and events in, actions out.

The edge feeds a `Session` what its socket sends (`receive`), what the room logic
decided (`apply`), and the control events other edges address to it (`receive_event`),
then carries out the returned actions in order. Where the socket stands in its room is
one `SocketState`, changed only by the transitions in `_TRANSITIONS`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from edge.protocol.actions import Action, Close, Forward, Notify, RoomRequest, Send, Undelivered
from edge.protocol.limits import TokenBucket
from edge.protocol.rooms import Outcome
from schemas.client import (
    CloseCode,
    DisconnectReason,
    Error,
    ErrorCode,
    Heartbeat,
    HeartbeatAck,
    JoinRoom,
    PeerDisconnected,
    PeerJoined,
    RegisterRoom,
    Relay,
    RelayBatch,
    client_decoder,
    encode,
)
from schemas.edge_events import EdgeEvent, PeerJoinedEvent, PeerLeftEvent, ReplacedEvent
from schemas.records import SlotHolder


@dataclass(frozen=True)
class _EdgeDied:
    """An edge death held back while a room request is in flight."""

    edge_id: str
    boot_id: str

ROLE_OF_REQUEST = {RegisterRoom: "mac", JoinRoom: "ios"}


class SocketState(enum.Enum):
    """Where a socket stands in its room; one at a time, as in h11's `_state.py`."""

    OUTSIDE = "outside"  # no request of its has been accepted
    UNCERTAIN = "uncertain"  # a request may have won a slot without the socket learning it
    IN_ROOM = "in_room"  # it holds its role's slot
    REPLACED = "replaced"  # another device took its slot; it is being closed 4001


_TRANSITIONS: dict[SocketState, frozenset[SocketState]] = {
    SocketState.OUTSIDE: frozenset({SocketState.UNCERTAIN, SocketState.IN_ROOM, SocketState.REPLACED}),
    SocketState.UNCERTAIN: frozenset({SocketState.IN_ROOM, SocketState.REPLACED}),
    SocketState.IN_ROOM: frozenset({SocketState.REPLACED}),
    SocketState.REPLACED: frozenset(),
}


def other_role(role: str) -> str:
    return "ios" if role == "mac" else "mac"


def _forward(msg: Relay | RelayBatch, to: SlotHolder) -> Forward:
    # Re-serialised: the peer gets only `type` and the payload fields.
    return Forward(encode(msg), to, len(msg.payloads) if type(msg) is RelayBatch else 1)


def _error(code: str, message: str) -> Send:
    return Send(encode(Error(code=code, message=message)))


@dataclass(eq=False, slots=True)
class Session:
    """A socket's place in the protocol: its room and role, whether it is in the room, its peer."""

    room_id: str
    role: str | None  # None until the first register/join reveals it (§12 item 1)
    socket_id: str
    edge_id: str
    boot_id: str
    user_id: str
    last_message_at: float  # monotonic seconds
    state: SocketState = SocketState.OUTSIDE
    peer: SlotHolder | None = None
    # Why the socket ends, as its peer will hear it (`peer_disconnected.reason`).
    leave_reason: str = DisconnectReason.CLIENT_LEFT
    # The room's owner, once in the room: heartbeat acks say whether this socket's account matches.
    owner_user_id: str | None = None
    # Inbound message rate (§12 item 6); None: unlimited.
    rate: TokenBucket | None = None
    _busy: bool = False  # a room request is in flight
    _held_events: list[tuple[EdgeEvent | Undelivered | _EdgeDied, str]] = field(default_factory=list)
    _peer_revision: int = 0  # room revision of the peer the client was last told of

    @property
    def busy(self) -> bool:
        """A register or join of this socket's is in flight: what comes from NATS for it
        waits for the decision (a frame from the peer it will name would look a stranger's)."""
        return self._busy

    @property
    def in_room(self) -> bool:
        return self.state is SocketState.IN_ROOM

    @property
    def replaced(self) -> bool:
        return self.state is SocketState.REPLACED

    def _enter(self, state: SocketState) -> None:
        if state is not self.state:
            if state not in _TRANSITIONS[self.state]:
                raise AssertionError(f"socket {self.socket_id}: no transition from {self.state.value} to {state.value}")
            self.state = state

    def may_hold_a_slot(self) -> None:
        """A request's write may have won the slot (it did, and what follows may fail, or it
        failed unanswered): the slot is released when the socket goes, as if accepted."""
        if self.state is SocketState.OUTSIDE:
            self._enter(SocketState.UNCERTAIN)

    @property
    def holder(self) -> SlotHolder:
        return SlotHolder(socket_id=self.socket_id, edge_id=self.edge_id, boot_id=self.boot_id, user_id=self.user_id)

    @property
    def peer_role(self) -> str:
        assert self.role is not None
        return other_role(self.role)

    # --- from the client ---------------------------------------------------------

    def receive(self, data: bytes | str, now: float) -> list[Action]:
        """A frame from the client. Any frame, even a bad one, counts as a sign of life."""
        self.last_message_at = now
        if self.rate is not None and not self.rate.take(now):
            # Sustained excess only: the bucket allows the Mac's bursts many times over.
            self.leave_reason = DisconnectReason.CLIENT_LEFT
            farewell = encode(Error(code=ErrorCode.RATE_LIMITED, message="Too many messages; slow down"))
            return [Close(CloseCode.POLICY, "rate limit exceeded", farewell=farewell)]
        try:
            msg = client_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return [_error(ErrorCode.BAD_MESSAGE, f"Invalid message: {exc}")]
        except RecursionError:  # msgspec's answer to JSON nested past its depth limit
            return [_error(ErrorCode.BAD_MESSAGE, "Invalid message: nested too deeply")]

        if isinstance(msg, (Relay, RelayBatch)):
            if not self.in_room:
                return [_error(ErrorCode.NOT_IN_ROOM, "Register or join the room first")]
            if self.peer is None:
                return [_error(ErrorCode.NO_PEER, "Peer not connected")]
            return [_forward(msg, self.peer)]

        if isinstance(msg, Heartbeat):
            return [Send(self._heartbeat_ack())]

        wanted = ROLE_OF_REQUEST[type(msg)]
        actions: list[Action] = []
        if self.role is None:
            self.role = wanted
        elif self.role != wanted:
            return [_error(ErrorCode.BAD_ROLE, f"{msg.__struct_config__.tag} is for the {wanted} role, this socket is {self.role}")]
        if msg.room_id != self.room_id:
            return actions + [_error(ErrorCode.BAD_MESSAGE, "room_id differs from the connection's room_id")]
        self._busy = True
        actions.append(RoomRequest(msg))
        return actions

    def take_now(self, data: bytes | str, now: float, can_answer_now: Callable[[], bool]) -> Forward | Send | None:
        """The frame as `receive` would take it when that is only a `Forward` (a relay for
        a present peer) or a `Send` (a heartbeat's answer, when `can_answer_now()`), else
        None and nothing changed: then `receive` decides (errors, control messages, limits).

        The edge's fast path, for a frame that arrives while nothing else of this socket's
        is being decided. Heartbeats are most of what clients send besides relays (the Mac
        every second while active, the iPhone every 3 s, §5).
        """
        if self._busy:
            return None
        try:
            msg = client_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
            return None  # `receive` answers (msgspec checks UTF-8 in bytes itself, and says so with DecodeError)
        kind = type(msg)
        if kind is Relay or kind is RelayBatch:
            if not self.in_room or self.peer is None:
                return None
        elif kind is not Heartbeat or not can_answer_now():
            return None
        if self.rate is not None and not self.rate.take(now):
            return None  # `receive` spends another token, finds none, and says so
        self.last_message_at = now
        if kind is Heartbeat:
            return Send(self._heartbeat_ack())
        return _forward(msg, self.peer)

    def _heartbeat_ack(self) -> bytes:
        return encode(HeartbeatAck(mac_connected=self._mac_connected(), account_match=self._account_match()))

    def _mac_connected(self) -> bool:
        if self.role == "mac":
            return self.in_room
        return self.in_room and self.peer is not None

    def _account_match(self) -> str | None:
        """`match` or `mismatch` (§12 item 15): whether the iPhone and the Mac use one account."""
        if not self.in_room or self.owner_user_id is None:
            return None
        # The Mac is always the owner (a register by anyone else is refused): it learns of
        # a mismatch through its peer; the iPhone compares itself with the owner.
        other = self.peer.user_id if self.role == "mac" and self.peer is not None else self.owner_user_id
        return "match" if other == self.user_id else "mismatch"

    def account_deleted(self) -> list[Action]:
        """This socket's account was deleted (§12 item 16): a last ack saying so, then close."""
        if self.replaced:
            return []
        farewell = encode(HeartbeatAck(mac_connected=self._mac_connected(), account_deleted=True))
        return [Close(CloseCode.POLICY, "account deleted", farewell=farewell)]

    def quota_exceeded(self, farewell: bytes) -> list[Action]:
        """This socket's user is past the quota (§3.3.8, §12 item 20): `quota_exceeded`, then close 1000."""
        if self.replaced:
            return []
        return [Close(CloseCode.NORMAL, "quota exceeded", farewell=farewell)]

    @property
    def in_session(self) -> bool:
        """Whether this is a Mac socket whose iPhone is connected: session time (§12 item 19)."""
        return self.role == "mac" and self.in_room and self.peer is not None and not self.replaced

    # --- from the room logic -----------------------------------------------------

    def apply(self, outcome: Outcome, revision: int = 0, notice: Send | None = None) -> list[Action]:
        """The room logic's decision on this session's request, written at room `revision`;
        `notice` (an `ACCOUNT_MISMATCH` error) goes to the client right after the replies."""
        self._busy = False
        if outcome.accepted and not self.replaced:
            self._enter(SocketState.IN_ROOM)
            self.peer = outcome.peer
            self.owner_user_id = outcome.owner_user_id
            if any(isinstance(reply, PeerJoined) for reply in outcome.replies):
                self._peer_revision = revision  # the client now knows the peer as of this revision
        actions: list[Action] = [Send(encode(reply)) for reply in outcome.replies]
        if notice is not None:
            actions.append(notice)
        if outcome.notify_peer is not None and outcome.peer is not None:
            event = msgspec.structs.replace(outcome.notify_peer, revision=revision)
            actions.append(Notify(outcome.peer, self.peer_role, event))
        if outcome.evict is not None:
            actions.append(Notify(outcome.evict, self.role or "", ReplacedEvent(by_socket_id=self.socket_id)))
        if outcome.close is not None:
            actions.append(Close(*outcome.close))
        return actions + self._release_held_events()

    def request_failed(self) -> list[Action]:
        """The room request could not be carried out (storage unavailable): the client retries."""
        self._busy = False
        self.may_hold_a_slot()
        return [Close(CloseCode.INTERNAL, "Internal error")] + self._release_held_events()

    def request_abandoned(self) -> list[Action]:
        """The socket's close began while its room request waited for storage: nothing more
        is tried (a retry landing now would take the slot from the client's newer socket,
        4001). A write may have landed already: the slot is released when the socket goes."""
        self._busy = False
        self.may_hold_a_slot()
        self._held_events.clear()  # nobody to tell
        return []

    def too_busy(self) -> list[Action]:
        """The edge had no place for the room request in time (storage saturated, issue 18):
        nothing was tried, so nothing is held; the client retries after its back-off."""
        self._busy = False
        return [Close(CloseCode.TRY_AGAIN_LATER, "relay busy; try again later")] + self._release_held_events()

    def _release_held_events(self) -> list[Action]:
        held, self._held_events = self._held_events, []
        actions: list[Action] = []
        for event, sender in held:
            if isinstance(event, _EdgeDied):
                actions += self.edge_died(event.edge_id, event.boot_id)
            else:
                actions += self.receive_event(event, sender)
        return actions

    # --- from other edges --------------------------------------------------------

    def receive_event(self, event: EdgeEvent | Undelivered, sender: str) -> list[Action]:
        """A control event addressed to this socket by the edge of `sender` (or news that a
        frame of ours reached nobody)."""
        if self._busy:
            # The sender saw our slot before our own request returned; keep the client's
            # order (room_registered before peer_joined) by holding the event until then.
            self._held_events.append((event, sender))
            return []
        if type(event) is Undelivered:
            return self._undelivered(event)
        if isinstance(event, PeerJoinedEvent):
            if not self.in_room:
                return []
            if event.revision and event.revision <= self._peer_revision:
                # Events from different edges are not ordered among themselves: a late one
                # about a peer that has been replaced since must not undo the newer one.
                return []
            self.peer = event.peer
            self._peer_revision = event.revision
            return [Send(encode(PeerJoined(event.public_key, event.session_nonce, event.ephemeral_key)))]
        if isinstance(event, PeerLeftEvent):
            if self.peer is None or self.peer.socket_id != sender:
                return []  # about a peer we no longer have
            self.peer = None
            return [Send(encode(PeerDisconnected(reason=event.reason)))]
        if isinstance(event, ReplacedEvent):
            if self.replaced:
                return []
            self._enter(SocketState.REPLACED)
            self.peer = None
            return [Close(CloseCode.REPLACED, "Replaced by another device")]
        return []

    def _undelivered(self, news: Undelivered) -> list[Action]:
        """A frame we forwarded reached nobody: `NO_PEER` to the client, as for a relay
        without a peer (protocol.md §4.6). If the peer's whole edge is gone, the peer is too:
        the client hears `peer_disconnected` `timeout` first (as it would at the lease's
        expiry, §12 item 13; the send failure of §4.6 [R]) and later frames get `NO_PEER`
        without being forwarded. Nothing about a former peer: the client has a new one."""
        if self.replaced or not self.in_room:
            return []
        peer = self.peer
        if peer is not None and peer.socket_id != news.to_socket_id:
            return []  # frames in flight at a replacement are dropped; the new peer is fine
        no_peer = _error(ErrorCode.NO_PEER, "Peer not connected")
        if peer is not None and news.edge_gone:
            self.peer = None
            return [Send(encode(PeerDisconnected(reason=DisconnectReason.TIMEOUT))), no_peer]
        return [no_peer]

    def accepts_frame_from(self, sender: str) -> bool:
        """Whether a frame from socket `sender` is from this session's current peer."""
        return self.peer is not None and self.peer.socket_id == sender and not self.replaced

    def depends_on_edge(self, edge_id: str, boot_id: str) -> bool:
        """Whether the death of that edge incarnation can matter to this session: its peer
        lives there, or a request in flight may name such a peer."""
        peer = self.peer
        return self._busy or (peer is not None and peer.edge_id == edge_id and peer.boot_id == boot_id)

    def edge_died(self, edge_id: str, boot_id: str) -> list[Action]:
        """An edge incarnation's lease expired; if our peer lived there, it is gone."""
        if self._busy:
            # The request in flight may name that peer: judge after it, in the client's order.
            self._held_events.append((_EdgeDied(edge_id, boot_id), ""))
            return []
        peer = self.peer
        if peer is None or peer.edge_id != edge_id or peer.boot_id != boot_id:
            return []
        self.peer = None
        return [Send(encode(PeerDisconnected(reason=DisconnectReason.TIMEOUT)))]

    # --- its end -----------------------------------------------------------------

    @property
    def releases_slot_on_leave(self) -> bool:
        """Whether the socket's going frees a slot and tells its peer: it held one, or may
        hold one (a request that failed unanswered), and was not replaced (its successor
        holds the slot now)."""
        return self.state in (SocketState.IN_ROOM, SocketState.UNCERTAIN) and self.role is not None

    def left_event(self) -> PeerLeftEvent:
        """What the room's live peer is told when this socket is gone."""
        return PeerLeftEvent(reason=self.leave_reason)

    def too_slow(self) -> list[Action]:
        """What waits for its client passed its bounds: frames for it are being dropped, so
        its session is broken, and to its peer it timed out. Closed 1013."""
        self.leave_reason = DisconnectReason.TIMEOUT
        return [Close(CloseCode.TRY_AGAIN_LATER, "too slow")]

    def dropped_unread(self) -> None:
        """Its outgoing buffer passed its bound (it does not read): dropped without a close,
        and to its peer it timed out, as a slow reader does."""
        self.leave_reason = DisconnectReason.TIMEOUT

    def shed(self) -> None:
        """Its connection closed it 1008 for a flood (pings, pongs or bytes): to its peer it
        left, as for too many messages."""
        self.leave_reason = DisconnectReason.CLIENT_LEFT

    def ends_with(self, leave_reason: str) -> None:
        """The edge closes this socket for its own reason (a restart, a lost lease): its peer hears `leave_reason`."""
        self.leave_reason = leave_reason

    # --- liveness ----------------------------------------------------------------

    def is_silent(self, now: float, threshold_s: float) -> bool:
        return now - self.last_message_at >= threshold_s

    def time_out(self) -> list[Action]:
        """Silence past the dead threshold: the socket is closed 4000, its peer hears `timeout`."""
        self.leave_reason = DisconnectReason.TIMEOUT
        # A farewell, not a plain Send: a dead client never drains its socket, and the
        # close must happen all the same.
        farewell = encode(Error(code=ErrorCode.HEARTBEAT_TIMEOUT, message="No heartbeat received"))
        return [Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", farewell=farewell)]
