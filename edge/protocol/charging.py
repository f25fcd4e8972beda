"""What a user is charged for (protocol.md §6, §12 items 18–19). No I/O."""

from __future__ import annotations


def frame_credits(payloads: int, charge_per_payload: bool) -> int:
    """Credits of one forwarded frame: one, or one per payload of a `relay_batch`.

    Charged once it is on its way, and only when a peer was there (§12 item 18)."""
    return payloads if charge_per_payload else 1


def session_time_sample(
    since: float | None, now: float, in_session: bool, ending: bool
) -> tuple[float, float | None]:
    """(milliseconds of session time to charge, the next sample's start) for a Mac socket.

    Sampled at each usage flush and when the socket goes: a session that starts or ends
    between two samples counts from the next sample or up to the previous one (less than
    one flush interval each time).
    """
    charged = (now - since) * 1000 if since is not None else 0.0
    return charged, now if in_session and not ending else None
