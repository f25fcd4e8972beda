"""The last warnings and errors a service logged, for the operator's status page.

A handler on the service's own logger ("edge", "metering"), not on the root logger:
`configure_logging` replaces the root's handlers, and tests run services in one process
without it. One handler per logger name, so several edges in one process (tests) share
one list. Only what the service's code logged, already written without secrets.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from schemas.status import Problem

# Enough to show what went wrong lately, small enough to send in every status answer.
KEPT = 20
MESSAGE_CHARS = 300


class RecentProblems(logging.Handler):
    """Keeps the last `KEPT` records at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._records: deque[Problem] = deque(maxlen=KEPT)
        self._lock_for_reads = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the service's logging
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {type(record.exc_info[1]).__name__}"  # no traceback: the log has it
        level = record.levelname if record.levelname in ("WARNING", "ERROR", "CRITICAL") else "ERROR"
        problem = Problem(at_ms=int(record.created * 1000), level=level, logger=record.name, message=message[:MESSAGE_CHARS])
        with self._lock_for_reads:
            self._records.append(problem)

    def newest_first(self, source: str) -> list[Problem]:
        with self._lock_for_reads:
            kept = list(self._records)
        return [Problem(at_ms=p.at_ms, level=p.level, logger=p.logger, message=p.message, source=source) for p in reversed(kept)]


_handlers: dict[str, RecentProblems] = {}


def recent_problems(logger_name: str) -> RecentProblems:
    """The handler keeping `logger_name`'s last problems, installed on first use."""
    handler = _handlers.get(logger_name)
    if handler is None:
        handler = _handlers[logger_name] = RecentProblems()
        logging.getLogger(logger_name).addHandler(handler)
    return handler
