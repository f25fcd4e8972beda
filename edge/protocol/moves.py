"""Receiving on two NATS connections at once, while an edge moves off a node in lame-duck
mode (`edge.nats_move`): which message to deliver, and which is a copy.

While both connections subscribe, NATS delivers every message addressed to the edge on
each. A connection's stream is *warming* from its (re)subscription until the interest is
known across the cluster: it may lack messages the other has, so its messages are
dropped (the other, *live*, one has them all). Once both are live, each carries every
message, each in its sender's order; a message is delivered the first time it comes, on
either, and its copy dropped, which keeps every sender's order: whichever stream brings
message n first has brought n-1 before it. A frame is known by its sender socket and the
sequence number in its reply subject (`schemas.subjects.frame_reply`); a control event
carries none and is delivered twice (sessions ignore news they already have), and news of
an undelivered frame is known by its subject. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAIN = "main"  # the edge's own connection
BRIDGE = "bridge"  # the one opened to another node to carry the frame path across the move


@dataclass
class TwoStreams:
    """The state of a move: each connection's stream live or warming, and what was delivered."""

    live: set[str] = field(default_factory=lambda: {MAIN})
    # sender socket → the highest sequence number delivered of it since the move began
    delivered: dict[str, int] = field(default_factory=dict)
    undelivered_seen: set[str] = field(default_factory=set)

    def warming(self, source: str) -> None:
        """`source` (re)subscribed: what it brings may lack messages; dropped until `goes_live`."""
        self.live.discard(source)

    def goes_live(self, source: str) -> None:
        self.live.add(source)

    def takes_frame(self, source: str, sender: str, seq: int | None) -> bool:
        """Whether a frame (or a part of one) from `sender` with sequence number `seq`, brought
        by `source`, is delivered: not from a warming stream, and not delivered already."""
        if source not in self.live:
            return False
        if seq is None:  # no sequence number (an edge of an earlier release): cannot tell copies
            return True
        if seq <= self.delivered.get(sender, -1):
            return False
        self.delivered[sender] = seq
        return True

    def takes_event(self, source: str) -> bool:
        """Whether a control event brought by `source` is delivered (a copy is harmless)."""
        return source in self.live

    def takes_undelivered(self, source: str, subject: str) -> bool:
        """Whether news that a frame reached nobody (`subject`, unique per frame) is acted on: once."""
        if source not in self.live or subject in self.undelivered_seen:
            return False
        self.undelivered_seen.add(subject)
        return True
