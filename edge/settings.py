"""The edge's settings: one frozen object, from `RELAY_*` environment variables and flags.

Each field `name` is read from the flag `--name-with-dashes`, else from the environment
variable `RELAY_NAME`, else its default. The seed's timing constants keep their names
(`HEARTBEAT_DEAD_THRESHOLD` → `heartbeat_dead_threshold_ms`, …) and their defaults. The
settings every service shares (`nats_url`, `kv_replicas`, `tiers_file`) come from
`runtime.settings.NatsSettings`.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from runtime.settings import NatsSettings
from schemas.subjects import is_valid_edge_id, is_valid_user_id


def _default_edge_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40]
    return f"{host or 'edge'}-{secrets.token_hex(3)}"


@dataclass(frozen=True, kw_only=True)
class EdgeSettings(NatsSettings):
    """Everything an edge process can be told. See the README's settings table."""

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
    # The operator's status page (GET /admin/status): behind admin_token, or open to this machine.
    status_open_on_loopback: bool = field(
        default=False,
        metadata={"help": "serve /admin/status without the admin token to clients on this machine (a loopback peer, no proxy header); make run sets it"},
    )
    status_gather_ms: int = field(default=300, metadata={"min": 1, "help": "how long /admin/status waits for the other edges and metering to describe themselves"})
    status_refresh_ms: int = field(default=2_000, metadata={"min": 100, "help": "how often the status page asks again"})
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
        default=1_000, metadata={"help": "how often usage is published to metering; this plus the refund window is what a killed edge loses at most"}
    )
    usage_refund_window_ms: int = field(
        default=1_000, metadata={"min": 0, "help": "how long a frame's charge waits, after its flush interval, for news that the frame reached nobody (its refund) before it is published"}
    )

    # Metering (protocol.md §6, §12 items 18–20).
    metering: bool = field(default=True, metadata={"help": "publish usage and check quotas (relay-metering must run; if it does not answer, connections are let in)"})
    quota_check_timeout_ms: int = field(default=1_000, metadata={"help": "how long a connection waits for metering's quota answer before it is let in"})
    session_ms_per_credit: int = field(default=30_000, metadata={"help": "session time per duration credit (2 per minute); shortened in tests"})
    charge_per_payload: bool = field(default=False, metadata={"help": "charge a relay_batch one credit per payload instead of one per frame"})

    # Limits.
    max_frame_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest inbound frame; larger closes 1009"})
    frame_parts_timeout_ms: int = field(
        default=5_000,
        metadata={"min": 1, "help": "a frame arriving from NATS in parts (over its max_payload) whose last part has not come within this is dropped, never delivered"},
    )
    socket_queue_max_msgs: int = field(default=4096, metadata={"min": 1, "help": "frames queued for one socket before it is closed 1013"})
    socket_queue_max_bytes: int = field(default=32 * 1024 * 1024, metadata={"min": 1, "help": "bytes waiting to be written to one socket (its queue and its write buffer, pongs included) before it is closed 1013 (dropped, when its pongs pile up)"})

    # Presence.
    # 8 s: a killed edge's idle peers hear `timeout` within 10 s, the lease renewed every 2.7 s.
    edge_lease_ttl_ms: int = field(default=8_000, metadata={"help": "an edge that stops renewing is declared dead after this (renewed every third of it)"})
    last_seen_interval_ms: int = field(
        default=30_000,
        metadata={"help": "how often a connected socket's lastSeen is written to KV at most (/status asks its edge for the exact one)"},
    )

    # Storage.
    storage_retry_budget_ms: int = field(
        default=8_000,
        metadata={"min": 0, "help": "how long a register/join waits out storage trouble before closing 1011 (under the Mac's 10 s)"},
    )

    # Speed.
    gc_full_every: int = field(default=100, metadata={"min": 1, "help": "middle-generation collections of the garbage collector between attempts of a full one (Python: 10); fewer full collections, a fraction of the CPU in a reconnect storm"})
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
    drain_grace_ms: int = field(default=5_000, metadata={"min": 0, "help": "after SIGTERM: /readyz and new upgrades answer 503 this long while every socket goes on relaying (a load balancer stops sending connections here), then the drain"})
    drain_ms: int = field(default=30_000, metadata={"min": 0, "help": "the drain: sockets are closed 1001 spread evenly over this, both sides of a room on this edge together (peers hear server_restart); a second SIGTERM closes the rest at once; 0: all at once"})
    close_timeout_ms: int = field(default=5_000, metadata={"min": 1, "help": "time a closing handshake may take before the connection is dropped"})
    shutdown_release_ms: int = field(
        default=10_000,
        metadata={"help": "at shutdown, after the closes: how long to wait for departed sockets' slots to be released (the edge's lease is renewed meanwhile)"},
    )

    # Moving off a NATS node in lame-duck mode (edge.nats_move).
    nats_move_settle_ms: int = field(
        default=250,
        metadata={"min": 0, "help": "moving off a lame-duck NATS node: how long a new subscription is given to be known across the cluster once a probe has come back on it"},
    )
    nats_move_probe_attempts: int = field(
        default=20, metadata={"min": 1, "help": "probes (100 ms apart) a new subscription is given to be known before the move goes on regardless"}
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
    # Admission (edge.admission): client work talks to storage at the rate storage answers.
    upgrades_in_flight: int = field(default=64, metadata={"min": 1, "help": "WebSocket upgrades checked against storage (key, account, room limit) at once; the rest wait in order"})
    upgrades_waiting: int = field(default=2_048, metadata={"min": 0, "help": "upgrades that may wait for a place; beyond it HTTP 503 at once (with Retry-After)"})
    upgrade_wait_ms: int = field(default=3_000, metadata={"min": 1, "help": "the longest an upgrade waits for a place before it is answered 503"})
    room_requests_in_flight: int = field(default=64, metadata={"min": 1, "help": "register_room and join_room requests carried out against storage at once; the rest wait in order"})
    room_requests_waiting: int = field(default=20_000, metadata={"min": 0, "help": "register/join requests that may wait for a place; beyond it the socket is closed 1013 (try again later)"})
    room_request_wait_ms: int = field(default=6_000, metadata={"min": 1, "help": "the longest a register/join waits for a place before its socket is closed 1013; under the Mac's 10 s register timer"})
    departures_in_flight: int = field(default=32, metadata={"min": 1, "help": "departed sockets' slot releases carried out at once; the rest wait in order (never refused)"})

    def __post_init__(self) -> None:
        super().__post_init__()
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
    def longest_graceful_stop_s(self) -> float:
        """The longest a graceful stop (SIGTERM) takes, phase by phase (`Edge._shutdown`): the
        drain's grace and the drain; the last closing handshakes and slot releases (close
        timeout + release); frames still waiting for NATS (the close timeout again); the
        last usage; and the lease's drop (its flush waits 2 s at most). A stop grace period
        (compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds) must be above it."""
        phases_ms = (
            self.drain_grace_ms + self.drain_ms + self.close_timeout_ms + self.shutdown_release_ms
            + self.close_timeout_ms + self.shutdown_usage_ms + 2_000
        )  # fmt: skip
        return phases_ms / 1000

    @property
    def liveness_sweep_interval_s(self) -> float:
        """How often sockets are checked for silence (and overdue frame parts); closes happen
        within threshold + this."""
        return max(0.02, min(self.heartbeat_dead_threshold_ms / 8, self.frame_parts_timeout_ms / 2, 5_000) / 1000)

    @property
    def room_reg_refresh_interval_s(self) -> float:
        """How often a connected Mac's registration is refreshed: well inside ROOM_REG_TTL."""
        return min(self.room_reg_ttl_s / 3, 300.0)

    @property
    def edge_lease_renew_interval_s(self) -> float:
        return self.edge_lease_ttl_ms / 3 / 1000
