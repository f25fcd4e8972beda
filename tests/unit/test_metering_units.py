"""Pure rules of metering: applying usage to a ledger, the quota answer, and the edge's meter. No I/O."""

from __future__ import annotations

import msgspec
import pytest

from edge.protocol.meter import UsageMeter
from metering.ledger import USAGE_TTL_MS, applied_through, apply_batches, apply_usage, quota_answer, window_of
from metering.windows import WINDOW_MS, iso_ms
from schemas.metering import UsageEntry
from schemas.records import BonusUsage, UsageLedger, UsageWindow, User, WelcomeBonus
from schemas.subjects import USAGE_PARTITIONS, usage_partition
from schemas.tiers import DEFAULT_TIERS, Tier

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# 2026-03-23T00:00:00Z, the start of window 5h-98568.
T_98568 = 98568 * WINDOW_MS
NOW = T_98568 + 2 * HOUR_MS
P = "5h-98568"
FREE = DEFAULT_TIERS["free"]
UNLIMITED_TIER = Tier("unlimited", credits_per_window=-1, max_rooms=1, max_sessions=1)


def _user(**fields) -> User:
    base = {"user_id": "u1", "email": "u1@example.com", "tier": "free", "created_at": NOW - DAY_MS}
    base.update(fields)
    return User(**base)


def _grant(credits: int = 10_000, created_at: int = NOW - DAY_MS, days: int = 7) -> WelcomeBonus:
    return WelcomeBonus(credits=credits, created_at=created_at, expires_at=created_at + days * DAY_MS)


def _ledger(*windows: UsageWindow, **fields) -> UsageLedger:
    return UsageLedger(user_id="u1", windows=list(windows), **fields)


def _window(period: str = P, messages: int = 0, duration: int = 0, **fields) -> UsageWindow:
    total = messages + duration
    return UsageWindow(user_id="u1", period=period, message_tokens=messages, duration_tokens=duration, total_tokens=total, **fields)


def _snapshot(ledger: UsageLedger) -> bytes:
    return msgspec.json.encode(ledger)


# --- apply_usage: windows and credits ---------------------------------------------------


def test_credits_go_to_the_window_of_each_entry_with_total_as_messages_plus_duration():
    ledger = _ledger()
    entries = [UsageEntry("u1", "5h-98567", 3, 4), UsageEntry("u1", P, 10, 2)]
    assert apply_usage(ledger, _user(), 1, NOW, entries) is True
    assert [(w.period, w.message_tokens, w.duration_tokens, w.total_tokens) for w in ledger.windows] == [
        ("5h-98567", 3, 4, 7),
        (P, 10, 2, 12),
    ]


def test_credits_of_later_events_add_to_the_existing_window():
    ledger = _ledger(_window(messages=100, duration=50))
    apply_usage(ledger, _user(), 1, NOW, [UsageEntry("u1", P, 7, 3)])
    window = window_of(ledger, P)
    assert (window.message_tokens, window.duration_tokens, window.total_tokens) == (107, 53, 160)
    assert window.bonus_tokens == 0


def test_window_of_a_period_without_a_record_is_an_empty_window():
    window = window_of(_ledger(_window(period="5h-98567", messages=5)), P)
    assert (window.user_id, window.period, window.total_tokens, window.bonus_tokens) == ("u1", P, 0, 0)


# --- apply_usage: exactly once ----------------------------------------------------------


def test_applying_the_same_seq_again_returns_false_and_changes_nothing():
    ledger = _ledger()
    entries = [UsageEntry("u1", P, 5, 1)]
    assert apply_usage(ledger, _user(), 7, NOW, entries) is True
    before = _snapshot(ledger)
    assert apply_usage(ledger, _user(), 7, NOW, entries) is False
    assert _snapshot(ledger) == before


def test_a_lower_seq_is_skipped_and_a_higher_seq_applies():
    ledger = _ledger()
    apply_usage(ledger, _user(), 7, NOW, [UsageEntry("u1", P, 5, 0)])
    before = _snapshot(ledger)
    assert apply_usage(ledger, _user(), 6, NOW, [UsageEntry("u1", P, 100, 0)]) is False
    assert _snapshot(ledger) == before
    assert apply_usage(ledger, _user(), 8, NOW, [UsageEntry("u1", P, 1, 0)]) is True
    assert (ledger.applied_seq, window_of(ledger, P).total_tokens) == (8, 6)


