"""The last problems a service logged, as the status page shows them (runtime.recent_problems)."""

from __future__ import annotations

import base64
import logging
import secrets

from accounts.tokens import basic_password
from runtime.recent_problems import KEPT, MESSAGE_CHARS, recent_problems


def test_recent_problems_keep_the_last_warnings_and_errors_newest_first():
    name = f"edge.test-{secrets.token_hex(3)}"
    logger = logging.getLogger(name)
    handler = recent_problems(name)
    assert recent_problems(name) is handler  # installed once
    logger.info("not a problem")
    for i in range(KEPT + 5):
        logger.warning("warning %d", i)
    try:
        raise KeyError("x")
    except KeyError:
        logger.exception("upkeep failed")
    logger.error("y" * (MESSAGE_CHARS + 50))
    problems = handler.newest_first("edge-1")
    assert len(problems) == KEPT
    assert problems[0].message == "y" * MESSAGE_CHARS and problems[0].level == "ERROR"
    assert problems[1].message == "upkeep failed: KeyError" and "Traceback" not in problems[1].message
    assert problems[2].message == f"warning {KEPT + 4}" and problems[2].level == "WARNING"
    assert {p.source for p in problems} == {"edge-1"} and {p.logger for p in problems} == {name}
    assert all(a.at_ms >= b.at_ms for a, b in zip(problems, problems[1:]))


def test_basic_password_is_the_part_after_the_first_colon():
    encoded = base64.b64encode(b"operator:tok:en").decode()
    assert basic_password(f"Basic {encoded}") == "tok:en"
    assert basic_password(f"basic {encoded}") == "tok:en"
    assert basic_password("Basic " + base64.b64encode(b"no-colon").decode()) is None
    assert basic_password("Basic " + base64.b64encode(b"user:").decode()) is None
    assert basic_password("Basic ***not base64***") is None
    assert basic_password("Bearer abc") is None and basic_password(None) is None
