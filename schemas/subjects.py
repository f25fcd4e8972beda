"""NATS subjects and KV keys: built here and nowhere else.

Client-supplied text reaches a subject or key only through these functions, which
refuse anything but the documented alphabet, so a room id such as `>` or `a.b` can
never widen a subscription or address another key.
"""

from __future__ import annotations

import re
import zlib

ROOM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
EDGE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOKEN_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
ROLES = ("mac", "ios")

ROOMS_BUCKET = "relay_rooms"
PRESENCE_BUCKET = "relay_presence"
ACCOUNTS_BUCKET = "relay_accounts"
REGISTRATIONS_BUCKET = "relay_registrations"
USAGE_BUCKET = "relay_usage"
METERING_BUCKET = "relay_metering"
_SUBJECT_ROOT = "relay.room"
_EDGE_PREFIX = "edge."


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind a KV bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket stores `key` under (`key` made by one of the functions below)."""
    return f"$KV.{bucket}.{key}"


def is_valid_room_id(room_id: str) -> bool:
    """Whether `room_id` may name a room (`^[A-Za-z0-9_-]{1,128}$`)."""
    return ROOM_ID_PATTERN.fullmatch(room_id) is not None


def is_valid_user_id(user_id: str) -> bool:
    """Whether `user_id` may name an account (`^[A-Za-z0-9_-]{1,64}$`)."""
    return USER_ID_PATTERN.fullmatch(user_id) is not None


def is_valid_edge_id(edge_id: str) -> bool:
    """Whether `edge_id` may name an edge (`^[A-Za-z0-9_-]{1,64}$`)."""
    return EDGE_ID_PATTERN.fullmatch(edge_id) is not None


def _room(room_id: str) -> str:
    if not is_valid_room_id(room_id):
        raise ValueError(f"invalid room id: {room_id!r}")
    return room_id


def _role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"invalid role: {role!r}")
    return role


def room_subject(room_id: str, role: str) -> str:
    """The subject of a room and role: frames and control events *to* that role's socket
    travel on subjects below it, `<room subject>.<to edge>.<to socket>.<from socket>.<kind>`."""
    return f"{_SUBJECT_ROOT}.{_room(room_id)}.{_role(role)}"


def edge_filter(edge_id: str) -> str:
    """What one edge subscribes to: everything addressed to any of its sockets, in any room.

    One subscription per edge, made before it serves, not one per socket: no per-socket
    subscription state, and no window after a socket opens in which a NATS cluster has
    not yet learnt of its interest. The addressee's edge and socket are tokens of the
    subject, not headers: the server delivers a message only to the edge it is for, and
    nobody parses headers per frame.
    """
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return f"{_SUBJECT_ROOT}.*.*.{edge_id}.*.*.*"


def addressed_subject(room_subject_: str, to_edge: str, to_socket: str, from_socket: str, kind: str) -> str:
    """The subject of one message from socket `from_socket` to socket `to_socket` on edge `to_edge`.

    On the hot path: the ids are the relay's own (edge ids are checked at start, socket ids
    made by the edge), not a client's.
    """
    return f"{room_subject_}.{to_edge}.{to_socket}.{from_socket}.{kind}"


def addressee_sender_and_kind(subject: str) -> tuple[str, str, str]:
    """The addressed socket, the sender's socket and the kind token of an `addressed_subject`."""
    _, to, sender, kind = subject.rsplit(".", 3)
    return to, sender, kind


def edge_last_seen_subject(edge_id: str) -> str:
    """Where an edge answers what its sockets last sent (a `LastSeenQuery`)."""
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return f"relay.edge.{edge_id}.last_seen"


def edge_incarnation_subject(edge_id: str, boot_id: str) -> str:
    """Where one incarnation of an edge answers whether it runs (see `Edge._take_lease`):
    subscribed before its lease names it, so NATS answers "no responders" once it is gone."""
    if not is_valid_edge_id(edge_id) or not is_valid_edge_id(boot_id):  # a boot id read from KV, too
        raise ValueError(f"invalid edge or boot id: {edge_id!r}, {boot_id!r}")
    return f"relay.edge.{edge_id}.incarnation.{boot_id}"