def test_each_usage_partition_has_its_own_high_water_mark_and_the_legacy_batches_theirs():
    ledger = _ledger()
    assert apply_usage(ledger, _user(), 900, NOW, [UsageEntry("u1", P, 5, 0)], partition=3) is True
    # A lower sequence of another partition (the user moved partitions in a new release)
    # or of an edge from before partitions is not a redelivery: it applies.
    assert apply_usage(ledger, _user(), 800, NOW, [UsageEntry("u1", P, 1, 0)], partition=4) is True
    assert apply_usage(ledger, _user(), 700, NOW, [UsageEntry("u1", P, 1, 0)]) is True
    assert apply_usage(ledger, _user(), 900, NOW, [UsageEntry("u1", P, 100, 0)], partition=3) is False
    assert apply_usage(ledger, _user(), 700, NOW, [UsageEntry("u1", P, 100, 0)]) is False
    assert (applied_through(ledger, 3), applied_through(ledger, 4), applied_through(ledger, None)) == (900, 800, 700)
    assert ledger.partitions == {"metering-p03": 900, "metering-p04": 800}
    assert window_of(ledger, P).total_tokens == 7


def test_an_event_redelivered_after_a_crash_is_counted_once():
    grant = _grant(credits=3)
    user = _user(welcome_bonus=grant)
    stored = msgspec.json.encode(_ledger())
    entries = [UsageEntry("u1", P, 5, 0)]
    first = msgspec.json.decode(stored, type=UsageLedger)
    apply_usage(first, user, 42, NOW, entries)
    saved = msgspec.json.decode(msgspec.json.encode(first), type=UsageLedger)
    assert apply_usage(saved, user, 42, NOW, entries) is False
    assert window_of(saved, P).total_tokens == 2
    assert saved.bonus.used == 3


# --- apply_usage: the welcome bonus -----------------------------------------------------


def test_credits_covered_by_a_live_bonus_go_to_the_bonus_not_the_window_quota():
    grant = _grant(credits=10_000)
    ledger = _ledger()
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, [UsageEntry("u1", P, 30, 20)])
    window = window_of(ledger, P)
    assert (window.message_tokens, window.duration_tokens, window.total_tokens) == (0, 0, 0)
    assert window.bonus_tokens == 50
    assert ledger.bonus == BonusUsage(used=50, grant_created_at=grant.created_at)


def test_what_the_bonus_cannot_cover_counts_against_the_window():
    grant = _grant(credits=100)
    ledger = _ledger(bonus=BonusUsage(used=75, grant_created_at=grant.created_at))
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, [UsageEntry("u1", P, 30, 20)])
    window = window_of(ledger, P)
    assert (window.message_tokens, window.duration_tokens, window.total_tokens, window.bonus_tokens) == (5, 20, 25, 25)
    assert ledger.bonus.used == 100


def test_within_an_entry_the_bonus_covers_messages_before_duration():
    grant = _grant(credits=40)
    ledger = _ledger()
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, [UsageEntry("u1", P, 30, 20)])
    window = window_of(ledger, P)
    assert (window.message_tokens, window.duration_tokens, window.total_tokens, window.bonus_tokens) == (0, 10, 10, 40)


def test_the_bonus_covers_entries_in_their_order_until_it_runs_out():
    grant = _grant(credits=40)
    ledger = _ledger()
    entries = [UsageEntry("u1", "5h-98567", 10, 10), UsageEntry("u1", P, 15, 10)]
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, entries)
    older, current = ledger.windows
    assert (older.total_tokens, older.bonus_tokens) == (0, 20)
    assert (current.message_tokens, current.duration_tokens, current.bonus_tokens) == (0, 5, 20)
    assert ledger.bonus.used == 40


def test_bonus_used_accumulates_across_events_of_the_same_grant():
    grant = _grant(credits=10_000)
    user = _user(welcome_bonus=grant)
    ledger = _ledger()
    apply_usage(ledger, user, 1, NOW, [UsageEntry("u1", P, 30, 0)])
    apply_usage(ledger, user, 2, NOW + 1, [UsageEntry("u1", P, 12, 8)])
    assert ledger.bonus == BonusUsage(used=50, grant_created_at=grant.created_at)
    assert window_of(ledger, P).bonus_tokens == 50


