"""Warnings that come once per socket in an outage are kept to a few a second, and what is
left out is counted in the next line (`edge.log_budget`)."""

from __future__ import annotations

import logging

from edge.log_budget import WarningBudget


def test_a_kind_of_warning_past_its_budget_is_counted_and_named_in_the_next_line(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("edge.log_budget.time.monotonic", lambda: now[0])
    budget = WarningBudget(logging.getLogger("edge.test_budget"), per_s=1.0, burst=3.0)
    with caplog.at_level(logging.WARNING, logger="edge.test_budget"):
        for n in range(10):
            budget.warning("release", "room %s: could not release", n)
        budget.warning("auth", "authentication: storage unavailable")  # another kind: its own budget
        now[0] += 1.0  # one more token
        budget.warning("release", "room %s: could not release", 10)
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "room 0: could not release",
        "room 1: could not release",
        "room 2: could not release",
        "authentication: storage unavailable",
        "room 10: could not release (and 7 more like it, not logged)",
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)
