"""Warnings that come once per socket in an outage or a storm, kept to a few a second.

When storage stops answering, every upgrade, register, join and departure on the edge
fails the same way at once: thousands of identical lines would hide everything else in
the log (and cost the edge CPU when it has least). Each kind of warning gets a budget:
`WARNINGS_PER_S` on average, bursts of `WARNINGS_BURST`; what is left out is counted and
named in the next line of that kind. The metrics count every one of them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edge.protocol.limits import TokenBucket

WARNINGS_PER_S = 2.0
WARNINGS_BURST = 10.0


class WarningBudget:
    """`warning(kind, message, *args)`: logged while `kind` has budget, else counted."""

    def __init__(self, logger: logging.Logger, per_s: float = WARNINGS_PER_S, burst: float = WARNINGS_BURST) -> None:
        self.logger = logger
        self.per_s, self.burst = per_s, burst
        self._budgets: dict[str, TokenBucket] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        budget = self._budgets.get(kind)
        if budget is None:
            budget = self._budgets[kind] = TokenBucket(self.per_s, self.burst)
        if not budget.take(time.monotonic()):
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            self.logger.warning(message + " (and %d more like it, not logged)", *args, left_out)
        else:
            self.logger.warning(message, *args)