def test_an_expired_grant_covers_nothing():
    grant = _grant(credits=10_000, created_at=NOW - 7 * DAY_MS, days=7)
    assert grant.expires_at == NOW
    ledger = _ledger()
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, [UsageEntry("u1", P, 30, 20)])
    window = window_of(ledger, P)
    assert (window.total_tokens, window.bonus_tokens) == (50, 0)
    assert ledger.bonus == BonusUsage()


def test_a_grant_covers_until_the_millisecond_before_it_expires():
    grant = _grant(credits=10_000, created_at=NOW - 7 * DAY_MS, days=7)
    ledger = _ledger()
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW - 1, [UsageEntry("u1", P, 30, 20)])
    assert window_of(ledger, P).bonus_tokens == 50
    assert ledger.bonus.used == 50


def test_a_bonus_counter_for_an_older_grant_counts_as_zero_used():
    grant = _grant(credits=100)
    ledger = _ledger(bonus=BonusUsage(used=100, grant_created_at=grant.created_at - DAY_MS))
    apply_usage(ledger, _user(welcome_bonus=grant), 1, NOW, [UsageEntry("u1", P, 30, 0)])
    assert window_of(ledger, P).bonus_tokens == 30
    assert ledger.bonus == BonusUsage(used=30, grant_created_at=grant.created_at)


def test_without_a_grant_or_a_known_user_everything_counts_against_the_window():
    for user in (_user(), None):
        ledger = _ledger()
        apply_usage(ledger, user, 1, NOW, [UsageEntry("u1", P, 30, 20)])
        assert (window_of(ledger, P).total_tokens, window_of(ledger, P).bonus_tokens) == (50, 0)
        assert ledger.bonus == BonusUsage()


# --- apply_usage: determinism and retention ---------------------------------------------


def test_apply_usage_judges_by_the_event_time_not_the_clock():
    # A grant that expired decades before any clock that runs this test.
    grant = _grant(credits=10, created_at=1_000_000_000_000, days=7)
    at_ms = grant.created_at + DAY_MS
    period = f"5h-{at_ms // WINDOW_MS}"
    ledger = _ledger()
    apply_usage(ledger, _user(welcome_bonus=grant), 1, at_ms, [UsageEntry("u1", period, 4, 0)])
    assert window_of(ledger, period).bonus_tokens == 4
    assert window_of(ledger, period).last_updated == at_ms


def test_same_inputs_give_the_same_ledger():
    grant = _grant(credits=25)
    user = _user(welcome_bonus=grant)
    stored = msgspec.json.encode(_ledger(_window(period="5h-98567", messages=9), bonus=BonusUsage(used=5, grant_created_at=grant.created_at)))
    entries = [UsageEntry("u1", P, 15, 10), UsageEntry("u1", "5h-98567", 1, 1)]
    results = []
    for _ in range(2):
        ledger = msgspec.json.decode(stored, type=UsageLedger)
        apply_usage(ledger, user, 3, NOW, entries)
        results.append(_snapshot(ledger))
    assert results[0] == results[1]


def test_windows_older_than_the_ttl_are_dropped_when_applying():
    assert USAGE_TTL_MS == 30 * DAY_MS
    stale = f"5h-{(NOW - 31 * DAY_MS) // WINDOW_MS}"
    kept = f"5h-{(NOW - 29 * DAY_MS) // WINDOW_MS}"
    ledger = _ledger(_window(period=stale, messages=1), _window(period=kept, messages=2))
    apply_usage(ledger, _user(), 1, NOW, [UsageEntry("u1", P, 3, 0)])
    assert [w.period for w in ledger.windows] == [kept, P]


def test_windows_stay_sorted_oldest_first_by_window_number():
    at_ms = 100_000 * WINDOW_MS + HOUR_MS
    ledger = _ledger(_window(period="5h-99999", messages=1))
    entries = [UsageEntry("u1", "5h-100000", 1, 0), UsageEntry("u1", "5h-99998", 1, 0)]
    apply_usage(ledger, _user(), 1, at_ms, entries)
    assert [w.period for w in ledger.windows] == ["5h-99998", "5h-99999", "5h-100000"]


# --- quota_answer -----------------------------------------------------------------------


def test_quota_is_allowed_while_the_current_window_total_is_below_the_limit():
    assert quota_answer(_ledger(_window(messages=999)), _user(), FREE, NOW).allowed is True
    answer = quota_answer(_ledger(_window(messages=1000)), _user(), FREE, NOW)
    assert answer.allowed is False
    assert answer.exceeded is not None


