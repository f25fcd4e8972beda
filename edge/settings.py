"""The edge's settings: one frozen object, from `RELAY_*` environment variables and flags.

Each field `name` is read from the flag `--name-with-dashes`, else from the environment
variable `RELAY_NAME`, else its default. The seed's timing constants keep their names
(`HEARTBEAT_DEAD_THRESHOLD` → `heartbeat_dead_threshold_ms`, …) and their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from schemas.subjects import is_valid_edge_id, is_valid_user_id


def _default_edge_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"{host or 'edge'}-{secrets.token_hex(3)}"


@dataclass(frozen=True, kw_only=True)
class EdgeSettings:
    """Everything an edge process can be told. See the README's settings table."""

    nats_url: str = field(
        default="nats://127.0.0.1:4222",
        metadata={"help": "NATS server URL(s), comma-separated; may carry user:password@", "url": True},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port for WebSocket and HTTP (0: a free one)", "port": True})
    # /metrics is the operator's: never on the public port (issue 16 item 15).
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address to serve /metrics on (0.0.0.0 for a scraper elsewhere: keep the port off the internet)"})
    metrics_port: int = field(default=-1, metadata={"min": -1, "help": "port for GET /metrics, Prometheus' text format, on metrics_host; -1: not served; 0: a free one"})
    edge_id: str = field(
        default_factory=_default_edge_id,
        metadata={"help": "this edge's name; unique per running edge", "default_help": "HOSTNAME-xxxxxx (random suffix)"},
    )
    # Accounts (protocol.md §2.2, §2.3, §12 items 2–6).
    auth: str = field(
        default="required",
        metadata={"help": "required: every connection needs an API key; none: every connection is the one local user", "metavar": "required|none"},
    )
    local_user_id: str = field(default="local", metadata={"help": "the user every connection acts as when auth=none"})
    local_user_tier: str = field(default="premium", metadata={"help": "tier of the local user when auth=none"})
    admin_token: str = field(
        default="", metadata={"help": "operator token: acts for any user (named by ?user_id=), reads any /status", "secret": True}
    )
    tiers_file: str = field(default="", metadata={"help": "TOML file overriding the tiers' limits (see the README)"})
    refuse_cross_account: bool = field(
        default=False, metadata={"help": "refuse iOS joins from another account than the room owner's (close 4003)"}
    )
    api_key_ttl_s: int = field(default=30 * 86_400, metadata={"min": 1, "help": "API_KEY_TTL_SECONDS: an unused API key expires after this (sliding)"})
    refresh_token_ttl_s: int = field(default=180 * 86_400, metadata={"min": 1, "help": "REFRESH_TOKEN_TTL_SECONDS: lifetime of a refresh token"})
    refresh_grace_s: int = field(
        default=300, metadata={"min": 0, "help": "a used refresh token may be used once more this long (a lost answer's retry); 0: never"}
    )
    auth_failure_limit: int = field(default=10, metadata={"min": 0, "help": "failed authentications with one key (its first 14 characters) per client address per window; beyond it that key gets HTTP 429 from that address, other keys are still checked; 0: no limit"})
    auth_failure_window_s: int = field(default=60, metadata={"min": 1, "help": "the window of auth_failure_limit and auth_failure_address_limit, in seconds"})
    # Issue 16 items 6 and 7: guessing keys from one address; guessing room secrets.
    auth_failure_address_limit: int = field(default=100, metadata={"min": 0, "help": "failed authentications per client address per window, any keys; beyond it HTTP 429 for every key this edge has not seen authenticate; 0: no limit"})
    room_auth_failure_limit: int = field(default=20, metadata={"min": 0, "help": "failed join_room/register_room authentications (wrong secret or pairing token) per user, and per room from other accounts than its owner, per window on this edge; beyond it error RATE_LIMITED and close 1008; 0: no limit"})
    room_auth_failure_window_s: int = field(default=60, metadata={"min": 1, "help": "the window of room_auth_failure_limit, in seconds"})
    client_ip_header: str = field(
        default="", metadata={"help": "header naming the client address behind a proxy (X-Forwarded-For: its last entry); empty: the peer address"}
    )
    socket_rate_limit_per_s: int = field(default=200, metadata={"min": 0, "help": "inbound messages and control frames (pings, pongs) per second per socket, sustained; beyond it closes 1008; 0: no limit"})
    socket_rate_burst: int = field(default=2000, metadata={"min": 0, "help": "inbound messages per socket allowed in a burst above the rate"})
    # Issue 16 items 5 and 9: bytes per socket; sockets and upgrades per user and address (per edge).
    socket_bytes_per_s: int = field(default=8 * 1024 * 1024, metadata={"min": 0, "help": "inbound bytes per second per socket, sustained (frames and control frames as read); beyond it closes 1008; 0: no limit"})
    socket_bytes_burst: int = field(default=32 * 1024 * 1024, metadata={"min": 1, "help": "inbound bytes a socket may send in a burst above that rate; at least max_frame_bytes"})
    user_socket_limit: int = field(default=32, metadata={"min": 0, "help": "sockets one user may hold on this edge (or 4 per room of the tier's max_rooms if more; no cap for unlimited rooms, nor with auth=none); beyond it HTTP 429; 0: no cap"})
    address_socket_limit: int = field(default=1000, metadata={"min": 0, "help": "sockets one client address (IPv6: its /64) may hold on this edge; beyond it HTTP 429; 0: no cap"})
    address_upgrades_per_s: int = field(default=50, metadata={"min": 0, "help": "WebSocket upgrade requests per second per client address on this edge, sustained; beyond it HTTP 429; 0: no limit"})
    address_upgrade_burst: int = field(default=500, metadata={"min": 1, "help": "upgrade requests one client address may make in a burst above that rate (a reconnect storm behind one NAT)"})

    # The seed's timing constants (relay_server/src/room.ts).
    heartbeat_dead_threshold_ms: int = field(default=45_000, metadata={"help": "silence after which a socket is closed 4000"})
    room_idle_timeout_ms: int = field(default=600_000, metadata={"help": "idle time after which a room drops its per-connection state"})
    room_reg_ttl_s: int = field(default=900, metadata={"help": "ROOM_REG_TTL: a room registration lapses this long after its Mac left"})
    usage_flush_interval_ms: int = field(
        default=1_000, metadata={"help": "how often usage is published to metering; at most this much is lost if the edge dies"}
    )

    # Metering (protocol.md §6, §12 items 18–20).
    metering: bool = field(default=True, metadata={"help": "publish usage and check quotas (relay-metering must run; if it does not answer, connections are let in)"})
    quota_check_timeout_ms: int = field(default=1_000, metadata={"help": "how long a connection waits for metering's quota answer before it is let in"})
    session_ms_per_credit: int = field(default=30_000, metadata={"help": "session time per duration credit (2 per minute); shortened in tests"})
    charge_per_payload: bool = field(default=False, metadata={"help": "charge a relay_batch one credit per payload instead of one per frame"})

    # Limits.
    max_frame_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest inbound frame; larger closes 1009"})
    socket_queue_max_msgs: int = field(default=4096, metadata={"min": 1, "help": "frames queued for one socket before it is closed 1013"})
    socket_queue_max_bytes: int = field(default=32 * 1024 * 1024, metadata={"min": 1, "help": "bytes waiting to be written to one socket (its queue and its write buffer, pongs included) before it is closed 1013 (dropped, when its pongs pile up)"})

    # Presence.
    edge_lease_ttl_ms: int = field(default=15_000, metadata={"help": "an edge that stops renewing is declared dead after this"})
    last_seen_interval_ms: int = field(
        default=30_000,
        metadata={"help": "how often a connected socket's lastSeen is written to KV at most (/status asks its edge for the exact one)"},
    )

    # Storage.
    kv_replicas: int = field(default=1, metadata={"min": 1, "help": "replicas of the KV buckets (3 in a production cluster)"})
    storage_retry_budget_ms: int = field(
        default=8_000,
        metadata={"min": 0, "help": "how long a register/join waits out storage trouble before closing 1011 (under the Mac's 10 s)"},
    )

    # Speed.
    listen_backlog: int = field(
        default=4096, metadata={"min": 1, "help": "connections the kernel queues before accept (capped by net.core.somaxconn)"}
    )
    uvloop: bool = field(default=True, metadata={"help": "run on uvloop when it is installed (relay-edge, make run)"})
    library_shortcuts: bool = field(
        default=True,
        metadata={
            "help": "use websockets' and asyncio's internals for the fast path and the ping-flood check; "
            "false: only their public API (slower; for a websockets release they do not fit)"
        },
    )

    # Closing.
    close_timeout_ms: int = field(default=5_000, metadata={"min": 1, "help": "time a closing handshake may take before the connection is dropped"})
    shutdown_release_ms: int = field(
        default=10_000,
        metadata={"help": "at shutdown, after the closes: how long to wait for departed sockets' slots to be released (the edge's lease is renewed meanwhile)"},
    )

    # Pacing and bounds of the edge's own work, for operators who measure a reason to move them.
    request_budget_ms: int = field(default=8_000, metadata={"min": 1, "help": "everything before the 101 (authentication, room limit, API calls) answers within this, inside websockets' 10 s open timeout; storage slower than that gives 503"})
    jetstream_timeout_ms: int = field(default=2_000, metadata={"min": 1, "help": "how long one JetStream request may take; short, so that the retry budgets allow retries"})
    event_ack_timeout_ms: int = field(default=1_000, metadata={"min": 1, "help": "how long a control event (peer_joined, peer_left, replaced) waits for the addressee's edge to acknowledge it before it is sent again"})
    event_attempts: int = field(default=3, metadata={"min": 1, "help": "how many times a control event is sent before it is given up (logged)"})
    last_seen_query_timeout_ms: int = field(default=500, metadata={"min": 1, "help": "how long /status and /api/rooms wait for another edge to say when its sockets last spoke"})
    incarnation_probe_timeout_ms: int = field(default=1_000, metadata={"min": 1, "help": "how long a starting edge waits for the incarnation holding its edge id's lease to answer"})
    upkeep_slice: int = field(default=25, metadata={"min": 1, "help": "sockets one slice of periodic work (lastSeen writes, registration refreshes, liveness) handles between frames"})
    spread_step_ms: int = field(default=50, metadata={"min": 1, "help": "slices of a spread pass (lastSeen writes, registration refreshes) run at least this far apart"})
    deleted_users_kept: int = field(default=10_000, metadata={"min": 1, "help": "accounts deleted while this edge watched that it remembers, to close a socket admitted during the deletion"})
    inbox_pending_bytes: int = field(default=512 * 1024 * 1024, metadata={"min": 1, "help": "bytes NATS's client may hold for this edge's sockets before it drops messages (logged as a slow consumer)"})
    shutdown_usage_ms: int = field(default=10_000, metadata={"min": 1, "help": "at shutdown, how long the last usage may take to reach the usage stream before it is given up (logged)"})

    def __post_init__(self) -> None:
        check_fields(self)
        if self.metrics_port > 65_535:
            raise ValueError(f"metrics_port (--metrics-port / RELAY_METRICS_PORT) must be -1 (off) or a port number up to 65535, got {self.metrics_port}")
        if not is_valid_edge_id(self.edge_id):
            raise ValueError(f"edge_id must match [A-Za-z0-9_-]{{1,64}}, got {self.edge_id!r}")
        if self.auth not in ("required", "none"):
            raise ValueError(f"auth must be 'required' or 'none', got {self.auth!r}")
        if not is_valid_user_id(self.local_user_id):
            raise ValueError(f"local_user_id must match [A-Za-z0-9_-]{{1,64}}, got {self.local_user_id!r}")
        if self.room_reg_ttl_s < 1:
            raise ValueError("room_reg_ttl_s must be at least 1 (NATS rejects TTLs under one second)")
        if self.edge_lease_ttl_ms < 1_000:
            raise ValueError("edge_lease_ttl_ms must be at least 1000 (NATS rejects TTLs under one second)")
        for name in (
            "heartbeat_dead_threshold_ms", "room_idle_timeout_ms", "last_seen_interval_ms", "max_frame_bytes",
            "usage_flush_interval_ms", "quota_check_timeout_ms", "session_ms_per_credit", "shutdown_release_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.socket_bytes_per_s > 0 and self.socket_bytes_burst < self.max_frame_bytes:
            raise ValueError(
                f"socket_bytes_burst (--socket-bytes-burst / RELAY_SOCKET_BYTES_BURST) must be at least "
                f"max_frame_bytes ({self.max_frame_bytes}): a largest frame must fit, got {self.socket_bytes_burst}"
            )

    # Derived timings: one place, so tests that shorten a constant shorten what follows from it.
    @property
    def liveness_sweep_interval_s(self) -> float:
        """How often sockets are checked for silence; closes happen within threshold + this."""
        return max(0.02, min(self.heartbeat_dead_threshold_ms / 8, 5_000) / 1000)

    @property
    def room_reg_refresh_interval_s(self) -> float:
        """How often a connected Mac's registration is refreshed: well inside ROOM_REG_TTL."""
        return min(self.room_reg_ttl_s / 3, 300.0)

    @property
    def edge_lease_renew_interval_s(self) -> float:
        return self.edge_lease_ttl_ms / 3 / 1000

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = "***" if value else ""
            elif f.metadata.get("url"):
                value = redact_urls(value)
            out[f.name] = value
        return out


def redact_urls(urls: str) -> str:
    """`urls` (comma-separated) with any password or token in them masked, for logs."""
    masked = []
    for url in urls.split(","):
        scheme, sep, rest = url.strip().partition("://")
        userinfo, at, host = rest.rpartition("@")
        if sep and at:
            user, colon, _ = userinfo.partition(":")
            userinfo = f"{user}:***" if colon else "***"
            url = f"{scheme}://{userinfo}@{host}"
        masked.append(url.strip())
    return ",".join(masked)


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_BOOL_WORDS = "true|false (also 1|0, yes|no, on|off)"


def nats_url_problem(urls: str) -> str | None:
    """Why `urls` (comma-separated NATS server URLs) cannot be used, or None if it can.

    Caught at start: nats-py would otherwise retry a malformed URL forever."""
    listed = [u.strip() for u in urls.split(",")]
    if not any(listed):
        return "nats_url is empty: give a NATS server URL such as nats://127.0.0.1:4222"
    for url in listed:
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port  # raises ValueError if out of range or not a number
        except ValueError as exc:
            return f"nats_url {redact_urls(url)!r} is not a usable URL ({exc})"
        if parsed.scheme not in _NATS_SCHEMES or not parsed.hostname:
            return (
                f"nats_url {redact_urls(url)!r} is not a NATS server URL: "
                f"expected {'|'.join(_NATS_SCHEMES)}://HOST[:PORT], e.g. nats://127.0.0.1:4222"
            )
        if port == 0:
            return f"nats_url {redact_urls(url)!r}: port 0 is not a server's port"
    return None


def check_fields(settings: Any) -> None:
    """Check what field metadata declares (`url`: NATS URLs; `port`: 0–65535; `min`: a
    lower bound); raise ValueError naming the setting, its flag and its variable."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        where = f"{f.name} (--{f.name.replace('_', '-')} / RELAY_{f.name.upper()})"
        if f.metadata.get("url"):
            problem = nats_url_problem(value)
            if problem:
                raise ValueError(problem.replace("nats_url", where, 1))
        if f.metadata.get("port") and not 0 <= value <= 65_535:
            raise ValueError(f"{where} must be a port number from 0 to 65535, got {value}")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ValueError(f"{where} must be at least {f.metadata['min']}, got {value}")


def load_settings(
    cls: type[Any], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, prog: str | None = None
) -> Any:
    """Build a settings dataclass `cls` from flags (`argv`) over environment (`environ`) over defaults."""
    parser = settings_parser(prog, cls.__doc__)
    add_setting_flags(parser, cls)
    return settings_from_args(cls, parser, parser.parse_args(argv), environ)


def settings_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    """An argument parser whose errors are one line (argparse's usage line of forty flags
    would bury the reason) and whose help ends with where settings come from."""
    parser = OneLineErrorParser(
        prog=prog,
        description=description,
        usage="%(prog)s [options]",
        epilog="Each option can also be set by the environment variable named beside it; a flag wins over the variable.",
    )
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line in one line, then exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def add_setting_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Any]) -> None:
    """Add a `--name-with-dashes` flag for each field of `cls` (for tools with their own parser)."""
    for f in dataclasses.fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_metavar(f),
            help=f"{f.metadata.get('help', '')} [default: {_shown_default(f)}; env RELAY_{f.name.upper()}]".replace("%", "%%"),
        )


def _kind(f: dataclasses.Field[Any]) -> type:
    return f.type if isinstance(f.type, type) else {"int": int, "str": str, "float": float, "bool": bool}.get(str(f.type), str)


def _metavar(f: dataclasses.Field[Any]) -> str:
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    kind = _kind(f)
    if kind is bool:
        return "true|false"
    return {int: "N", float: "X"}.get(kind, f.name.split("_")[-1].upper())


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
        if isinstance(default, bool):
            return "true" if default else "false"
        return repr(default) if default == "" else str(default)
    return f.metadata.get("default_help", "computed at start")


def settings_from_args(
    cls: type[Any], parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Any:
    """`cls` from parsed flags over `RELAY_*` variables over defaults; a bad value exits via `parser.error`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(f"RELAY_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        kind = _kind(f)
        try:
            values[f.name] = _parse(kind, raw)
        except ValueError:
            expected = _BOOL_WORDS if kind is bool else {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            parser.error(f"--{f.name.replace('_', '-')} / RELAY_{f.name.upper()}: expected {expected}, got {raw!r}")
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return kind(raw)
