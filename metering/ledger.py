"""Applying usage to a user's ledger, and judging the quota (protocol.md §6). No I/O.

Metering reads a `UsageLedger`, calls `apply_usage` and writes the result back with a
compare-and-set; `quota_answer` is what an edge is told at connect and what an over-limit
announcement carries. Everything here depends only on its arguments (the event's own
time, not the clock), so applying an event again after a crash gives the same result.
"""

from __future__ import annotations

from collections.abc import Iterable

from metering.windows import WINDOW_MS, iso_ms, period_of, period_start_ms, resets_at
from schemas.client import QuotaExceeded
from schemas.metering import QuotaAnswer, UsageEntry
from schemas.records import BonusUsage, UsageLedger, UsageWindow, User
from schemas.subjects import partition_consumer
from schemas.tiers import Tier

# Windows are kept this long (the official relay's usage keys live 30 days).
USAGE_TTL_MS = 30 * 86_400_000


def effective_limit(user: User, tier: Tier) -> int:
    """Credits per window for this user: the override, else the tier's; -1 is unlimited."""
    return user.credits_per_window if user.credits_per_window is not None else tier.credits_per_window


def bonus_remaining(user: User | None, used: BonusUsage, now_ms: int) -> int:
    """Welcome-bonus credits left at `now_ms` (0 once expired). A counter for an older grant counts as 0."""
    grant = user.welcome_bonus if user is not None else None
    if grant is None or now_ms >= grant.expires_at:
        return 0
    spent = used.used if used.grant_created_at == grant.created_at else 0
    return max(0, grant.credits - spent)


def window_of(ledger: UsageLedger, period: str) -> UsageWindow:
    """The ledger's window `period`, or an empty one."""
    for window in ledger.windows:
        if window.period == period:
            return window
    return UsageWindow(user_id=ledger.user_id, period=period)


def applied_through(ledger: UsageLedger, partition: int | None) -> int:
    """The stream sequence of the last batch of `partition` (None: from an edge before
    partitions) applied to `ledger`."""
    if partition is None:
        return ledger.applied_seq
    return ledger.partitions.get(partition_consumer(partition), 0)


def apply_usage(
    ledger: UsageLedger,
    user: User | None,
    seq: int,
    at_ms: int,
    entries: Iterable[UsageEntry],
    *,
    partition: int | None = None,
) -> bool:
    """Add the credits of usage batch `seq` of `partition` (sealed at `at_ms`) to `ledger`,
    in place. Returns False, changing nothing, if the ledger has that batch already."""
    return apply_batches(ledger, user, [(seq, at_ms, entries)], partition=partition) == 1


def apply_batches(
    ledger: UsageLedger,
    user: User | None,
    batches: Iterable[tuple[int, int, Iterable[UsageEntry]]],
    *,
    partition: int | None = None,
) -> int:
    """Add the credits of usage batches (sequence, sealed at, entries) of `partition`, in
    stream order, to `ledger`, in place, as if one at a time; returns how many it applied.

    A batch the ledger has already is skipped (exactly once: each partition's batches are
    applied in stream order, so its sequence only grows; a partition's high-water mark
    says nothing of another's). The welcome bonus pays first (§6.5): of each entry, its
    messages, then its duration; what the bonus does not cover counts against the
    entry's window. Windows older than USAGE_TTL (from each batch's time) are dropped.
    """
    high_water = applied_through(ledger, partition)
    by_period: dict[str, UsageWindow] | None = None
    ends: dict[str, int] = {}  # period → when it ends (ms), to drop old windows without parsing
    applied = 0
    for seq, at_ms, entries in batches:
        if seq <= high_water:
            continue
        if by_period is None:
            by_period = {window.period: window for window in ledger.windows}
            ends = {period: period_start_ms(period) + WINDOW_MS for period in by_period}
        bonus_left = bonus_remaining(user, ledger.bonus, at_ms)
        covered = 0
        for entry in entries:
            window = by_period.get(entry.period)
            if window is None:
                window = by_period[entry.period] = UsageWindow(user_id=ledger.user_id, period=entry.period)
                ends[entry.period] = period_start_ms(entry.period) + WINDOW_MS
            messages_covered = min(bonus_left, entry.message_tokens)
            bonus_left -= messages_covered
            duration_covered = min(bonus_left, entry.duration_tokens)
            bonus_left -= duration_covered
            window.message_tokens += entry.message_tokens - messages_covered
            window.duration_tokens += entry.duration_tokens - duration_covered
            window.total_tokens = window.message_tokens + window.duration_tokens
            window.bonus_tokens += messages_covered + duration_covered
            window.last_updated = max(window.last_updated, at_ms)
            covered += messages_covered + duration_covered
        if covered:
            grant = user.welcome_bonus if user is not None else None  # covered > 0 only with a live grant
            assert grant is not None
            spent = ledger.bonus.used if ledger.bonus.grant_created_at == grant.created_at else 0
            ledger.bonus = BonusUsage(used=spent + covered, grant_created_at=grant.created_at)
        oldest_kept = at_ms - USAGE_TTL_MS
        if ends and min(ends.values()) <= oldest_kept:
            for period in [p for p, end in ends.items() if end <= oldest_kept]:
                del by_period[period], ends[period]
        high_water = seq
        applied += 1
    if by_period is None:
        return 0
    ledger.windows = sorted(by_period.values(), key=lambda w: ends[w.period])
    if partition is None:
        ledger.applied_seq = high_water
    else:
        ledger.partitions[partition_consumer(partition)] = high_water
    return applied


def quota_answer(ledger: UsageLedger, user: User | None, tier: Tier | None, now_ms: int) -> QuotaAnswer:
    """Whether the user may use the relay now (§6.4, §12 item 21), and if not, the
    `quota_exceeded` message (§3.3.8) for the client.

    Allowed while the welcome bonus has credits left or the current window's total is
    below the limit. An unknown user or tier is allowed: metering never locks out an
    account it cannot judge (the edge authenticated it).
    """
    if user is None or tier is None:
        return QuotaAnswer(allowed=True)
    limit = effective_limit(user, tier)
    period = period_of(now_ms)
    window = window_of(ledger, period)
    if limit < 0 or window.total_tokens < limit or bonus_remaining(user, ledger.bonus, now_ms) > 0:
        return QuotaAnswer(allowed=True)
    exceeded = QuotaExceeded(usage=window.total_tokens, limit=limit, period=period, resets_at=resets_at(now_ms))
    grant = user.welcome_bonus
    if grant is not None:  # the bonus fields are sent only to users who have one
        used = ledger.bonus.used if ledger.bonus.grant_created_at == grant.created_at else 0
        exceeded.extra_quota_used = min(used, grant.credits)
        exceeded.extra_quota_limit = grant.credits
        exceeded.extra_quota_expires_at = iso_ms(grant.expires_at)
    return QuotaAnswer(allowed=False, exceeded=exceeded)
