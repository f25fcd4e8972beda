"""One line at INFO per connection event, on the logger `edge.connections`.

Events: `refused` (an upgrade answered with an error status, and why), `connected`,
`registered` / `joined` (or `register_refused` / `join_refused`, with the error code),
`peer_joined` / `peer_left` (news from the peer's edge: `peer` is the sender's socket id),
`replaced` (4001), `closed` (code, duration, frames each way). Each names the socket by
its id, which is also the sender or addressee token of every edge-to-edge subject it
causes, so one connection can be followed across edges. With RELAY_LOG_FORMAT=json the
fields are fields of the JSON line. Never key material: no header, no query string, no
message content.

Refusals come at a rate a client chooses: past `REFUSALS_PER_S` a second they are
counted, not logged, and the next line says how many were left out (every one is in
`relay_upgrades_total` all the same).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edge.protocol.limits import TokenBucket
from edge.protocol.session import Session

log = logging.getLogger("edge.connections")

REFUSALS_PER_S = 20


def socket_event(session: Session, event: str, **fields: Any) -> None:
    """Log `event` of the socket `session` at INFO, with `fields`."""
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {name: value for name, value in fields.items() if value is not None}
    described = "".join(f" {name}={value}" for name, value in fields.items())
    log.info(
        "socket %s %s: room %s role %s%s",
        session.socket_id, event, session.room_id, session.role or "-", described,
        extra={"event": event, "socket": session.socket_id, "room": session.room_id, "role": session.role, **fields},
    )  # fmt: skip


class RefusalLog:
    """Refused upgrades, a line each, up to REFUSALS_PER_S a second."""

    def __init__(self) -> None:
        self._budget = TokenBucket(REFUSALS_PER_S, REFUSALS_PER_S)
        self._left_out = 0

    def refused(self, status: int, reason: str, address: str) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        if not self._budget.take(time.monotonic()):
            self._left_out += 1
            return
        left_out, self._left_out = self._left_out, 0
        more = f" ({left_out} more refusals not logged)" if left_out else ""
        log.info(
            "upgrade refused: %d %s from %s%s", status, reason, address, more,
            extra={"event": "refused", "status": status, "reason": reason, "address": address},
        )  # fmt: skip