def edge_probe_subject(edge_id: str, connection: str) -> str:
    """Where an edge moving off a NATS node checks that one of its connections' interest is
    known (`edge.nats_move`): it publishes there through its other connection."""
    if not is_valid_edge_id(edge_id) or not is_valid_edge_id(connection):
        raise ValueError(f"invalid edge id or connection: {edge_id!r}, {connection!r}")
    return f"relay.edge.{edge_id}.probe.{connection}"


def edge_undelivered_filter(edge_id: str) -> str:
    """What an edge subscribes to for news of frames its sockets sent that reached nobody:
    the reply subjects of its frames (`undelivered_reply_prefix`)."""
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return f"relay.edge.{edge_id}.undelivered.>"


def undelivered_reply_prefix(edge_id: str, from_socket: str, to_socket: str) -> str:
    """The reply subject of messages from `from_socket` to `to_socket`, but for its last two
    tokens (`frame_reply`): NATS answers it with a 503 status when nobody subscribes for
    the addressee (its edge is gone); the addressee's edge answers `gone` when it has no
    such socket. Socket ids are the edge's own (see `addressed_subject`)."""
    return f"relay.edge.{edge_id}.undelivered.{from_socket}.{to_socket}."


def frame_reply(prefix: str, credits: int, seq: int) -> str:
    """A frame's reply subject: `<prefix><credits>.<seq>`, the credits it was charged (0 for
    a part of a frame but its last) and the sending socket's sequence number of the message,
    by which an edge receiving its messages on two NATS connections at once drops the
    copies (`edge.protocol.moves`)."""
    return f"{prefix}{credits}.{seq}"


def sender_addressee_and_credits(reply_subject: str) -> tuple[str, str, int]:
    """The sending socket, the addressee and the credits of an undelivered frame's reply
    subject (ValueError if it is not one)."""
    _, sender, to, credits, seq = reply_subject.rsplit(".", 4)
    int(seq)
    return sender, to, int(credits)


def sequence_of(reply_subject: str, sender: str) -> int | None:
    """The sequence number in a frame's reply subject from socket `sender`; None when there is
    none (a control event's reply is an inbox)."""
    tokens = reply_subject.rsplit(".", 4)
    if len(tokens) != 5 or tokens[1] != sender or not tokens[4].isdigit():
        return None
    return int(tokens[4])


def room_key(room_id: str) -> str:
    """Key of a room's record in the rooms bucket."""
    return _room(room_id)


def last_seen_key(room_id: str, role: str) -> str:
    """Key of a room role's lastSeen (epoch ms) in the presence bucket."""
    return f"seen.{_room(room_id)}.{_role(role)}"


def edge_lease_key(edge_id: str) -> str:
    """Key of an edge's lease in the presence bucket."""
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return _EDGE_PREFIX + edge_id


EDGE_LEASE_FILTER = _EDGE_PREFIX + "*"


def edge_id_of_lease_key(key: str) -> str:
    """Inverse of `edge_lease_key`."""
    return key.removeprefix(_EDGE_PREFIX)


# --- accounts (bucket `relay_accounts`) ---------------------------------------------

_USER_PREFIX = "user."


def _user(user_id: str) -> str:
    if not is_valid_user_id(user_id):
        raise ValueError(f"invalid user id: {user_id!r}")
    return user_id


def _token_hash(digest: str) -> str:
    if TOKEN_HASH_PATTERN.fullmatch(digest) is None:
        raise ValueError("invalid token hash")
    return digest


def user_key(user_id: str) -> str:
    """Key of an account's `User` record."""
    return _USER_PREFIX + _user(user_id)


USER_FILTER = _USER_PREFIX + "*"



def api_key_key(key_hash: str) -> str:
    """Key of an API key's record, by the SHA-256 (hex) of the key: the key itself is never stored."""
    return "apikey." + _token_hash(key_hash)


def refresh_token_key(token_hash: str) -> str:
    """Key of a refresh token's record, by the SHA-256 (hex) of the token."""
    return "refresh." + _token_hash(token_hash)


# --- room registrations (bucket `relay_registrations`, per-message TTL) -------------


def registration_key(user_id: str, room_id: str) -> str:
    """Key of a user's registration of a room (protocol.md §7)."""
    return f"{_user(user_id)}.{_room(room_id)}"


def registrations_filter(user_id: str) -> str:
    """Filter over all of a user's room registrations."""
    return f"{_user(user_id)}.*"


