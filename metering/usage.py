"""Reading usage records and reporting them in the shapes of protocol.md §8.2.

Metering writes `UsageWindow` and `BonusUsage` records to the usage bucket; the edge's
`GET /usage` and `GET /usage/history` and `relay-admin usage` read them through here.
An account with no record yet has used nothing.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from accounts.tiers import Tier
from edge.kv import get_present, open_bucket, present_values
from metering.windows import iso_ms, period_label, period_of, period_start_ms, resets_at
from schemas.http_api import ExtraQuota, HistoryEntry, Usage, UsageHistory
from schemas.records import (
    BonusUsage,
    UsageWindow,
    User,
    bonus_usage_decoder,
    usage_window_decoder,
)
from schemas.subjects import USAGE_BUCKET, bonus_usage_key, usage_filter, usage_key


async def open_usage_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    """Create (or open) the usage bucket."""
    return await open_bucket(js, KeyValueConfig(bucket=USAGE_BUCKET, history=1, replicas=replicas))


class UsageReader:
    """Read access to the usage bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def window(self, user_id: str, period: str) -> UsageWindow:
        entry = await get_present(self._kv, usage_key(user_id, period))
        if entry is None:
            return UsageWindow(user_id=user_id, period=period)
        return usage_window_decoder.decode(entry.value)

    async def windows(self, user_id: str) -> list[UsageWindow]:
        """Every window on record for the user (usage records expire after USAGE_TTL)."""
        values = await present_values(self._kv, usage_filter(user_id))
        return [usage_window_decoder.decode(value) for value in values.values()]

    async def bonus_used(self, user_id: str) -> BonusUsage:
        entry = await get_present(self._kv, bonus_usage_key(user_id))
        return BonusUsage() if entry is None else bonus_usage_decoder.decode(entry.value)


def effective_limit(user: User, tier: Tier) -> int:
    """Credits per window for this user: the override, else the tier's; -1 is unlimited."""
    return user.credits_per_window if user.credits_per_window is not None else tier.credits_per_window


def bonus_remaining(user: User, used: BonusUsage, now_ms: int) -> int:
    """Welcome-bonus credits left now (0 once expired). A counter for an older grant counts as 0."""
    grant = user.welcome_bonus
    if grant is None or now_ms >= grant.expires_at:
        return 0
    spent = used.used if used.grant_created_at == grant.created_at else 0
    return max(0, grant.credits - spent)


def usage_report(user: User, tier: Tier, window: UsageWindow, bonus: BonusUsage, now_ms: int) -> Usage:
    """`GET /usage` (protocol.md §8.2) for the window holding `now_ms`. `limit` 0 means unlimited."""
    limit = effective_limit(user, tier)
    grant = user.welcome_bonus
    extra = None
    if grant is not None:
        remaining = bonus_remaining(user, bonus, now_ms)
        extra = ExtraQuota(
            active=now_ms < grant.expires_at and remaining > 0,
            remaining=remaining,
            limit=grant.credits,
            expires_at=iso_ms(grant.expires_at),
        )
    return Usage(
        user_id=user.user_id,
        tier=user.tier,
        period=window.period,
        period_label=period_label(window.period),
        message_tokens=window.message_tokens,
        duration_tokens=window.duration_tokens,
        total_tokens=window.total_tokens,
        limit=max(limit, 0),
        remaining=max(0, limit - window.total_tokens) if limit >= 0 else 0,
        last_updated=window.last_updated,
        resets_at=resets_at(now_ms),
        extra_quota=extra,
    )


def history_report(user_id: str, windows: list[UsageWindow], now_ms: int) -> UsageHistory:
    """`GET /usage/history`: every window on record, newest first, the current one included."""
    by_period = {w.period: w for w in windows}
    current = period_of(now_ms)
    by_period.setdefault(current, UsageWindow(user_id=user_id, period=current))
    ordered = sorted(by_period.values(), key=lambda w: period_start_ms(w.period), reverse=True)
    return UsageHistory(
        history=[
            HistoryEntry(
                period=w.period,
                period_label=period_label(w.period),
                message_tokens=w.message_tokens,
                duration_tokens=w.duration_tokens,
                total_tokens=w.total_tokens,
            )
            for w in ordered
        ]
    )
