"""What edges keep in JetStream KV. Every change of a `RoomRecord` is a compare-and-set."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

Role = Literal["mac", "ios"]


class SlotHolder(Struct, frozen=True, kw_only=True):
    """The socket that holds one role's slot of a room, and where it lives.

    A holder counts as connected only while the lease of its edge incarnation
    (`edge_id` + `boot_id`) is alive: an edge that dies without a word loses its
    slots when its lease expires.
    """

    socket_id: str
    edge_id: str
    boot_id: str
    user_id: str


class RoomRecord(Struct, kw_only=True):
    """A room's durable state: identity (kept forever) and per-connection state (dropped when idle)."""

    room_id: str
    owner_user_id: str
    secret_hash: str
    mac_public_key: str
    created_at: int  # epoch ms
    last_activity_at: int  # epoch ms of the last change of this record
    mac_session_nonce: str = ""
    mac_ephemeral_key: str = ""
    ios_public_key: str = ""
    ios_session_nonce: str = ""
    ios_ephemeral_key: str = ""
    pairing_token_hash: str = ""
    pairing_token_used: bool = False
    pairing_token_expires_at: int | None = None  # unix seconds, as the Mac sends it
    mac: SlotHolder | None = None
    ios: SlotHolder | None = None


class EdgeLease(Struct, kw_only=True):
    """One edge incarnation's presence; it lives only while the edge renews it."""

    edge_id: str
    boot_id: str
    started_at: int  # epoch ms


room_record_decoder = msgspec.json.Decoder(RoomRecord)
edge_lease_decoder = msgspec.json.Decoder(EdgeLease)


# --- accounts ----------------------------------------------------------------------


class WelcomeBonus(Struct, frozen=True, kw_only=True):
    """Credits granted once, when the account is created, used before the window quota (§6.5)."""

    credits: int
    created_at: int  # epoch ms; a usage counter for another grant's created_at is stale
    expires_at: int  # epoch ms


class User(Struct, kw_only=True):
    """An account. Deleted accounts are kept (flagged) so that their keys answer 410, not 401."""

    user_id: str
    email: str
    tier: str
    created_at: int  # epoch ms
    name: str = ""
    deleted: bool = False
    deleted_at: int | None = None
    credits_per_window: int | None = None  # per-user override of the tier's limit
    welcome_bonus: WelcomeBonus | None = None


class ApiKeyRecord(Struct, kw_only=True):
    """An API key, stored under the SHA-256 of the key; the key itself is never stored."""

    user_id: str
    key_hash: str
    created_at: int  # epoch ms
    expires_at: int  # epoch ms; slides forward while the key is used
    refresh_hash: str = ""  # the refresh token issued with this key (revoked with it)


class RefreshTokenRecord(Struct, kw_only=True):
    """A refresh token, stored under its SHA-256. Using it rotates it and its API key."""

    user_id: str
    token_hash: str
    api_key_hash: str
    created_at: int  # epoch ms
    expires_at: int  # epoch ms
    # Set once used: a retry within the grace may use it again, replacing its successor
    # (the successor API key; revoking it revokes the refresh token issued with it).
    rotated_at: int | None = None
    successor_key_hash: str = ""


class Registration(Struct, kw_only=True):
    """A user's registration of a room; it counts against the tier's `max_rooms` while it lives."""

    user_id: str
    room_id: str
    created_at: int  # epoch ms
    last_seen: int  # epoch ms of the last refresh
    # epoch ms; past it the registration reads as absent even if the store still has it
    # (0: written before this field existed)
    expires_at: int = 0


class RoomClaims(Struct, kw_only=True):
    """The rooms a user holds against his tier's `max_rooms` (key `<user>` in
    relay_registrations), each with its expiry, epoch ms (that of its registration).
    Changed only by compare-and-set: registers at once cannot pass the limit
    (`accounts.claims`). Entries past their expiry count for nothing."""

    user_id: str
    rooms: dict[str, int] = {}


# --- usage (written by metering) ----------------------------------------------------


class UsageWindow(Struct, kw_only=True):
    """A user's credits in one 5-hour window (protocol.md §6.1, §6.2).

    `message_tokens`, `duration_tokens` and `total_tokens` count against the window's
    limit; credits the welcome bonus covered are in `bonus_tokens` and not in those.
    """

    user_id: str
    period: str  # "5h-N"
    message_tokens: int = 0
    duration_tokens: int = 0
    total_tokens: int = 0
    bonus_tokens: int = 0
    last_updated: int = 0  # epoch ms


class BonusUsage(Struct, kw_only=True):
    """Welcome-bonus credits used, for the grant created at `grant_created_at`."""

    used: int = 0
    grant_created_at: int = 0


class UsageLedger(Struct, kw_only=True):
    """Everything metering knows of one user's usage, in one record (`usage.<user>`).

    One record, so that applying usage to a user is one compare-and-set: the bonus and
    the windows change together or not at all. A high-water mark per consumer of the
    usage stream, its sequence of the last batch applied: a batch redelivered after a
    crash (applied, not acknowledged) has a sequence at or below it and is skipped.
    `applied_seq` is that of batches from edges before partitions (consumer `metering`);
    `partitions` those of the partition consumers (`metering-p07` → 1234), each applied in
    stream order by one process.
    """

    user_id: str
    applied_seq: int = 0
    partitions: dict[str, int] = {}
    windows: list[UsageWindow] = []  # oldest first; windows older than USAGE_TTL are dropped
    bonus: BonusUsage = msgspec.field(default_factory=BonusUsage)


class MeteringMember(Struct, kw_only=True):
    """A running metering process (`member.<id>`), alive while it renews it."""

    member_id: str
    process: str  # host:pid, as the status page shows it
    started_at: int  # epoch ms


class PartitionClaim(Struct, kw_only=True):
    """The metering process that owns a usage partition (`partition.<NN>`), while it renews it."""

    member_id: str


user_decoder = msgspec.json.Decoder(User)
api_key_record_decoder = msgspec.json.Decoder(ApiKeyRecord)
refresh_token_record_decoder = msgspec.json.Decoder(RefreshTokenRecord)
registration_decoder = msgspec.json.Decoder(Registration)
room_claims_decoder = msgspec.json.Decoder(RoomClaims)
usage_ledger_decoder = msgspec.json.Decoder(UsageLedger)
metering_member_decoder = msgspec.json.Decoder(MeteringMember)
partition_claim_decoder = msgspec.json.Decoder(PartitionClaim)
