"""Reading usage records and reporting them in the shapes of protocol.md §8.2.

Metering writes one `UsageLedger` per user to the usage bucket; the edge's `GET /usage`
and `GET /usage/history` and `relay-admin usage` read it through here.
An account with no record yet has used nothing.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from metering.ledger import USAGE_TTL_MS, bonus_remaining, effective_limit, window_of
from metering.windows import iso_ms, period_label, period_of, period_start_ms, resets_at
from runtime.kv import get_present, open_bucket
from schemas.http_api import ExtraQuota, HistoryEntry, Usage, UsageHistory
from schemas.records import (
    BonusUsage,
    UsageLedger,
    UsageWindow,
    User,
    usage_ledger_decoder,
)
from schemas.subjects import USAGE_BUCKET, usage_ledger_key
from schemas.tiers import Tier


async def open_usage_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    """Create (or open) the usage bucket. A ledger untouched for USAGE_TTL goes: its
    windows are older than that, and its welcome bonus expired long before."""
    config = KeyValueConfig(bucket=USAGE_BUCKET, history=1, replicas=replicas, ttl=USAGE_TTL_MS / 1000)
    return await open_bucket(js, config)


class UsageReader:
    """Read access to the usage bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def ledger(self, user_id: str) -> UsageLedger:
        """The user's ledger; an empty one for a user with no usage on record."""
        entry = await get_present(self._kv, usage_ledger_key(user_id))
        return UsageLedger(user_id=user_id) if entry is None else usage_ledger_decoder.decode(entry.value)

    async def window(self, user_id: str, period: str) -> UsageWindow:
        return window_of(await self.ledger(user_id), period)

    async def windows(self, user_id: str) -> list[UsageWindow]:
        """Every window on record for the user (windows older than USAGE_TTL are dropped)."""
        return (await self.ledger(user_id)).windows

    async def bonus_used(self, user_id: str) -> BonusUsage:
        return (await self.ledger(user_id)).bonus


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