def test_quota_is_allowed_past_the_limit_while_the_bonus_has_credits_left():
    grant = _grant(credits=100)
    ledger = _ledger(_window(messages=5000), bonus=BonusUsage(used=99, grant_created_at=grant.created_at))
    assert quota_answer(ledger, _user(welcome_bonus=grant), FREE, NOW).allowed is True
    ledger.bonus = BonusUsage(used=100, grant_created_at=grant.created_at)
    assert quota_answer(ledger, _user(welcome_bonus=grant), FREE, NOW).allowed is False


def test_the_per_user_override_replaces_the_tier_limit():
    assert quota_answer(_ledger(_window(messages=1500)), _user(credits_per_window=2000), FREE, NOW).allowed is True
    answer = quota_answer(_ledger(_window(messages=5)), _user(credits_per_window=5), FREE, NOW)
    assert answer.allowed is False
    assert answer.exceeded.limit == 5


def test_a_limit_of_minus_one_is_unlimited_from_the_tier_or_the_override():
    ledger = _ledger(_window(messages=10_000_000))
    assert quota_answer(ledger, _user(), UNLIMITED_TIER, NOW).allowed is True
    assert quota_answer(ledger, _user(credits_per_window=-1), FREE, NOW).allowed is True


def test_an_unknown_user_or_tier_is_allowed():
    ledger = _ledger(_window(messages=10_000_000))
    assert quota_answer(ledger, None, FREE, NOW).allowed is True
    assert quota_answer(ledger, _user(), None, NOW).allowed is True


def test_exceeded_has_the_window_usage_limit_period_and_next_window_start():
    answer = quota_answer(_ledger(_window(messages=700, duration=400)), _user(), FREE, NOW)
    exceeded = answer.exceeded
    assert (exceeded.usage, exceeded.limit, exceeded.period) == (1100, 1000, P)
    assert exceeded.resets_at == "2026-03-23T05:00:00.000Z"


def test_exceeded_for_a_user_with_a_grant_has_the_extra_quota_fields():
    grant = _grant(credits=100)
    ledger = _ledger(_window(messages=1000), bonus=BonusUsage(used=100, grant_created_at=grant.created_at))
    exceeded = quota_answer(ledger, _user(welcome_bonus=grant), FREE, NOW).exceeded
    assert (exceeded.extra_quota_used, exceeded.extra_quota_limit) == (100, 100)
    assert exceeded.extra_quota_expires_at == iso_ms(grant.expires_at) == "2026-03-29T02:00:00.000Z"


def test_exceeded_extra_quota_used_of_an_older_grants_counter_is_zero():
    grant = _grant(credits=100, created_at=NOW - 8 * DAY_MS)
    ledger = _ledger(_window(messages=1000), bonus=BonusUsage(used=60, grant_created_at=grant.created_at - 1))
    exceeded = quota_answer(ledger, _user(welcome_bonus=grant), FREE, NOW).exceeded
    assert (exceeded.extra_quota_used, exceeded.extra_quota_limit) == (0, 100)


def test_exceeded_for_a_user_without_a_grant_has_no_extra_quota_fields():
    exceeded = quota_answer(_ledger(_window(messages=1000)), _user(), FREE, NOW).exceeded
    encoded = msgspec.json.decode(msgspec.json.encode(exceeded))
    assert encoded == {
        "type": "quota_exceeded",
        "usage": 1000,
        "limit": 1000,
        "period": P,
        "resets_at": "2026-03-23T05:00:00.000Z",
    }
    assert not any(key.startswith("extra_quota") for key in encoded)


def test_usage_in_the_previous_window_does_not_count_in_the_next_window():
    ledger = _ledger(_window(messages=5000))
    assert quota_answer(ledger, _user(), FREE, T_98568 + WINDOW_MS - 1).allowed is False
    assert quota_answer(ledger, _user(), FREE, T_98568 + WINDOW_MS).allowed is True


# --- edge/meter.py ----------------------------------------------------------------------


def _meter(**fields) -> UsageMeter:
    base = {"edge_id": "e1", "boot_id": "b1", "session_ms_per_credit": 30_000}
    base.update(fields)
    return UsageMeter(**base)


