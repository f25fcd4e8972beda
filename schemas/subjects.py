"""NATS subjects and KV keys: built here and nowhere else.

Client-supplied text reaches a subject or key only through these functions, which
refuse anything but the documented alphabet, so a room id such as `>` or `a.b` can
never widen a subscription or address another key.
"""

from __future__ import annotations

import re

ROOM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
EDGE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ROLES = ("mac", "ios")

ROOMS_BUCKET = "relay_rooms"
PRESENCE_BUCKET = "relay_presence"
_SUBJECT_ROOT = "relay.room"
_EDGE_PREFIX = "edge."


def is_valid_room_id(room_id: str) -> bool:
    """Whether `room_id` may name a room (`^[A-Za-z0-9_-]{1,128}$`)."""
    return ROOM_ID_PATTERN.fullmatch(room_id) is not None


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
    """Subject that carries frames and control events *to* `role`'s socket of a room."""
    return f"{_SUBJECT_ROOT}.{_room(room_id)}.{_role(role)}"


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
