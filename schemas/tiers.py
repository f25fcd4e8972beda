"""Tiers: what an account's plan allows. Defaults from protocol.md §6.3 and §12 item 22.

An operator may override them with a TOML file (`RELAY_TIERS_FILE`):

    [tiers.free]
    credits_per_window = 2000
    max_rooms = 4
    max_sessions = 4

    [tiers.team]          # a new tier needs all three fields
    credits_per_window = -1
    max_rooms = 100
    max_sessions = -1

Fields left out of a built-in tier keep their defaults. -1 means unlimited.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = -1


@dataclass(frozen=True)
class Tier:
    name: str
    credits_per_window: int  # credits per 5-hour window; -1: unlimited
    max_rooms: int  # live room registrations; -1: unlimited
    max_sessions: int  # PTY sessions, sent in room_registered; -1: unlimited

    def allows_another_room(self, registered: int) -> bool:
        return self.max_rooms < 0 or registered < self.max_rooms


DEFAULT_TIERS: Mapping[str, Tier] = {
    "free": Tier("free", credits_per_window=1_000, max_rooms=4, max_sessions=4),
    "pro": Tier("pro", credits_per_window=10_000, max_rooms=32, max_sessions=16),
    "premium": Tier("premium", credits_per_window=50_000, max_rooms=32, max_sessions=UNLIMITED),
}

_FIELDS = ("credits_per_window", "max_rooms", "max_sessions")


class TierFileError(ValueError):
    """The tiers file cannot be used; the message says where and why (`hint`: what to do)."""

    hint = "fix the file or point RELAY_TIERS_FILE / --tiers-file elsewhere"


def load_tiers(path: str | Path | None) -> dict[str, Tier]:
    """The tiers: the defaults, overridden and extended by the TOML file at `path` (if any)."""
    tiers = dict(DEFAULT_TIERS)
    if not path:
        return tiers
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise TierFileError(f"cannot read tiers file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TierFileError(f"tiers file {path} is not valid TOML: {exc}") from exc
    table = data.get("tiers")
    if not isinstance(table, dict):
        raise TierFileError(f"tiers file {path} needs a [tiers.<name>] table per tier")
    for name, values in table.items():
        if not isinstance(values, dict):
            raise TierFileError(f"tiers file {path}: tiers.{name} must be a table")
        unknown = set(values) - set(_FIELDS)
        if unknown:
            raise TierFileError(f"tiers file {path}: tiers.{name} has unknown fields {sorted(unknown)}")
        base = tiers.get(name)
        merged = {}
        for field in _FIELDS:
            value = values.get(field, getattr(base, field) if base else None)
            if value is None:
                raise TierFileError(f"tiers file {path}: new tier {name} needs {field}")
            if not isinstance(value, int) or isinstance(value, bool) or value < UNLIMITED:
                raise TierFileError(f"tiers file {path}: tiers.{name}.{field} must be an integer >= -1")
            if field == "credits_per_window" and value == 0:
                # Clients read a limit of 0 as "unlimited" (protocol.md §8.2): say -1 for that.
                raise TierFileError(f"tiers file {path}: tiers.{name}.credits_per_window must be positive or -1 (unlimited)")
            merged[field] = value
        tiers[name] = Tier(name, **merged)
    return tiers
