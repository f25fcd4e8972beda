"""Who a request acts as, and whether a Mac may open one more room (protocol.md §2.2, §2.3, §4.2, §7).

`Access.authenticate` turns a request's headers into a `Principal` or raises `Refusal`
with the HTTP status a TermOnMac client acts on: 401 (no or unknown key), 410 (deleted
account), 429 (too many failed attempts from this address), 503 (storage unavailable:
never 401, which would start the Mac's token-refresh flow for a passing fault).

It also keeps this edge's caps on upgrades (issue 16 item 5): upgrades per client address
per second, and sockets held per user and per client address; past any of them, 429.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from websockets.datastructures import Headers

from accounts import claims, tokens
from accounts.store import AccountStore, UserExists
from edge.protocol.guessing import KEY, LoginGuard, RoomGuessGuard
from edge.log_budget import WarningBudget
from edge.protocol.limits import SocketCaps, UpgradeRateLimiter, user_socket_limit
from edge.settings import EdgeSettings
from runtime.clock import now_ms
from runtime.connection import STORAGE_ERRORS
from schemas.records import User
from schemas.subjects import is_valid_user_id
from schemas.tiers import DEFAULT_TIERS, Tier

log = logging.getLogger("edge.access")
outage_log = WarningBudget(log)  # one per upgrade in an outage

# What a client refused for a socket cap is told to wait: one of its sockets must close
# first, which it cannot know; the clients back off on their own (0.5 s to 8 s, §5.2).
SOCKET_CAP_RETRY_AFTER_S = 5


class Refusal(Exception):
    """The request is refused with this HTTP status and plain-text message."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Principal:
    """Who a request acts as. `user` is None only for the operator token without `?user_id=`."""

    user: User | None
    tier: Tier
    via: str  # "key", "operator" or "local"
    key_hash: str = field(default="", repr=False)

    @property
    def user_id(self) -> str:
        if self.user is None:
            raise Refusal(400, "the operator token acts for a user: add ?user_id=USER")
        return self.user.user_id

    @property
    def operator(self) -> bool:
        return self.via == "operator"


