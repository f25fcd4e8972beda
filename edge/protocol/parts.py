"""Frames larger than NATS carries, in parts: how a frame is cut, and how it is put together.

A NATS server refuses a message over its `max_payload` (1 MiB by default, and managed
services cap it), while the relay forwards frames of up to `RELAY_MAX_FRAME_BYTES`. So
the sending edge cuts a larger frame into parts and publishes them one after another on
the frame's subject, the last token saying which part it is (`part_kind`); only the last
carries the frame's reply subject, so an undelivered frame is refunded once. NATS keeps
one publisher's messages in order, so a socket's parts arrive consecutively, in order
with the frames around them, and the receiving edge (`FrameParts`) joins them.

Core NATS may still lose a message (a slow consumer, a reconnect), and the sending edge
may die between two parts. A frame missing a part is never delivered: what was gathered
of it is dropped, and so is the rest of it as it comes. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.edge_events import KIND_LAST_PART, KIND_PART


def part_size(max_payload: int) -> int:
    """The largest frame (or part of one) sent as one message to a server of `max_payload`:
    some room below it for the protocol line, and half of it on a server configured with a
    tiny one."""
    return max(max_payload - 1024, max_payload // 2, 1)


def cut(data: bytes, part_bytes: int) -> list[bytes]:
    """`data` in consecutive parts of at most `part_bytes` bytes (at least two of them for
    a frame over `part_bytes`)."""
    if part_bytes < 1:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    return [data[start : start + part_bytes] for start in range(0, len(data), part_bytes)]


def part_kind(index: int, last: bool) -> str:
    """The subject's last token for part `index` (from 0) of a frame: `p<index>`, or
    `l<index>` for its last part."""
    return f"{KIND_LAST_PART if last else KIND_PART}{index}"


def parse_part_kind(kind: str) -> tuple[int, bool] | None:
    """(index, last) of a `part_kind` token, None for any other token."""
    if len(kind) < 2 or kind[0] not in (KIND_PART, KIND_LAST_PART) or not kind[1:].isdigit():
        return None
    return int(kind[1:]), kind[0] == KIND_LAST_PART


@dataclass
class FrameParts:
    """The parts of the one frame being received for a socket: a socket hears one peer at a
    time, whose frames come in order, so one frame at most is ever under way.

    Bounded: never more than `max_bytes` (a frame over RELAY_MAX_FRAME_BYTES was refused by
    the sending edge; one that grows past it is broken), and dropped when older than the
    caller's timeout (`expired`): the sending edge died between two parts.
    """

    max_bytes: int
    sender: str = ""
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    started_at: float = 0.0

    @property
    def under_way(self) -> bool:
        return bool(self.parts)

    def add(self, sender: str, kind: str, data: bytes, now: float) -> tuple[bytes | None, str | None]:
        """Take a part (its subject's last token is `kind`) from `sender`: (the whole frame
        once its last part is in, else None; why a frame was dropped, if one was)."""
        parsed = parse_part_kind(kind)
        if parsed is None:
            return None, self.interrupt(sender) or f"a message of unknown kind {kind!r}"
        index, last = parsed
        dropped = None
        if self.parts and (sender != self.sender or index != len(self.parts)):
            # Another sender (the peer changed), a new frame (index 0), or a gap: what was
            # gathered cannot be finished.
            dropped = self._drop("its next part was lost")
        if index != len(self.parts):
            # The rest of a frame whose beginning was dropped (or lost): dropped too.
            return None, dropped
        if self.size + len(data) > self.max_bytes:
            self._drop("")
            return None, f"a frame grew past {self.max_bytes} bytes"
        if index == 0:
            if last:
                return data, dropped  # a frame in one part: nothing to join
            self.sender, self.started_at = sender, now
        self.parts.append(data)
        self.size += len(data)
        if not last:
            return None, dropped
        frame = b"".join(self.parts)
        self._drop("")
        return frame, dropped

    def interrupt(self, sender: str) -> str | None:
        """A whole frame from `sender` arrived: a frame under way was missing its last part
        (its sender's later frame came first, or the peer changed). Why it was dropped, if
        one was."""
        if not self.parts:
            return None
        return self._drop("a frame came before its last part" if sender == self.sender else "the peer changed")

    def expired(self, now: float, timeout_s: float) -> str | None:
        """Drop a frame under way for longer than `timeout_s` (its sender's edge died between
        two parts): why it was dropped, if it was."""
        if self.parts and now - self.started_at > timeout_s:
            return self._drop(f"its last part did not come within {timeout_s:g} s")
        return None

    def _drop(self, why: str) -> str:
        self.parts = []
        self.size = 0
        self.sender = ""
        return why
