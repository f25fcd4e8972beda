"""`relay-admin`: manage accounts and API keys in the relay's JetStream KV.

    relay-admin [--nats-url URL] users add USER --email EMAIL --tier TIER
    relay-admin users delete USER | users set-tier USER TIER | users set-quota USER CREDITS|default | users list
    relay-admin keys create USER | keys revoke KEY
    relay-admin usage USER

Results go to standard output (JSON where there is data), errors to standard error as
one line `relay-admin: error: ...`. Exit codes a script can rely on:
0 done · 1 NATS or storage unavailable · 2 bad command line · 3 no such user or key ·
4 the user exists already · 5 the tiers file is unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import msgspec

from accounts.store import AccountStore, UnknownUser, UserExists
from metering.usage import UsageReader, open_usage_bucket, usage_report
from metering.windows import period_of
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS, connect_once
from runtime.local_lock import DEFAULT_DATA, running_relay_nats_url
from runtime.settings import NatsSettings, OneLineErrorParser, add_setting_flags, redact_urls, settings_from_args
from schemas.records import User, WelcomeBonus
from schemas.subjects import is_valid_user_id
from schemas.tiers import Tier, TierFileError, load_tiers

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_EXISTS = 4
EXIT_TIERS = 5

_DAY_MS = 86_400_000
# Deliberately plain: one @, a dotted domain, none of the characters that break a log
# line, a header or a page (white space, quotes, <>, commas).
_EMAIL = re.compile(r"[^\s@<>\"',;()]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


class AdminError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, kw_only=True)
class AdminSettings(NatsSettings):
    """What relay-admin can be told: flags before the command, else `RELAY_*` variables.
    Without a NATS URL it uses the relay `make run` runs here, if there is one."""

    api_key_ttl_s: int = field(default=30 * 86_400, metadata={"help": "API_KEY_TTL_SECONDS of new keys"})
    refresh_token_ttl_s: int = field(default=180 * 86_400, metadata={"help": "REFRESH_TOKEN_TTL_SECONDS of new refresh tokens"})
    welcome_bonus_credits: int = field(default=10_000, metadata={"help": "welcome-bonus credits granted to a new user (0: none)", "min": 0})
    welcome_bonus_days: int = field(default=7, metadata={"help": "days the welcome bonus stays valid", "min": 1})



def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="relay-admin",
        usage="%(prog)s [options] {users,keys,usage} ...",
        description="Manage termrelay accounts and API keys. Options go before the command.",
        epilog=(
            "Without --nats-url or RELAY_NATS_URL, relay-admin uses the relay `make run` runs from this folder "
            "(its data in RELAY_LOCAL_DATA, .local), else nats://127.0.0.1:4222."
        ),
    )
    add_setting_flags(parser.add_argument_group("settings"), AdminSettings)
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)

    users = groups.add_parser("users", help="accounts").add_subparsers(dest="action", required=True, metavar="ACTION")
    add = users.add_parser("add", help="create an account (with the welcome bonus)")
    add.add_argument("user")
    add.add_argument("--email", required=True)
    add.add_argument("--tier", required=True)
    add.add_argument("--name", default="")
    users.add_parser("delete", help="delete an account: its sockets close, its keys answer 410").add_argument("user")
    set_tier = users.add_parser("set-tier", help="change an account's tier")
    set_tier.add_argument("user")
    set_tier.add_argument("tier")
    set_quota = users.add_parser("set-quota", help="override the credits per window ('default' removes it)")
    set_quota.add_argument("user")
    set_quota.add_argument("credits")
    users.add_parser("list", help="every account, one JSON object per line")

    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True, metavar="ACTION")
    keys.add_parser("create", help="a new API key (last line) and refresh token, shown once").add_argument("user")
    keys.add_parser("revoke", help="revoke an API key and its refresh token").add_argument("key")

    groups.add_parser("usage", help="the user's usage in the current window, as JSON").add_argument("user")
    return parser


def _fail(code: int, message: str) -> NoReturn:
    print(f"relay-admin: error: {message}", file=sys.stderr)
    sys.exit(code)


def _user_json(user: User) -> dict[str, Any]:
    bonus = user.welcome_bonus
    return {
        "user_id": user.user_id,
        "email": user.email,
        "tier": user.tier,
        "deleted": user.deleted,
        "credits_per_window": user.credits_per_window,
        "welcome_bonus": None if bonus is None else {"credits": bonus.credits, "expires_at": bonus.expires_at},
    }


def _print_json(value: Any) -> None:
    """One JSON object on one line: every command prints its data in this one style."""
    print(json.dumps(msgspec.to_builtins(value), ensure_ascii=False))


async def _run(args: argparse.Namespace, settings: AdminSettings, tiers: dict[str, Tier]) -> None:
    try:
        nc = await connect_once(settings.nats_url, "relay-admin")
    except (OSError, *STORAGE_ERRORS) as exc:
        raise AdminError(EXIT_UNAVAILABLE, f"cannot reach NATS at {redact_urls(settings.nats_url)}: {exc or type(exc).__name__}")
    try:
        js = nc.jetstream(timeout=5)
        store = await AccountStore.open(js, settings.kv_replicas)
        await _command(args, settings, tiers, store, js)
        await nc.flush()
    finally:
        await nc.close()


async def _command(
    args: argparse.Namespace, settings: AdminSettings, tiers: dict[str, Tier], store: AccountStore, js: Any
) -> None:
    now = now_ms()
    group, action = args.group, getattr(args, "action", None)
    user_id = getattr(args, "user", None)
    if group == "users" and action == "add":
        bonus = None
        if settings.welcome_bonus_credits > 0:
            bonus = WelcomeBonus(
                credits=settings.welcome_bonus_credits,
                created_at=now,
                expires_at=now + settings.welcome_bonus_days * _DAY_MS,
            )
        user = User(user_id=user_id, email=args.email, tier=args.tier, created_at=now, name=args.name, welcome_bonus=bonus)
        taken = [u.user_id for u in await store.list_users() if u.email.lower() == args.email.lower() and not u.deleted]
        if taken:
            raise AdminError(EXIT_EXISTS, f"e-mail {args.email} belongs to user {taken[0]} already")
        try:
            await store.create_user(user)
        except UserExists:
            raise AdminError(EXIT_EXISTS, f"user {user_id} exists already") from None
        _print_json(_user_json(user))
    elif group == "users" and action == "delete":
        user = await _update(store, user_id, lambda u: msgspec.structs.replace(u, deleted=True, deleted_at=u.deleted_at or now))
        _print_json(_user_json(user))
    elif group == "users" and action == "set-tier":
        user = await _update(store, user_id, lambda u: msgspec.structs.replace(u, tier=args.tier))
        # Counted afresh from the registrations under the new tier (none are claimed without a limit).
        await store.forget_room_claims(user_id)
        _print_json(_user_json(user))
    elif group == "users" and action == "set-quota":
        credits = _credits(args.credits)
        user = await _update(store, user_id, lambda u: msgspec.structs.replace(u, credits_per_window=credits))
        _print_json(_user_json(user))
    elif group == "users" and action == "list":
        for user in await store.list_users():
            _print_json(_user_json(user))
    elif group == "keys" and action == "create":
        user = await store.get_user(user_id)
        if user is None:
            raise AdminError(EXIT_NOT_FOUND, f"no such user: {user_id}")
        if user.deleted:
            raise AdminError(EXIT_NOT_FOUND, f"user {user_id} is deleted")
        api_key, refresh_token = await store.issue_key(user_id, now, settings.api_key_ttl_s, settings.refresh_token_ttl_s)
        print(f"# API key for {user_id} (shown once; stored only as a hash). Refresh token:")
        print(refresh_token)
        print(api_key)
    elif group == "keys" and action == "revoke":
        if not await store.revoke_key(args.key.strip()):
            raise AdminError(EXIT_NOT_FOUND, "no such API key")
        print("revoked")
    elif group == "usage":
        user = await store.get_user(user_id)
        if user is None:
            raise AdminError(EXIT_NOT_FOUND, f"no such user: {user_id}")
        reader = UsageReader(await open_usage_bucket(js, settings.kv_replicas))
        window, bonus = await reader.window(user_id, period_of(now)), await reader.bonus_used(user_id)
        tier_of_user = tiers.get(user.tier) or tiers["free"]
        _print_json(usage_report(user, tier_of_user, window, bonus, now))


def _check_command_line(args: argparse.Namespace, tiers: dict[str, Tier]) -> None:
    """Refuse a bad command line (exit 2) before touching NATS, so the exit code says what is wrong."""
    user_id = getattr(args, "user", None)
    if user_id is not None and not is_valid_user_id(user_id):
        raise AdminError(EXIT_USAGE, f"USER must match [A-Za-z0-9_-]{{1,64}}, got {user_id!r}")
    tier = getattr(args, "tier", None)
    if tier is not None and tier not in tiers:
        raise AdminError(EXIT_USAGE, f"unknown tier {tier!r}; tiers: {', '.join(tiers)}")
    email = getattr(args, "email", None)
    if email is not None and not _EMAIL.fullmatch(email):
        raise AdminError(EXIT_USAGE, f"--email must be an e-mail address (name@domain, no spaces or <>), got {email!r}")
    if getattr(args, "credits", None) is not None:
        _credits(args.credits)


def _credits(text: str) -> int | None:
    """CREDITS of `users set-quota`: a positive integer, -1 (unlimited), or `default` (None)."""
    if text == "default":
        return None
    try:
        credits = int(text)
    except ValueError:
        credits = 0
    # 0 is refused: clients read a limit of 0 as "unlimited" (protocol.md §8.2).
    if credits < -1 or credits == 0:
        raise AdminError(EXIT_USAGE, f"CREDITS must be a positive integer, -1 (unlimited) or 'default', got {text!r}")
    return credits


async def _update(store: AccountStore, user_id: str, change: Any) -> User:
    try:
        return await store.update_user(user_id, change)
    except UnknownUser:
        raise AdminError(EXIT_NOT_FOUND, f"no such user: {user_id}") from None


def _default_nats_url(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """`environ` with the NATS URL of the relay `make run` runs here, when none was given."""
    if args.nats_url or environ.get("RELAY_NATS_URL"):
        return environ
    local = running_relay_nats_url(environ.get("RELAY_LOCAL_DATA") or DEFAULT_DATA)
    return {**environ, "RELAY_NATS_URL": local} if local else environ


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    environ = _default_nats_url(args, dict(os.environ if environ is None else environ))
    settings: AdminSettings = settings_from_args(AdminSettings, parser, args, environ)
    try:
        tiers = load_tiers(settings.tiers_file or None)
    except TierFileError as exc:
        _fail(EXIT_TIERS, str(exc))
    try:
        _check_command_line(args, tiers)
        asyncio.run(_run(args, settings, tiers))
        sys.stdout.flush()  # here, so that a reader gone early is caught below, not at exit
    except BrokenPipeError:
        # `relay-admin users list | head -1`: the reader has what it wanted. Not an error;
        # stdout is pointed at /dev/null so that the interpreter's last flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except AdminError as exc:
        _fail(exc.code, str(exc))
    except STORAGE_ERRORS as exc:
        _fail(EXIT_UNAVAILABLE, f"storage unavailable: {exc or type(exc).__name__}")


if __name__ == "__main__":
    main()