def _credits(batch) -> dict[tuple[str, str], tuple[int, int]]:
    return {(e.user_id, e.period): (e.message_tokens, e.duration_tokens) for e in batch.entries}


def _every_batch(meter: UsageMeter, now: int) -> list:
    """Every batch the meter has, each acknowledged as it comes."""
    batches = []
    while (batch := meter.next_batch(now)) is not None:
        batches.append(batch)
        meter.acknowledged(batch)
    return batches


def test_charged_messages_accumulate_per_user():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.charge_messages("u2", 1)
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    credits = {}
    for batch in _every_batch(meter, NOW):
        credits.update(_credits(batch))
    assert credits == {("u1", P): (2, 0), ("u2", P): (1, 0)}


def test_a_batch_holds_the_users_of_one_usage_partition_and_says_which():
    meter = _meter()
    users = [f"user{i}" for i in range(200)]
    for user in users:
        meter.charge_messages(user, 1)
    meter.tick(NOW)
    batches = _every_batch(meter, NOW)
    assert len({b.partition for b in batches}) == len(batches) == USAGE_PARTITIONS  # 200 users fill all 16
    for batch in batches:
        assert {usage_partition(e.user_id) for e in batch.entries} == {batch.partition}
    assert sorted(e.user_id for b in batches for e in b.entries) == sorted(users)
    assert [b.seq for b in batches] == list(range(1, len(batches) + 1))


def test_the_first_tick_closes_the_interval_into_the_window_of_now():
    meter = _meter()
    meter.charge_messages("u1", 3)
    meter.tick(T_98568 + WINDOW_MS)
    assert _credits(meter.next_batch(T_98568 + WINDOW_MS)) == {("u1", "5h-98569"): (3, 0)}


def test_a_tick_closes_the_interval_into_the_window_it_began_in():
    meter = _meter()
    meter.tick(T_98568 + WINDOW_MS - 10)
    meter.charge_messages("u1", 3)
    meter.tick(T_98568 + WINDOW_MS + 5)
    meter.charge_messages("u1", 4)
    meter.tick(T_98568 + WINDOW_MS + 10)
    assert _credits(meter.next_batch(T_98568 + WINDOW_MS + 10)) == {("u1", P): (3, 0), ("u1", "5h-98569"): (4, 0)}


def test_session_time_becomes_whole_duration_credits_and_the_rest_is_carried():
    meter = _meter()
    meter.add_session_time("u1", 75_000)
    meter.tick(NOW)
    assert _credits(meter.next_batch(NOW)) == {("u1", P): (0, 2)}
    meter.acknowledged(meter.next_batch(NOW))
    meter.add_session_time("u1", 20_000)
    meter.tick(NOW + 1)
    assert _credits(meter.next_batch(NOW + 1)) == {("u1", P): (0, 1)}


def test_session_time_is_never_rounded_up():
    meter = _meter()
    meter.add_session_time("u1", 29_999.9)
    meter.tick(NOW)
    assert meter.next_batch(NOW) is None
    meter.add_session_time("u1", 0.1)
    meter.tick(NOW + 1)
    assert _credits(meter.next_batch(NOW + 1)) == {("u1", P): (0, 1)}


def test_next_batch_is_none_when_nothing_is_pending():
    meter = _meter()
    assert meter.next_batch(NOW) is None
    meter.charge_messages("u1", 1)
    assert meter.next_batch(NOW) is None
    meter.tick(NOW)
    assert meter.next_batch(NOW) is not None


def test_a_batch_has_the_edge_boot_seal_time_and_a_msg_id_of_them_and_seq():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    batch = meter.next_batch(NOW + 7)
    assert (batch.edge_id, batch.boot_id, batch.seq, batch.at_ms) == ("e1", "b1", 1, NOW + 7)
    assert batch.msg_id == "e1.b1.1"


def test_an_unacknowledged_batch_is_offered_again_with_the_same_msg_id():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    first = meter.next_batch(NOW)
    again = meter.next_batch(NOW + 1000)
    assert again is first
    assert again.msg_id == first.msg_id
    assert again.at_ms == NOW


def test_after_acknowledgement_a_new_batch_gets_the_next_seq():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    first = meter.next_batch(NOW)
    meter.acknowledged(first)
    assert meter.next_batch(NOW) is None
    meter.charge_messages("u1", 1)
    meter.tick(NOW + 1)
    second = meter.next_batch(NOW + 1)
    assert second.seq == first.seq + 1
    assert second.msg_id == "e1.b1.2"