def room_claims_key(user_id: str) -> str:
    """Key of a user's room claims (one token: `registrations_filter` never matches it)."""
    return _user(user_id)



# --- usage (bucket `relay_usage`, written by metering) ------------------------------

PERIOD_PATTERN = re.compile(r"5h-[0-9]{1,12}")


def usage_ledger_key(user_id: str) -> str:
    """Key of a user's `UsageLedger`: every window on record and the welcome bonus used."""
    return "usage." + _user(user_id)


# --- metering (stream `relay_usage_events`, request/reply, announcements) ------------

USAGE_STREAM = "relay_usage_events"
_USAGE_EVENTS_ROOT = "relay.usage.events"
# Everything the usage stream stores: an edge's batches of one partition
# (`relay.usage.events.<edge>.<partition>`), and those of edges from before partitions
# (`relay.usage.events.<edge>`).
USAGE_STREAM_SUBJECTS = _USAGE_EVENTS_ROOT + ".>"
# Usage is partitioned by user: a user's batches are all in one partition, applied in
# stream order by the one metering process that owns it, so up to this many metering
# processes share the work. A constant, not a setting: every edge and metering process
# must agree on it. (Changing it in a new release is safe for the ledgers, which keep a
# high-water mark per partition, as long as the old partitions are drained.)
USAGE_PARTITIONS = 16
# Batches of edges from before partitions, on their own consumer (one batch at a time,
# by any metering process): `relay.usage.events.<edge>`.
LEGACY_USAGE_FILTER = _USAGE_EVENTS_ROOT + ".*"
LEGACY_METERING_CONSUMER = "metering"
# Edges ask here whether a user may connect; metering processes answer as one queue group.
QUOTA_CHECK_SUBJECT = "relay.metering.quota"
METERING_QUEUE = "metering"
# Metering announces here that a user is over the limit; every edge listens.
OVER_LIMIT_SUBJECT = "relay.metering.over_limit"
# The status page asks every edge, and every metering process, to describe itself here
# (no queue group: each answers; `runtime.fleet.gather_answers` keeps every answer).
FLEET_EDGES_SUBJECT = "relay.fleet.edges"
FLEET_METERING_SUBJECT = "relay.fleet.metering"


def usage_partition(user_id: str) -> int:
    """The partition of `user_id`'s usage: the same in every process (CRC-32, not hash())."""
    return zlib.crc32(_user(user_id).encode()) % USAGE_PARTITIONS


def usage_events_subject(edge_id: str, partition: int) -> str:
    """The subject an edge publishes its usage batches of `partition` to."""
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return f"{_USAGE_EVENTS_ROOT}.{edge_id}.{_partition(partition)}"


def legacy_usage_events_subject(edge_id: str) -> str:
    """Where an edge from before partitions published (read by `LEGACY_METERING_CONSUMER`)."""
    if not is_valid_edge_id(edge_id):
        raise ValueError(f"invalid edge id: {edge_id!r}")
    return f"{_USAGE_EVENTS_ROOT}.{edge_id}"


def usage_partition_filter(partition: int) -> str:
    """Every edge's batches of `partition`."""
    return f"{_USAGE_EVENTS_ROOT}.*.{_partition(partition)}"


def partition_consumer(partition: int) -> str:
    """The durable consumer of `partition`, read by the metering process that owns it."""
    return f"metering-p{_partition(partition)}"


def _partition(partition: int) -> str:
    if not 0 <= partition < USAGE_PARTITIONS:
        raise ValueError(f"invalid usage partition: {partition!r}")
    return f"{partition:02d}"


# --- metering processes (bucket `relay_metering`) ------------------------------------

_MEMBER_PREFIX = "member."
MEMBER_FILTER = _MEMBER_PREFIX + "*"
_CLAIM_PREFIX = "partition."


def metering_member_key(member_id: str) -> str:
    """A running metering process, renewed while it runs (TTL)."""
    if not is_valid_edge_id(member_id):
        raise ValueError(f"invalid metering member id: {member_id!r}")
    return _MEMBER_PREFIX + member_id


def member_id_of_key(key: str) -> str:
    return key.removeprefix(_MEMBER_PREFIX)


def partition_claim_key(partition: int) -> str:
    """Which metering process owns `partition`, renewed while it does (TTL)."""
    return _CLAIM_PREFIX + _partition(partition)