"""The room limit as one record per user (protocol.md §7; issue 16 item 4). No I/O.

The limit used to be "count the user's live registrations, then register": two Macs
registering side by side both counted below the limit and both registered (50 sockets of
a free user registered 25 rooms). Now each user has one claims record in
`relay_registrations` (key `<user>`, beside the registrations `<user>.<room>`), the set
of rooms he holds with each one's expiry (epoch ms). A first register adds its room to it
by compare-and-set: of any number of registers at once, on any edges, at most the tier's
`max_rooms` can be in the set, since each write is decided on the record it replaces.

Nothing can drift: an entry lapses at its own expiry, the same moment as the room's
registration (both are written with ROOM_REG_TTL from the same refresh), and an entry
past it is dropped on every read; the record itself carries a TTL up to its last
expiry, so a user whose Macs are all gone leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Mapping

# What a claim did (`accounts.store.AccountStore.claim_room`).
NEW = "new"  # the room was not claimed; now it is
HELD = "held"  # it was claimed already; its expiry slid
REFUSED = "refused"  # max_rooms other rooms are claimed


def live_claims(rooms: Mapping[str, int], now_ms: int) -> dict[str, int]:
    """The claims of `rooms` (room id → expiry, epoch ms) that have not expired at `now_ms`."""
    return {room: expires for room, expires in rooms.items() if expires > now_ms}


def claim(
    rooms: Mapping[str, int], room_id: str, now_ms: int, expires_at: int, max_rooms: int, force: bool = False
) -> dict[str, int] | None:
    """The live claims with `room_id` claimed (or its claim extended) until `expires_at`,
    or None when the room is not claimed yet and `max_rooms` (-1: unlimited) are. `force`
    claims it whatever the limit: a room that has a registration already (a Mac
    reconnecting to its room is always let in) or the refresh of a registered one."""
    live = live_claims(rooms, now_ms)
    if room_id not in live and not force and 0 <= max_rooms <= len(live):
        return None
    live[room_id] = max(expires_at, live.get(room_id, 0))
    return live


def release(rooms: Mapping[str, int], room_id: str, now_ms: int) -> dict[str, int]:
    """The live claims without `room_id` (its room was deleted, or its register refused)."""
    live = live_claims(rooms, now_ms)
    live.pop(room_id, None)
    return live
