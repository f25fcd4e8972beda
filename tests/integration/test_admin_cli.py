"""`relay-admin` as a real subprocess against a real nats-server (the session's `nats_url`).

Every call is bounded by a timeout. Calls that do not depend on each other run at once
(`_admin_many`), which keeps the file's runtime small.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import nats

from accounts.tokens import token_hash
from runtime.embedded_nats import EmbeddedNatsServer
from runtime.kv import present_values

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 20
ERROR_LINE = re.compile(r"relay-admin: error: \S.*")
API_KEY = re.compile(r"rdkey_[0-9a-f]{32}")
REFRESH_TOKEN = re.compile(r"rdrt_[0-9a-f]{128}")


class Result(NamedTuple):
    code: int
    out: str
    err: str


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    # No RELAY_* of the caller's shell leaks in: each test says what it means.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(extra or {})
    return env


def _command(url: str | None, args: list[str]) -> list[str]:
    flags = ["--nats-url", url] if url else []
    return [sys.executable, "-m", "accounts.admin", *flags, *args]


def _admin(url: str | None, *args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> Result:
    done = subprocess.run(
        _command(url, list(args)), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(env)
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _admin_many(url: str, *calls: tuple[str, ...], env: dict[str, str] | None = None) -> list[Result]:
    """Run independent relay-admin calls at the same time; results in the order given."""
    procs = [
        subprocess.Popen(
            _command(url, list(args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(env)
        )
        for args in calls
    ]
    results = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append(Result(proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _new_user_id() -> str:
    return f"u{secrets.token_hex(4)}"


def _assert_error(result: Result, code: int, *, mentions: str = "") -> None:
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and ERROR_LINE.fullmatch(lines[0]), result.err
    assert mentions in lines[0]
    assert "Traceback" not in result.err


def _add(url: str, user: str, tier: str = "free", env: dict[str, str] | None = None) -> dict:
    result = _admin(url, "users", "add", user, "--email", f"{user}@example.com", "--tier", tier, env=env)
    assert result.code == 0, result
    return json.loads(result.out)


# --- users ------------------------------------------------------------------------------


def test_users_add_prints_the_account_as_json_and_adding_it_again_exits_4(nats_url):
    user = _new_user_id()
    first = _admin(nats_url, "users", "add", user, "--email", f"{user}@example.com", "--tier", "pro", "--name", "Ann")
    assert first.code == 0, first
    shown = json.loads(first.out)
    bonus = shown.pop("welcome_bonus")  # the README says `users add` prints the welcome bonus
    assert shown == {
        "user_id": user,
        "email": f"{user}@example.com",
        "tier": "pro",
        "deleted": False,
        "credits_per_window": None,
    }
    assert bonus["credits"] == 10_000
    assert 6.9 * 86_400_000 < bonus["expires_at"] - time.time() * 1000 <= 7 * 86_400_000
    assert len(first.out.splitlines()) == 1
    assert first.err == ""

    again = _admin(nats_url, "users", "add", user, "--email", "other@example.com", "--tier", "free")
    _assert_error(again, 4, mentions=user)
    assert again.out == ""


def test_users_add_with_a_bad_tier_email_or_user_id_exits_2_and_creates_nothing(nats_url):
    user = _new_user_id()
    unknown_tier, bad_email, bad_id, bad_id_too_long = _admin_many(
        nats_url,
        ("users", "add", user, "--email", f"{user}@example.com", "--tier", "gold"),
        ("users", "add", user, "--email", "not-an-email", "--tier", "free"),
        ("users", "add", "bad.id", "--email", "x@example.com", "--tier", "free"),
        ("users", "add", "u" * 65, "--email", "x@example.com", "--tier", "free"),
    )
    _assert_error(unknown_tier, 2, mentions="gold")
    assert "free" in unknown_tier.err  # the known tiers are listed
    _assert_error(bad_email, 2, mentions="not-an-email")
    _assert_error(bad_id, 2, mentions="bad.id")
    _assert_error(bad_id_too_long, 2)
    # Nothing was stored: the account can now be created.
    assert _add(nats_url, user)["user_id"] == user


def test_users_set_tier_set_quota_and_delete_change_the_account(nats_url):
    user = _new_user_id()
    bonus = _add(nats_url, user)["welcome_bonus"]

    set_tier = _admin(nats_url, "users", "set-tier", user, "premium")
    assert set_tier.code == 0, set_tier
    assert json.loads(set_tier.out)["tier"] == "premium"

    set_quota = _admin(nats_url, "users", "set-quota", user, "500")
    assert set_quota.code == 0, set_quota
    assert json.loads(set_quota.out)["credits_per_window"] == 500

    # Invalid values and an unknown tier leave the account as it is (checked below).
    not_int, below_minus_one, zero, unknown_tier, unlimited_elsewhere = _admin_many(
        nats_url,
        ("users", "set-quota", user, "lots"),
        ("users", "set-quota", user, "-2"),
        ("users", "set-quota", user, "0"),  # clients would read a limit of 0 as unlimited
        ("users", "set-tier", user, "gold"),
        ("users", "set-quota", _new_user_id(), "-1"),  # unknown user
    )
    _assert_error(not_int, 2, mentions="lots")
    _assert_error(below_minus_one, 2, mentions="-2")
    _assert_error(zero, 2, mentions="'0'")
    _assert_error(unknown_tier, 2, mentions="gold")
    _assert_error(unlimited_elsewhere, 3, mentions="no such user")

    cleared = _admin(nats_url, "users", "set-quota", user, "default")
    assert cleared.code == 0, cleared
    assert json.loads(cleared.out) == {
        "user_id": user,
        "email": f"{user}@example.com",
        "tier": "premium",
        "deleted": False,
        "credits_per_window": None,
        "welcome_bonus": bonus,  # what was granted at creation, untouched
    }

    deleted = _admin(nats_url, "users", "delete", user)
    assert deleted.code == 0, deleted
    assert json.loads(deleted.out)["deleted"] is True

    # A deleted account keeps its id (adding it again exits 4) and gets no new keys (3).
    add_again, key_for_deleted = _admin_many(
        nats_url,
        ("users", "add", user, "--email", f"{user}@example.com", "--tier", "free"),
        ("keys", "create", user),
    )
    _assert_error(add_again, 4)
    _assert_error(key_for_deleted, 3, mentions="deleted")


def test_commands_on_an_unknown_user_exit_3(nats_url):
    ghost = _new_user_id()
    results = _admin_many(
        nats_url,
        ("users", "delete", ghost),
        ("users", "set-tier", ghost, "pro"),
        ("users", "set-quota", ghost, "100"),
        ("users", "set-quota", ghost, "default"),
        ("keys", "create", ghost),
        ("usage", ghost),
    )
    for result in results:
        _assert_error(result, 3, mentions=ghost)
        assert result.out == ""


def test_users_list_prints_each_account_as_one_json_object_per_line(nats_url):
    first, second = sorted([_new_user_id(), _new_user_id()])
    first_bonus = _add(nats_url, first)["welcome_bonus"]
    _add(nats_url, second, tier="pro")
    listed = _admin(nats_url, "users", "list")
    assert listed.code == 0, listed
    rows = [json.loads(line) for line in listed.out.splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    by_id = {row["user_id"]: row for row in rows}
    assert by_id[first] == {
        "user_id": first,
        "email": f"{first}@example.com",
        "tier": "free",
        "deleted": False,
        "credits_per_window": None,
        "welcome_bonus": first_bonus,
    }
    assert by_id[second]["tier"] == "pro"
    ids = [row["user_id"] for row in rows]
    assert ids == sorted(ids)


# --- keys -------------------------------------------------------------------------------


async def _accounts_bucket_contents(url: str) -> tuple[list[str], list[bytes]]:
    # Not nats-py's kv.keys(): its watcher can say "no keys" before the keys it already
    # has (nats-io/nats.py#842); present_values counts for itself.
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("relay_accounts")
        found = await present_values(kv, ">")
        return list(found), list(found.values())
    finally:
        await nc.close()


async def test_keys_create_shows_the_key_once_stores_only_its_hash_and_revoke_works_once(nats_url):
    user = _new_user_id()
    _add(nats_url, user)

    created = _admin(nats_url, "keys", "create", user)
    assert created.code == 0, created
    lines = created.out.splitlines()
    api_key = lines[-1]
    assert API_KEY.fullmatch(api_key), created.out
    refresh = [line for line in lines if line.startswith("rdrt_")]
    assert len(refresh) == 1 and REFRESH_TOKEN.fullmatch(refresh[0]), created.out
    refresh_token = refresh[0]

    keys, values = await _accounts_bucket_contents(nats_url)
    assert f"apikey.{token_hash(api_key)}" in keys
    assert f"refresh.{token_hash(refresh_token)}" in keys
    for secret in (api_key, refresh_token, api_key.removeprefix("rdkey_"), refresh_token.removeprefix("rdrt_")):
        assert not any(secret in key for key in keys)
        assert not any(secret.encode() in value for value in values)

    revoked = _admin(nats_url, "keys", "revoke", api_key)
    assert revoked.code == 0, revoked
    assert revoked.out.strip() == "revoked"

    again, malformed = _admin_many(nats_url, ("keys", "revoke", api_key), ("keys", "revoke", "rdkey_nope"))
    _assert_error(again, 3, mentions="no such API key")
    _assert_error(malformed, 3)

    keys, _ = await _accounts_bucket_contents(nats_url)
    assert f"apikey.{token_hash(api_key)}" not in keys
    assert f"refresh.{token_hash(refresh_token)}" not in keys


# --- usage ------------------------------------------------------------------------------


def test_usage_reports_the_current_window_the_tier_limit_and_the_welcome_bonus(nats_url):
    with_bonus, without_bonus = _new_user_id(), _new_user_id()
    _add(nats_url, with_bonus, tier="pro")
    _add(nats_url, without_bonus, env={"RELAY_WELCOME_BONUS_CREDITS": "0"})

    before_ms = time.time_ns() // 1_000_000
    usage, usage_no_bonus = _admin_many(nats_url, ("usage", with_bonus), ("usage", without_bonus))
    after_ms = time.time_ns() // 1_000_000
    assert usage.code == 0, usage
    report = json.loads(usage.out)
    assert re.fullmatch(r"5h-\d+", report["period"])
    assert report["period"] in {f"5h-{before_ms // 18_000_000}", f"5h-{after_ms // 18_000_000}"}
    assert report["user_id"] == with_bonus
    assert report["tier"] == "pro"
    assert report["total_tokens"] == 0
    assert report["limit"] == 10_000
    assert report["remaining"] == 10_000
    quota = report["extra_quota"]
    assert quota["limit"] == 10_000
    assert quota["remaining"] == 10_000
    assert quota["active"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", quota["expires_at"])

    assert usage_no_bonus.code == 0, usage_no_bonus
    report = json.loads(usage_no_bonus.out)
    assert report["limit"] == 1000
    assert report["total_tokens"] == 0
    assert "extra_quota" not in report


def test_usage_reads_the_nats_url_from_the_environment(nats_url):
    user = _new_user_id()
    _add(nats_url, user)
    result = _admin(None, "usage", user, env={"RELAY_NATS_URL": nats_url})
    assert result.code == 0, result
    assert json.loads(result.out)["user_id"] == user


# --- tiers file and NATS ----------------------------------------------------------------


def test_a_tiers_file_adds_tiers_and_a_bad_one_exits_5(nats_url, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[tiers.team]\ncredits_per_window = 777\nmax_rooms = 100\nmax_sessions = -1\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers.free\ncredits_per_window = = 1\n")
    user = _new_user_id()
    added, bad_file, missing_file, no_file = _admin_many(
        nats_url,
        ("--tiers-file", str(good), "users", "add", user, "--email", f"{user}@example.com", "--tier", "team"),
        ("--tiers-file", str(bad), "users", "list"),
        ("--tiers-file", str(tmp_path / "missing.toml"), "users", "list"),
        ("users", "list"),
    )
    assert added.code == 0, added
    assert json.loads(added.out)["tier"] == "team"
    _assert_error(bad_file, 5, mentions=str(bad))
    assert "TOML" in bad_file.err
    _assert_error(missing_file, 5, mentions="missing.toml")
    assert no_file.code == 0, no_file  # without the flag: the built-in tiers

    via_env = _admin(nats_url, "usage", user, env={"RELAY_TIERS_FILE": str(good)})
    assert via_env.code == 0, via_env
    assert json.loads(via_env.out)["limit"] == 777
    _assert_error(_admin(nats_url, "users", "list", env={"RELAY_TIERS_FILE": str(bad)}), 5)


def test_on_a_fresh_server_the_buckets_are_created_and_the_list_is_empty():
    with EmbeddedNatsServer() as server:
        listed = _admin(server.url, "users", "list")
        assert listed.code == 0, listed
        assert listed.out == ""
        user = _new_user_id()
        added = _admin(server.url, "users", "add", user, "--email", "a@b.c", "--tier", "free")
        assert added.code == 0, added
        assert [json.loads(line)["user_id"] for line in _admin(server.url, "users", "list").out.splitlines()] == [user]


def test_nats_unreachable_exits_1_quickly():
    started = time.monotonic()
    result = _admin("nats://127.0.0.1:1", "users", "list", timeout=15)
    elapsed = time.monotonic() - started
    _assert_error(result, 1, mentions="nats://127.0.0.1:1")
    assert result.out == ""
    assert elapsed < 10


def test_a_bad_command_line_exits_2():
    missing_email = _admin("nats://127.0.0.1:1", "users", "add", "u1", "--tier", "free", timeout=15)
    assert missing_email.code == 2
    assert "--email" in missing_email.err
    no_command = _admin("nats://127.0.0.1:1", timeout=15)
    assert no_command.code == 2


def test_a_bad_command_line_exits_2_even_when_nats_is_unreachable():
    unreachable = "nats://127.0.0.1:1"
    for args in (
        ("users", "add", "bad.id", "--email", "x@example.com", "--tier", "free"),
        ("users", "add", _new_user_id(), "--email", "x@example.com", "--tier", "gold"),
        ("users", "set-quota", _new_user_id(), "0"),
    ):
        _assert_error(_admin(unreachable, *args, timeout=15), 2)


def test_every_command_prints_its_json_in_one_style(nats_url):
    user = _new_user_id()
    added = _add(nats_url, user)
    outputs = [
        _admin(nats_url, "users", "set-tier", user, "pro").out,
        _admin(nats_url, "usage", user).out,
        _admin(nats_url, "users", "list").out.splitlines()[0] + "\n",
    ]
    for out in outputs:
        assert out.endswith("\n") and len(out.splitlines()) == 1
        assert out == json.dumps(json.loads(out), ensure_ascii=False) + "\n", out
    assert added["welcome_bonus"]["credits"] == 10_000


def test_users_add_refuses_an_email_with_white_space_or_markup_and_a_duplicate_email(nats_url):
    user, other = _new_user_id(), _new_user_id()
    for email in ("a\nb@example.com", "a b@example.com", "<script>@example.com", "a@b", "@example.com"):
        _assert_error(_admin(nats_url, "users", "add", user, "--email", email, "--tier", "free"), 2)
    _add(nats_url, user)
    duplicate = _admin(nats_url, "users", "add", other, "--email", f"{user.upper()}@EXAMPLE.com", "--tier", "free")
    _assert_error(duplicate, 4, mentions=user)


def test_a_reader_that_stops_early_gets_no_traceback_and_exit_0(nats_url):
    for _ in range(3):
        _add(nats_url, _new_user_id())
    command = " ".join(_command(nats_url, ["users", "list"]))
    # `| true` closes the pipe before relay-admin writes (a `head -1` did so only at times).
    for reader in ("true", "head -c 1 >/dev/null"):
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"{command} | {reader}"],
            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, env=_env(None),
        )
        assert (done.returncode, done.stderr) == (0, ""), done


def test_an_unknown_command_is_named_in_one_line():
    result = _admin("nats://127.0.0.1:1", "frobnicate", timeout=15)
    _assert_error(result, 2, mentions="frobnicate")
    assert "COMMAND" in result.err and "users" in result.err and "argument group" not in result.err


def test_help_shows_each_default_and_its_variable():
    shown = _admin(None, "--help", timeout=15)
    assert shown.code == 0
    assert "[default: 10000; env RELAY_WELCOME_BONUS_CREDITS]" in " ".join(shown.out.split())