class Access:
    """Authentication and room limits for one edge, over the accounts store."""

    def __init__(self, settings: EdgeSettings, store: AccountStore, tiers: Mapping[str, Tier]) -> None:
        self.settings = settings
        self.store = store
        self.tiers = tiers
        # Failed logins (issue 16 item 6): per address and key prefix, and per address.
        self.logins = LoginGuard(
            settings.auth_failure_limit, settings.auth_failure_address_limit, settings.auth_failure_window_s
        )
        self.limiter = self.logins.by_address  # every failed login is counted here
        # Failed room authentications per user and per room (issue 16 item 7).
        self.room_guesses = RoomGuessGuard(settings.room_auth_failure_limit, settings.room_auth_failure_window_s)
        self.upgrades = UpgradeRateLimiter(settings.address_upgrades_per_s, settings.address_upgrade_burst)
        self.sockets = SocketCaps(settings.address_socket_limit)

    def tier_of(self, user: User) -> Tier:
        tier = self.tiers.get(user.tier)
        if tier is None:
            log.warning("user %s has tier %r, which the tiers file lacks; using free", user.user_id, user.tier)
            return self.tiers.get("free", DEFAULT_TIERS["free"])
        return tier

    async def ensure_local_user(self) -> None:
        """With auth=none, the one local user must exist (with its tier) before anyone connects."""
        s = self.settings
        if await self.store.get_user(s.local_user_id) is not None:
            return
        if s.local_user_tier not in self.tiers:
            raise ValueError(f"local_user_tier {s.local_user_tier!r} is not a tier ({', '.join(self.tiers)})")
        user = User(user_id=s.local_user_id, email=f"{s.local_user_id}@localhost", tier=s.local_user_tier, created_at=now_ms())
        try:
            await self.store.create_user(user)
            log.info("created the local user %s (tier %s)", user.user_id, user.tier)
        except UserExists:
            pass  # another edge made it first

    def client_address(self, peer: str, headers: Headers) -> str:
        """The client's address: the peer's, or behind a proxy the configured header's last entry
        (a repeated header counts as one list). IPv6 addresses count by their /64: one host
        usually holds a whole /64, and each address must not get its own allowance."""
        address = peer
        header = self.settings.client_ip_header
        if header:
            values = ",".join(headers.get_all(header))
            if values.strip():
                address = values.rsplit(",", 1)[-1].strip()
        if ":" in address:
            with contextlib.suppress(ValueError):
                return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
        return address

    async def authenticate(self, headers: Headers, user_id_param: str | None, address: str) -> Principal:
        """The principal of a request, or a `Refusal` (401, 410, 429, 503)."""
        s = self.settings
        if s.auth == "none":
            return await self._acting_as(s.local_user_id, via="local")
        now = time.monotonic()
        given = headers.get_all("Authorization")
        token = tokens.bearer_token(given[0]) if len(given) == 1 else None  # two keys: neither counts
        if token is None:
            # Not counted: a request without a key guesses nothing, and counting it let ten
            # plain `curl`s lock the operator's own address (and his Mac) out for a minute.
            raise Refusal(401, "an API key is required: Authorization: Bearer rdkey_...")
        self.refuse_if_blocked(address, token, now)
        if s.admin_token and tokens.same_secret(token, s.admin_token):
            self.logins.succeeded(token)
            if user_id_param is None:
                return Principal(user=None, tier=DEFAULT_TIERS["free"], via="operator")
            if not is_valid_user_id(user_id_param):
                raise Refusal(400, "user_id must match [A-Za-z0-9_-]{1,64}")
            return await self._acting_as(user_id_param, via="operator")
        try:
            record = await self.store.find_key(token, now_ms(), s.api_key_ttl_s)
            user = await self.store.get_user(record.user_id) if record is not None else None
        except STORAGE_ERRORS as exc:
            outage_log.warning("auth storage", "authentication: storage unavailable (%s); answered 503", type(exc).__name__)
            raise Refusal(503, "storage unavailable; try again") from exc
        if record is None or user is None:
            self.login_failed(address, token, now)
            raise Refusal(401, "unknown or expired API key")
        if user.deleted:
            raise Refusal(410, "account deleted")
        self.logins.succeeded(token)
        return Principal(user=user, tier=self.tier_of(user), via="key", key_hash=record.key_hash)

    # Headers a proxy adds: a request carrying one came through a proxy, from anywhere.
    _PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")

    def check_operator(self, headers: Headers, peer: str, address: str) -> None:
        """Let the operator through to the status page, or raise a `Refusal`: the admin token
        as a bearer token or as a browser's Basic password; or, with
        status_open_on_loopback, a loopback peer that no proxy stands in front of. Wrong
        tokens count against the address like wrong API keys."""
        s = self.settings
        proxied = any(headers.get(name) for name in (*self._PROXY_HEADERS, *([s.client_ip_header] if s.client_ip_header else [])))
        if s.status_open_on_loopback and not proxied and _is_loopback(peer):
            return
        if not s.admin_token:
            raise Refusal(403, "the status page needs RELAY_ADMIN_TOKEN (or, on this machine, RELAY_STATUS_OPEN_ON_LOOPBACK=true)")
        given = headers.get_all("Authorization")
        token = (tokens.bearer_token(given[0]) or tokens.basic_password(given[0])) if len(given) == 1 else None
        ask = {"WWW-Authenticate": 'Basic realm="termrelay operator", charset="UTF-8"'}
        if token is None:
            raise Refusal(401, "the operator token is required: Authorization: Bearer TOKEN (a browser asks for it as the password)", ask)
        now = time.monotonic()
        self.refuse_if_blocked(address, token, now)
        if not tokens.same_secret(token, s.admin_token):
            self.login_failed(address, token, now)
            raise Refusal(401, "wrong operator token", ask)
        self.logins.succeeded(token)

    def refuse_if_blocked(self, address: str, token: str, now: float) -> None:
        """Refuse (429, with Retry-After), without looking it up, a key (or refresh token)
        that its address may not try now: one tried and wrong too often from there, or any
        key this edge has not seen authenticate from an address that tried too many."""
        wait = self.logins.retry_after(address, token, now)
        if wait > 0:
            raise Refusal(429, "too many failed authentications; try again later", {"Retry-After": str(int(wait) + 1)})

    def login_failed(self, address: str, token: str, now: float) -> None:
        """Count a wrong key (or refresh token) from `address`; log each lock-out it starts,
        once, without key material (the address and the counts only)."""
        s = self.settings
        for started in self.logins.failed(address, token, now):
            if started == KEY:
                log.warning(
                    "client address %s: %d failed authentications with one key within %d s; that key is refused "
                    "429 from this address until they age out (other keys are still checked)",
                    address, s.auth_failure_limit, s.auth_failure_window_s,
                )
            else:
                log.warning(
                    "client address %s: %d failed authentications within %d s; keys this edge has not seen "
                    "authenticate are refused 429 from this address until they age out",
                    address, s.auth_failure_address_limit, s.auth_failure_window_s,
                )

    # --- caps on upgrades and sockets (per edge) ---------------------------------------

    def refuse_if_upgrading_too_fast(self, address: str, now: float) -> None:
        """Spend one of the address's upgrades; refuse (429, Retry-After) past its rate."""
        wait, first = self.upgrades.take(address, now)
        if wait > 0:
            if first:
                log.warning(
                    "client address %s: WebSocket upgrades past RELAY_ADDRESS_UPGRADES_PER_S; "
                    "refused 429 until it slows down", address,
                )
            raise Refusal(429, "too many connections from this address; slow down", {"Retry-After": str(math.ceil(wait))})

    def _socket_user(self, principal: Principal | None) -> tuple[str | None, int]:
        """The user a socket counts for, and that user's cap. With auth=none every connection
        is the one local user: a cap on that user would be a cap on the whole edge."""
        if principal is None or principal.via == "local" or principal.user is None:
            return None, 0
        return principal.user.user_id, user_socket_limit(self.settings.user_socket_limit, principal.tier.max_rooms)

    def refuse_if_over_socket_caps(self, principal: Principal | None, address: str) -> None:
        """Refuse (429) a socket one more of which would pass a cap; counts nothing (a cheap
        early look, before authentication and storage; `hold_socket` decides)."""
        user_id, limit = self._socket_user(principal)
        cap, first = self.sockets.check(user_id, limit, address)
        if cap is not None:
            raise self._cap_refusal(cap, first, user_id, limit, address)

    def hold_socket(self, principal: Principal, address: str) -> Callable[[], None]:
        """Count the socket against its user's and address's caps, or refuse it (429).
        Returns what gives its place back, to be called once its connection is gone."""
        user_id, limit = self._socket_user(principal)
        cap, first = self.sockets.hold(user_id, limit, address)
        if cap is not None:
            raise self._cap_refusal(cap, first, user_id, limit, address)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.sockets.release(user_id, address)

        return release

    def _cap_refusal(self, cap: str, first: bool, user_id: str | None, limit: int, address: str) -> Refusal:
        """The 429 for a socket past `cap`; the first refusal of a run is logged."""
        retry = {"Retry-After": str(SOCKET_CAP_RETRY_AFTER_S)}
        if cap == "user":
            if first:
                log.warning("user %s holds %d sockets on this edge, its cap; further upgrades refused 429", user_id, limit)
            return Refusal(429, f"too many connections for this account ({limit} on this relay server); close some", retry)
        if first:
            log.warning(
                "client address %s holds %d sockets on this edge, RELAY_ADDRESS_SOCKET_LIMIT; further upgrades refused 429",
                address, self.sockets.per_address,
            )
        return Refusal(429, "too many connections from this address on this relay server", retry)

    async def _acting_as(self, user_id: str, via: str) -> Principal:
        try:
            user = await self.store.get_user(user_id)
        except STORAGE_ERRORS as exc:
            raise Refusal(503, "storage unavailable; try again") from exc
        if user is None:
            raise Refusal(401 if via == "local" else 404, f"no such user: {user_id}")
        if user.deleted:
            raise Refusal(410, "account deleted")
        return Principal(user=user, tier=self.tier_of(user), via=via)

    async def check_room_limit(self, principal: Principal, room_id: str) -> bool:
        """Refuse (403) a Mac that would register one room more than its tier allows (§7).

        A room the user has registered already is always allowed (a reconnection), and the
        count is a single request; only a count at or past the limit is checked exactly.
        Returns True when the room needs no check again (registered already, or no limit).
        """
        tier, user_id = principal.tier, principal.user_id
        if tier.max_rooms < 0:
            return True
        try:
            if await self.store.get_registration(user_id, room_id) is not None:
                return True
            claimed, _ = await self.store.room_claims(user_id, self.settings.room_reg_ttl_s)
        except STORAGE_ERRORS as exc:
            raise Refusal(503, "storage unavailable; try again") from exc
        if room_id in claimed:
            return True  # claimed by a register of this room under way (or done) elsewhere
        if not tier.allows_another_room(len(claimed)):
            raise self._room_limit_refusal(principal)
        return False

    async def claim_room(self, principal: Principal, room_id: str) -> bool:
        """At a socket's first register of a room the upgrade did not find registered:
        claim the room against the room limit, by compare-and-set, so that registers at
        once on any edges cannot pass it (issue 16 item 4). Refusal 403 past the limit
        (the edge answers ROOM_LIMIT), 503 when storage fails. Returns whether the room
        was claimed just now (to be given back if the register is then refused)."""
        tier, user_id, ttl_s = principal.tier, principal.user_id, self.settings.room_reg_ttl_s
        if tier.max_rooms < 0:
            return False
        try:
            # A room registered already is a reconnection: always let in (§7).
            registered = await self.store.get_registration(user_id, room_id) is not None
            done = await self.store.claim_room(user_id, room_id, ttl_s, tier.max_rooms, force=registered)
        except STORAGE_ERRORS as exc:
            raise Refusal(503, "storage unavailable; try again") from exc
        if done == claims.REFUSED:
            raise self._room_limit_refusal(principal)
        return done == claims.NEW

    async def release_room(self, user_id: str, room_id: str) -> None:
        """Give back a claim taken for a register that was then refused."""
        await self.store.release_room(user_id, room_id)

    @staticmethod
    def _room_limit_refusal(principal: Principal) -> Refusal:
        tier = principal.tier
        return Refusal(403, f"room limit reached: the {tier.name} tier allows {tier.max_rooms} rooms; delete one or upgrade")

    async def register_room(self, principal: Principal, room_id: str, created_at: int | None = None) -> None:
        """Record (or refresh) the user's registration of a room for ROOM_REG_TTL, and its
        claim on the room limit with it (whatever the limit: the room is registered). A tier
        without a limit claims nothing: thousands of its rooms registering at once (a
        reconnect storm) would all rewrite one record by compare-and-set."""
        user_id, ttl_s = principal.user_id, self.settings.room_reg_ttl_s
        await self.store.put_registration(user_id, room_id, now_ms(), ttl_s, created_at)
        if principal.tier.max_rooms >= 0:
            await self.store.claim_room(user_id, room_id, ttl_s, -1, force=True)


def _is_loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer.removeprefix("::ffff:")).is_loopback
    except ValueError:
        return False
