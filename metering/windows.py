"""Quota windows (protocol.md §6.2): fixed 5-hour windows aligned to the Unix epoch. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime

WINDOW_MS = 18_000_000  # 5 h


def window_index(epoch_ms: int) -> int:
    """N of the window holding `epoch_ms`: floor(epoch_ms / 18,000,000)."""
    return epoch_ms // WINDOW_MS


def period_of(epoch_ms: int) -> str:
    """The window's name, `5h-N`."""
    return f"5h-{window_index(epoch_ms)}"


def period_start_ms(period: str) -> int:
    """Epoch ms at which window `5h-N` starts."""
    return int(period.removeprefix("5h-")) * WINDOW_MS


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and `Z`, as JavaScript's toISOString writes it."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def resets_at(epoch_ms: int) -> str:
    """When the window holding `epoch_ms` ends: the start of the next one."""
    return iso_ms((window_index(epoch_ms) + 1) * WINDOW_MS)


def period_label(period: str) -> str:
    """A human label for a window, e.g. `Mar 8, 10:00 – 15:00 UTC`."""
    start = datetime.fromtimestamp(period_start_ms(period) / 1000, tz=UTC)
    end = datetime.fromtimestamp((period_start_ms(period) + WINDOW_MS) / 1000, tz=UTC)
    return f"{start:%b} {start.day}, {start:%H:%M} – {end:%H:%M} UTC"