def test_acknowledging_a_batch_that_is_not_in_flight_changes_nothing():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    first = meter.next_batch(NOW)
    meter.acknowledged(first)
    meter.charge_messages("u1", 1)
    meter.tick(NOW + 1)
    second = meter.next_batch(NOW + 1)
    meter.acknowledged(first)
    assert meter.next_batch(NOW + 2) is second


def test_max_entries_caps_a_batch_and_the_rest_come_in_the_next():
    meter = _meter(max_entries=2)
    users = [u for u in (f"u{i}" for i in range(1000)) if usage_partition(u) == 5][:3]  # one partition's
    for user in users:
        meter.charge_messages(user, 1)
    meter.tick(NOW)
    first = meter.next_batch(NOW)
    assert len(first.entries) == 2
    meter.acknowledged(first)
    second = meter.next_batch(NOW)
    assert len(second.entries) == 1
    assert {e.user_id for e in first.entries + second.entries} == set(users)
    assert first.partition == second.partition == 5
    meter.acknowledged(second)
    assert meter.next_batch(NOW) is None


def test_unpublished_credits_counts_open_pending_and_in_flight_credits():
    meter = _meter(max_entries=1)
    meter.charge_messages("u1", 2)
    meter.add_session_time("u1", 60_000)
    meter.charge_messages("u2", 3)
    meter.tick(NOW)
    meter.next_batch(NOW)
    meter.charge_messages("u3", 5)
    assert meter.unpublished_credits() == 2 + 2 + 3 + 5
    meter.acknowledged(meter.next_batch(NOW))
    assert meter.unpublished_credits() == 3 + 5


def test_usage_charged_after_a_batch_was_sealed_goes_into_a_later_batch_exactly_once():
    meter = _meter()
    meter.charge_messages("u1", 1)
    meter.tick(NOW)
    first = meter.next_batch(NOW)
    meter.charge_messages("u1", 10)
    meter.tick(NOW + 1)
    assert meter.next_batch(NOW + 1) is first
    assert _credits(first) == {("u1", P): (1, 0)}
    meter.acknowledged(first)
    second = meter.next_batch(NOW + 2)
    assert _credits(second) == {("u1", P): (10, 0)}
    meter.acknowledged(second)
    assert meter.next_batch(NOW + 3) is None
    assert meter.unpublished_credits() == 0


@pytest.mark.parametrize("credits_used", [0, 999])
def test_a_meters_batches_applied_to_a_ledger_decide_the_quota(credits_used):
    meter = _meter()
    meter.charge_messages("u1", credits_used)
    meter.add_session_time("u1", 30_000)
    meter.tick(NOW)
    batch = meter.next_batch(NOW)
    ledger = _ledger()
    apply_usage(ledger, _user(), 1, batch.at_ms, batch.entries)
    assert window_of(ledger, P).total_tokens == credits_used + 1
    assert quota_answer(ledger, _user(), FREE, NOW).allowed is (credits_used + 1 < 1000)


def test_a_group_of_batches_applied_at_once_gives_the_ledger_of_applying_them_one_at_a_time():
    import random

    rng = random.Random(7)
    grant = _grant(credits=50)
    user = _user(welcome_bonus=grant)
    for _ in range(50):
        batches = []
        seq = rng.randint(1, 5)
        for _ in range(rng.randint(1, 12)):
            seq += rng.randint(1, 3)
            at = NOW + rng.randint(-WINDOW_MS, WINDOW_MS)
            entries = [UsageEntry("u1", f"5h-{98568 + rng.randint(-1, 1)}", rng.randint(0, 20), rng.randint(0, 3)) for _ in range(rng.randint(1, 3))]
            batches.append((seq, at, entries))
        start = _ledger(_window(messages=rng.randint(0, 5)))
        start.partitions = {"metering-p02": rng.randint(0, 8)}
        one_by_one = msgspec.json.decode(msgspec.json.encode(start), type=UsageLedger)
        applied = sum(apply_usage(one_by_one, user, s, at, e, partition=2) for s, at, e in batches)
        grouped = msgspec.json.decode(msgspec.json.encode(start), type=UsageLedger)
        assert apply_batches(grouped, user, batches, partition=2) == applied
        assert msgspec.json.encode(grouped) == msgspec.json.encode(one_by_one)
