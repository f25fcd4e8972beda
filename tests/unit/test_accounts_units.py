"""Pure rules of accounts, abuse limits and metering: no NATS, no clock (times are passed in)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import msgspec
import pytest

from accounts import tokens
from edge.protocol.limits import FailedAuthLimiter, TokenBucket
from metering.usage import bonus_remaining, effective_limit, history_report, usage_report
from metering.windows import WINDOW_MS, iso_ms, period_label, period_of, period_start_ms, resets_at, window_index
from schemas.records import BonusUsage, UsageWindow, User, WelcomeBonus
from schemas.tiers import DEFAULT_TIERS, UNLIMITED, Tier, TierFileError, load_tiers

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# 2026-03-23T00:00:00Z, the start of window 5h-98568 (protocol.md §6.2).
T_98568 = 98568 * WINDOW_MS


def _as_json(body):
    """A report as the edge sends it: the Struct encoded to JSON and read back."""
    return msgspec.json.decode(msgspec.json.encode(body))


# --- accounts/tokens.py -----------------------------------------------------------------


def test_api_key_is_rdkey_and_32_lowercase_hex():
    key = tokens.new_api_key()
    assert re.fullmatch(r"rdkey_[0-9a-f]{32}", key)
    assert tokens.is_api_key(key)


def test_refresh_token_is_rdrt_and_128_lowercase_hex():
    token = tokens.new_refresh_token()
    assert re.fullmatch(r"rdrt_[0-9a-f]{128}", token)
    assert tokens.is_refresh_token(token)


def test_new_keys_and_tokens_are_unique():
    assert len({tokens.new_api_key() for _ in range(50)}) == 50
    assert len({tokens.new_refresh_token() for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "text",
    [
        "rdrt_" + "a" * 32,  # wrong prefix
        "rdkey" + "a" * 32,  # prefix without underscore
        "RDKEY_" + "a" * 32,  # prefix in capitals
        "rdkey_" + "a" * 31,  # too short
        "rdkey_" + "a" * 33,  # too long
        "rdkey_" + "A" * 32,  # uppercase hex
        "rdkey_" + "g" * 32,  # not hex
        "rdkey_" + "a" * 32 + "\n",  # trailing newline
        " rdkey_" + "a" * 32,  # leading space
        "",
    ],
)
def test_is_api_key_rejects_malformed_text(text):
    assert not tokens.is_api_key(text)


@pytest.mark.parametrize(
    "text",
    [
        "rdkey_" + "a" * 128,  # wrong prefix
        "rdrt_" + "a" * 127,  # too short
        "rdrt_" + "a" * 129,  # too long
        "rdrt_" + "A" * 128,  # uppercase hex
        "rdrt_" + "a" * 128 + "\n",  # trailing newline
        "rdrt_" + "a" * 32,  # the length of an API key
        "",
    ],
)
def test_is_refresh_token_rejects_malformed_text(text):
    assert not tokens.is_refresh_token(text)


def test_an_api_key_is_not_a_refresh_token_and_vice_versa():
    assert not tokens.is_refresh_token(tokens.new_api_key())
    assert not tokens.is_api_key(tokens.new_refresh_token())


def test_token_hash_is_sha256_hex_of_the_text():
    key = tokens.new_api_key()
    assert tokens.token_hash(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", tokens.token_hash(key))
    assert tokens.token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_token_hash_differs_per_token():
    assert tokens.token_hash(tokens.new_api_key()) != tokens.token_hash(tokens.new_api_key())


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme):
    assert tokens.bearer_token(f"{scheme} rdkey_abc") == "rdkey_abc"


def test_bearer_token_surrounding_whitespace_is_stripped():
    assert tokens.bearer_token("  Bearer   tok123  ") == "tok123"


@pytest.mark.parametrize("header", [None, "", "   ", "Bearer", "Bearer ", "Bearer    ", "bearer\t"])
def test_bearer_with_missing_or_empty_token_is_none(header):
    assert tokens.bearer_token(header) is None


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Token abc", "Bearerabc", "Digest x=1", "abc"])
def test_bearer_token_of_other_schemes_is_none(header):
    assert tokens.bearer_token(header) is None


def test_same_secret_is_true_only_for_equal_text():
    key = tokens.new_api_key()
    assert tokens.same_secret(key, str(key))
    assert tokens.same_secret(tokens.token_hash(key), tokens.token_hash(key))
    assert not tokens.same_secret(key, key[:-1])
    assert not tokens.same_secret(key, tokens.new_api_key())
    assert not tokens.same_secret("abc", "ABC")
    assert tokens.same_secret("", "")


# --- schemas/tiers.py --------------------------------------------------------------------


def test_default_tiers_equal_the_protocol_values():
    assert DEFAULT_TIERS["free"] == Tier("free", credits_per_window=1000, max_rooms=4, max_sessions=4)
    assert DEFAULT_TIERS["pro"] == Tier("pro", credits_per_window=10_000, max_rooms=32, max_sessions=16)
    assert DEFAULT_TIERS["premium"] == Tier("premium", credits_per_window=50_000, max_rooms=32, max_sessions=-1)
    assert set(DEFAULT_TIERS) == {"free", "pro", "premium"}
    assert UNLIMITED == -1


@pytest.mark.parametrize("path", [None, ""])
def test_load_tiers_without_a_file_gives_the_defaults(path):
    tiers = load_tiers(path)
    assert tiers == dict(DEFAULT_TIERS)


def test_load_tiers_returns_a_copy_not_the_defaults_themselves():
    tiers = load_tiers(None)
    tiers["free"] = Tier("free", 1, 1, 1)
    assert DEFAULT_TIERS["free"].credits_per_window == 1000


def _tiers_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def test_tiers_file_overriding_one_field_of_a_builtin_tier_keeps_the_others(tmp_path):
    tiers = load_tiers(_tiers_file(tmp_path, "[tiers.free]\ncredits_per_window = 2000\n"))
    assert tiers["free"] == Tier("free", credits_per_window=2000, max_rooms=4, max_sessions=4)
    assert tiers["pro"] == DEFAULT_TIERS["pro"]
    assert tiers["premium"] == DEFAULT_TIERS["premium"]
    assert DEFAULT_TIERS["free"].credits_per_window == 1000  # the defaults are untouched


def test_tiers_file_accepts_a_str_path(tmp_path):
    tiers = load_tiers(str(_tiers_file(tmp_path, "[tiers.pro]\nmax_sessions = -1\n")))
    assert tiers["pro"] == Tier("pro", credits_per_window=10_000, max_rooms=32, max_sessions=-1)


def test_tiers_file_can_add_a_new_tier_with_all_fields(tmp_path):
    text = "[tiers.team]\ncredits_per_window = -1\nmax_rooms = 100\nmax_sessions = -1\n"
    tiers = load_tiers(_tiers_file(tmp_path, text))
    assert tiers["team"] == Tier("team", credits_per_window=-1, max_rooms=100, max_sessions=-1)
    assert {"free", "pro", "premium", "team"} <= set(tiers)


@pytest.mark.parametrize("missing", ["credits_per_window", "max_rooms", "max_sessions"])
def test_new_tier_missing_a_field_is_an_error_naming_the_field(tmp_path, missing):
    fields = {"credits_per_window": 5, "max_rooms": 6, "max_sessions": 7}
    del fields[missing]
    text = "[tiers.team]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items())
    with pytest.raises(TierFileError) as err:
        load_tiers(_tiers_file(tmp_path, text))
    assert missing in str(err.value)
    assert "team" in str(err.value)


def test_tiers_file_unknown_field_is_an_error_naming_it(tmp_path):
    with pytest.raises(TierFileError, match="unknown fields.*max_room"):
        load_tiers(_tiers_file(tmp_path, "[tiers.free]\nmax_room = 3\n"))


@pytest.mark.parametrize("value", ["-2", "-100"])
def test_tiers_file_value_below_minus_one_is_an_error(tmp_path, value):
    with pytest.raises(TierFileError, match=r"tiers\.free\.max_rooms must be an integer >= -1"):
        load_tiers(_tiers_file(tmp_path, f"[tiers.free]\nmax_rooms = {value}\n"))


def test_tiers_file_minus_one_and_zero_are_accepted(tmp_path):
    tiers = load_tiers(_tiers_file(tmp_path, "[tiers.free]\nmax_rooms = -1\nmax_sessions = 0\n"))
    assert tiers["free"] == Tier("free", credits_per_window=1000, max_rooms=-1, max_sessions=0)


def test_tiers_file_credits_per_window_zero_is_an_error_since_clients_read_0_as_unlimited(tmp_path):
    with pytest.raises(TierFileError, match="positive or -1"):
        load_tiers(_tiers_file(tmp_path, "[tiers.free]\ncredits_per_window = 0\n"))


@pytest.mark.parametrize("value", ["true", "false"])
def test_tiers_file_bool_value_is_an_error(tmp_path, value):
    with pytest.raises(TierFileError, match="must be an integer"):
        load_tiers(_tiers_file(tmp_path, f"[tiers.free]\nmax_sessions = {value}\n"))


@pytest.mark.parametrize("value", ["1.5", '"10"', "[1]"])
def test_tiers_file_non_integer_value_is_an_error(tmp_path, value):
    with pytest.raises(TierFileError, match="must be an integer"):
        load_tiers(_tiers_file(tmp_path, f"[tiers.free]\ncredits_per_window = {value}\n"))


def test_tiers_file_tier_that_is_not_a_table_is_an_error(tmp_path):
    with pytest.raises(TierFileError, match=r"tiers\.free must be a table"):
        load_tiers(_tiers_file(tmp_path, "[tiers]\nfree = 5\n"))


@pytest.mark.parametrize("text", ["tiers = 5\n", "[other]\nx = 1\n", ""])
def test_tiers_file_without_a_tiers_table_is_an_error(tmp_path, text):
    with pytest.raises(TierFileError, match=r"needs a \[tiers\.<name>\] table"):
        load_tiers(_tiers_file(tmp_path, text))


def test_tiers_file_invalid_toml_is_an_error(tmp_path):
    path = _tiers_file(tmp_path, "[tiers.free\ncredits_per_window = = 2\n")
    with pytest.raises(TierFileError, match="is not valid TOML") as err:
        load_tiers(path)
    assert str(path) in str(err.value)


def test_tiers_file_missing_is_an_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(TierFileError, match="cannot read tiers file") as err:
        load_tiers(path)
    assert str(path) in str(err.value)


def test_tier_file_error_is_a_value_error():
    assert issubclass(TierFileError, ValueError)


def test_tier_allows_another_room_below_max_rooms_only():
    tier = Tier("t", credits_per_window=1, max_rooms=2, max_sessions=1)
    assert tier.allows_another_room(0)
    assert tier.allows_another_room(1)
    assert not tier.allows_another_room(2)
    assert not tier.allows_another_room(3)


def test_tier_with_max_rooms_minus_one_allows_any_number_of_rooms():
    tier = Tier("t", credits_per_window=1, max_rooms=UNLIMITED, max_sessions=1)
    assert tier.allows_another_room(0)
    assert tier.allows_another_room(1_000_000)


def test_tier_with_max_rooms_zero_allows_no_room():
    assert not Tier("t", credits_per_window=1, max_rooms=0, max_sessions=1).allows_another_room(0)


# --- edge/protocol/limits.py------------------------------------------------------------------


def test_failed_auth_limiter_allows_up_to_max_failures_within_the_window():
    limiter = FailedAuthLimiter(max_failures=3, window_s=60)
    for t in (0.0, 1.0):
        assert limiter.retry_after("1.2.3.4", t) == 0
        limiter.failed("1.2.3.4", t)
    assert limiter.retry_after("1.2.3.4", 2.0) == 0  # two failures: a third try is allowed
    limiter.failed("1.2.3.4", 2.0)
    # Three failures within 60 s: blocked until the first of them is 60 s old.
    assert limiter.retry_after("1.2.3.4", 3.0) == pytest.approx(57.0)
    assert limiter.retry_after("1.2.3.4", 59.5) == pytest.approx(0.5)


def test_failed_auth_limiter_allows_again_once_the_window_has_passed():
    limiter = FailedAuthLimiter(max_failures=2, window_s=10)
    limiter.failed("a", 100.0)
    limiter.failed("a", 105.0)
    assert limiter.retry_after("a", 106.0) == pytest.approx(4.0)
    assert limiter.retry_after("a", 110.0) == 0  # the first failure is 10 s old: out of the window
    limiter.failed("a", 110.0)  # one more failure: two within the window again
    assert limiter.retry_after("a", 111.0) == pytest.approx(4.0)  # the 105 one leaves at 115
    assert limiter.retry_after("a", 200.0) == 0


def test_failed_auth_limiter_counts_each_address_on_its_own():
    limiter = FailedAuthLimiter(max_failures=1, window_s=30)
    limiter.failed("a", 0.0)
    assert limiter.retry_after("a", 1.0) == pytest.approx(29.0)
    assert limiter.retry_after("b", 1.0) == 0
    limiter.failed("b", 10.0)
    assert limiter.retry_after("b", 11.0) == pytest.approx(29.0)
    assert limiter.retry_after("a", 11.0) == pytest.approx(19.0)


def test_failed_auth_limiter_with_max_failures_zero_never_limits():
    limiter = FailedAuthLimiter(max_failures=0, window_s=60)
    for t in range(100):
        limiter.failed("a", float(t))
    assert limiter.retry_after("a", 100.0) == 0
    assert len(limiter._failures) == 0  # nothing is even remembered


def test_failed_auth_limiter_forgets_the_oldest_addresses_past_its_memory_bound():
    limiter = FailedAuthLimiter(max_failures=1, window_s=1000, max_tracked=3)
    for i, address in enumerate(["a", "b", "c"]):
        limiter.failed(address, float(i))
    assert all(limiter.retry_after(a, 5.0) > 0 for a in "abc")
    limiter.failed("d", 6.0)
    limiter.failed("e", 7.0)
    # Only the three most recent addresses are remembered: a and b are forgotten (allowed again).
    assert limiter.retry_after("a", 8.0) == 0
    assert limiter.retry_after("b", 8.0) == 0
    assert all(limiter.retry_after(a, 8.0) > 0 for a in "cde")
    assert len(limiter._failures) == 3


def test_failed_auth_limiter_memory_bound_keeps_recently_failing_addresses():
    limiter = FailedAuthLimiter(max_failures=2, window_s=1000, max_tracked=2)
    limiter.failed("a", 0.0)
    limiter.failed("b", 1.0)
    limiter.failed("a", 2.0)  # a failed again: now b is the oldest
    limiter.failed("c", 3.0)
    assert limiter.retry_after("a", 4.0) > 0
    assert "b" not in limiter._failures
    assert len(limiter._failures) == 2


def test_token_bucket_allows_a_burst_then_refuses():
    bucket = TokenBucket(rate_per_s=1, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.5)


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate_per_s=2, burst=4)
    assert all(bucket.take(10.0) for _ in range(4))
    assert not bucket.take(10.0)
    assert bucket.take(10.5)  # 0.5 s at 2/s: one token
    assert not bucket.take(10.5)
    assert [bucket.take(11.5) for _ in range(3)] == [True, True, False]


def test_token_bucket_refill_never_exceeds_the_burst():
    bucket = TokenBucket(rate_per_s=10, burst=2)
    assert bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]


def test_token_bucket_with_rate_zero_is_unlimited():
    bucket = TokenBucket(rate_per_s=0, burst=1)
    assert all(bucket.take(0.0) for _ in range(10_000))


# --- metering/windows.py ----------------------------------------------------------------


def test_window_index_is_floor_of_epoch_ms_over_five_hours():
    assert WINDOW_MS == 5 * HOUR_MS
    assert window_index(0) == 0
    assert window_index(WINDOW_MS - 1) == 0
    assert window_index(WINDOW_MS) == 1
    assert window_index(T_98568) == 98568
    assert window_index(T_98568 + WINDOW_MS - 1) == 98568


def test_period_of_is_5h_dash_window_index():
    assert period_of(T_98568) == "5h-98568"
    assert period_of(T_98568 + 4 * HOUR_MS) == "5h-98568"
    assert period_of(T_98568 + WINDOW_MS) == "5h-98569"
    assert period_of(0) == "5h-0"


def test_protocol_example_5h_98568_starts_2026_03_23_and_resets_5_hours_later():
    assert iso_ms(period_start_ms("5h-98568")) == "2026-03-23T00:00:00.000Z"
    assert resets_at(T_98568) == "2026-03-23T05:00:00.000Z"
    assert resets_at(T_98568 + WINDOW_MS - 1) == "2026-03-23T05:00:00.000Z"
    assert resets_at(T_98568 + WINDOW_MS) == "2026-03-23T10:00:00.000Z"


def test_protocol_example_5h_96742_starts_2025_03_07_at_14():
    assert iso_ms(period_start_ms("5h-96742")) == "2025-03-07T14:00:00.000Z"
    assert period_of(period_start_ms("5h-96742")) == "5h-96742"


def test_iso_ms_has_milliseconds_and_z():
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1234) == "1970-01-01T00:00:01.234Z"
    assert iso_ms(T_98568 + 7) == "2026-03-23T00:00:00.007Z"
    assert iso_ms(T_98568 + 999) == "2026-03-23T00:00:00.999Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", iso_ms(1_774_250_123_456))


def test_period_label_is_month_day_and_hours_with_an_en_dash():
    assert period_label("5h-96742") == "Mar 7, 14:00 \u2013 19:00 UTC"
    assert period_label("5h-96746") == "Mar 8, 10:00 \u2013 15:00 UTC"  # protocol.md's example
    assert period_label("5h-98568") == "Mar 23, 00:00 \u2013 05:00 UTC"


def test_period_label_of_a_window_crossing_midnight_names_its_start_day():
    # 5h-96748 runs from Mar 8, 20:00 to Mar 9, 01:00.
    assert iso_ms(period_start_ms("5h-96748")) == "2025-03-08T20:00:00.000Z"
    assert period_label("5h-96748") == "Mar 8, 20:00 \u2013 01:00 UTC"
    assert period_label("5h-96749") == "Mar 9, 01:00 \u2013 06:00 UTC"


# --- metering/usage.py ------------------------------------------------------------------

FREE = DEFAULT_TIERS["free"]
NOW = T_98568 + 2 * HOUR_MS  # inside 5h-98568


def _user(**fields) -> User:
    base = {"user_id": "u1", "email": "u1@example.com", "tier": "free", "created_at": NOW - DAY_MS}
    base.update(fields)
    return User(**base)


def _bonus(credits: int = 10_000, created_at: int = NOW - DAY_MS, days: int = 7) -> WelcomeBonus:
    return WelcomeBonus(credits=credits, created_at=created_at, expires_at=created_at + days * DAY_MS)


def test_effective_limit_is_the_tier_limit_without_override():
    assert effective_limit(_user(), FREE) == 1000
    assert effective_limit(_user(), DEFAULT_TIERS["premium"]) == 50_000


def test_effective_limit_override_wins_over_the_tier():
    assert effective_limit(_user(credits_per_window=5), FREE) == 5
    assert effective_limit(_user(credits_per_window=123_456), FREE) == 123_456


def test_effective_limit_override_zero_wins_too():
    assert effective_limit(_user(credits_per_window=0), FREE) == 0


def test_effective_limit_minus_one_is_unlimited_from_override_or_tier():
    assert effective_limit(_user(credits_per_window=-1), FREE) == -1
    assert effective_limit(_user(), Tier("x", credits_per_window=-1, max_rooms=1, max_sessions=1)) == -1


def test_bonus_remaining_is_credits_minus_used_for_the_same_grant():
    grant = _bonus(credits=10_000)
    user = _user(welcome_bonus=grant)
    assert bonus_remaining(user, BonusUsage(), NOW) == 10_000
    assert bonus_remaining(user, BonusUsage(used=2500, grant_created_at=grant.created_at), NOW) == 7500


def test_bonus_remaining_without_a_grant_is_zero():
    assert bonus_remaining(_user(), BonusUsage(used=5, grant_created_at=1), NOW) == 0


def test_bonus_remaining_once_expired_is_zero():
    grant = _bonus(created_at=NOW - 8 * DAY_MS, days=7)
    assert bonus_remaining(_user(welcome_bonus=grant), BonusUsage(), NOW) == 0
    # Exactly at expires_at it is expired already.
    grant = _bonus(created_at=NOW - 7 * DAY_MS, days=7)
    assert grant.expires_at == NOW
    assert bonus_remaining(_user(welcome_bonus=grant), BonusUsage(), NOW) == 0
    assert bonus_remaining(_user(welcome_bonus=grant), BonusUsage(), NOW - 1) == 10_000


def test_bonus_counter_for_another_grants_created_at_counts_as_zero():
    grant = _bonus(credits=10_000)
    stale = BonusUsage(used=9_000, grant_created_at=grant.created_at - 1)
    assert bonus_remaining(_user(welcome_bonus=grant), stale, NOW) == 10_000


def test_bonus_remaining_is_never_negative():
    grant = _bonus(credits=100)
    over = BonusUsage(used=150, grant_created_at=grant.created_at)
    assert bonus_remaining(_user(welcome_bonus=grant), over, NOW) == 0


def _window(total: int = 0, period: str = "5h-98568", **fields) -> UsageWindow:
    return UsageWindow(user_id="u1", period=period, total_tokens=total, **fields)


def test_usage_report_has_the_protocol_fields_for_the_window():
    window = _window(total=300, message_tokens=200, duration_tokens=100, last_updated=NOW - 5)
    report = _as_json(usage_report(_user(), FREE, window, BonusUsage(), NOW))
    assert report == {
        "user_id": "u1",
        "tier": "free",
        "period": "5h-98568",
        "period_label": "Mar 23, 00:00 \u2013 05:00 UTC",
        "message_tokens": 200,
        "duration_tokens": 100,
        "total_tokens": 300,
        "limit": 1000,
        "remaining": 700,
        "last_updated": NOW - 5,
        "resets_at": "2026-03-23T05:00:00.000Z",
    }


def test_usage_report_remaining_is_never_negative():
    report = _as_json(usage_report(_user(), FREE, _window(total=2975), BonusUsage(), NOW))
    assert report["limit"] == 1000
    assert report["remaining"] == 0


def test_usage_report_uses_the_override_limit():
    report = _as_json(usage_report(_user(credits_per_window=50), FREE, _window(total=20), BonusUsage(), NOW))
    assert (report["limit"], report["remaining"]) == (50, 30)


@pytest.mark.parametrize("unlimited_user", [{"credits_per_window": -1}, {"tier": "premium-unlimited"}])
def test_usage_report_unlimited_has_limit_0_and_remaining_0(unlimited_user):
    tier = Tier("premium-unlimited", credits_per_window=-1, max_rooms=1, max_sessions=1)
    user = _user(**unlimited_user)
    report = _as_json(usage_report(user, tier if "tier" in unlimited_user else FREE, _window(total=12_345), BonusUsage(), NOW))
    assert report["limit"] == 0
    assert report["remaining"] == 0
    assert report["total_tokens"] == 12_345


def test_usage_report_has_no_extra_quota_without_a_welcome_bonus():
    assert "extra_quota" not in _as_json(usage_report(_user(), FREE, _window(), BonusUsage(), NOW))


def test_usage_report_extra_quota_of_an_active_bonus():
    grant = _bonus(credits=10_000)
    used = BonusUsage(used=1_000, grant_created_at=grant.created_at)
    report = _as_json(usage_report(_user(welcome_bonus=grant), FREE, _window(), used, NOW))
    assert report["extra_quota"] == {
        "active": True,
        "remaining": 9_000,
        "limit": 10_000,
        "expires_at": iso_ms(grant.expires_at),
    }
    assert report["extra_quota"]["expires_at"] == "2026-03-29T02:00:00.000Z"


def test_usage_report_extra_quota_of_an_expired_bonus_is_inactive_with_nothing_left():
    grant = _bonus(credits=10_000, created_at=NOW - 30 * DAY_MS)
    report = _as_json(usage_report(_user(welcome_bonus=grant), FREE, _window(), BonusUsage(), NOW))
    assert report["extra_quota"] == {
        "active": False,
        "remaining": 0,
        "limit": 10_000,
        "expires_at": iso_ms(grant.expires_at),
    }


def test_usage_report_extra_quota_used_up_is_inactive():
    grant = _bonus(credits=100)
    used = BonusUsage(used=100, grant_created_at=grant.created_at)
    quota = _as_json(usage_report(_user(welcome_bonus=grant), FREE, _window(), used, NOW))["extra_quota"]
    assert quota["active"] is False
    assert quota["remaining"] == 0
    assert quota["limit"] == 100


def test_history_report_includes_the_current_window_even_without_a_record():
    report = _as_json(history_report("u1", [], NOW))
    assert report == {
        "history": [
            {
                "period": "5h-98568",
                "period_label": "Mar 23, 00:00 \u2013 05:00 UTC",
                "message_tokens": 0,
                "duration_tokens": 0,
                "total_tokens": 0,
            }
        ]
    }


def test_history_report_is_newest_first_with_the_protocol_fields():
    windows = [
        _window(total=10, period="5h-98560", message_tokens=4, duration_tokens=6),
        _window(total=30, period="5h-98567", message_tokens=30),
        _window(total=20, period="5h-98100", duration_tokens=20),
    ]
    history = _as_json(history_report("u1", windows, NOW))["history"]
    assert [h["period"] for h in history] == ["5h-98568", "5h-98567", "5h-98560", "5h-98100"]
    assert all(set(h) == {"period", "period_label", "message_tokens", "duration_tokens", "total_tokens"} for h in history)
    assert history[2] == {
        "period": "5h-98560",
        "period_label": period_label("5h-98560"),
        "message_tokens": 4,
        "duration_tokens": 6,
        "total_tokens": 10,
    }
    assert history[0]["total_tokens"] == 0


def test_history_report_sorts_by_window_number_not_by_text():
    # "5h-9999" > "5h-10000" as text; the window 10000 is the newer one.
    windows = [_window(period="5h-9999"), _window(period="5h-10000")]
    periods = [h["period"] for h in _as_json(history_report("u1", windows, 10_001 * WINDOW_MS))["history"]]
    assert periods == ["5h-10001", "5h-10000", "5h-9999"]


def test_history_report_uses_the_record_of_the_current_window_when_there_is_one():
    windows = [_window(total=77, period="5h-98568", message_tokens=77)]
    history = _as_json(history_report("u1", windows, NOW))["history"]
    assert len(history) == 1
    assert history[0]["total_tokens"] == 77
    assert history[0]["message_tokens"] == 77
