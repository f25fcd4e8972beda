"""Wire schemas (tolerant decoding, protocol.md §3.1, §12 item 7), NATS subjects/KV keys
(client text never widens a subject or names another key), and settings loading
(flag over env over default; the seed's timing constants as defaults, §5.1).
"""

from __future__ import annotations

import msgspec
import pytest

from edge.settings import EdgeSettings
from runtime.settings import load_settings
from schemas import subjects
from schemas.client import (
    MAX_BATCH_PAYLOADS,
    Error,
    Heartbeat,
    HeartbeatAck,
    JoinRoom,
    PeerDisconnected,
    PeerJoined,
    QuotaExceeded,
    RegisterRoom,
    Relay,
    RelayBatch,
    RoomRegistered,
    client_decoder,
    encode,
    server_decoder,
)
from schemas.edge_events import PeerJoinedEvent, PeerLeftEvent, ReplacedEvent, edge_event_decoder
from schemas.records import RoomRecord, SlotHolder, room_record_decoder

ROOM = "K7X2M9QD4A"
SECRET = "a" * 64
MAC_KEY = "MacIdentityKey" + "A" * 29 + "="

BAD_ROOM_IDS = {
    "gt": ">",
    "dot": "a.b",
    "star": "*",
    "empty": "",
    "129-chars": "A" * 129,
    "space": "AB CD",
    "slash": "AB/CD",
    "unicode": "RÖÖM",
    "trailing-newline": "ABCDEF\n",
}


# --- builders ----------------------------------------------------------------------


def decode(**obj):
    return client_decoder.decode(msgspec.json.encode(obj))


def register_obj(**fields) -> dict:
    return {"type": "register_room", "room_id": ROOM, "secret_hash": SECRET, "public_key": MAC_KEY, **fields}


def join_obj(**fields) -> dict:
    return {"type": "join_room", "room_id": ROOM, "public_key": MAC_KEY, **fields}


def rejected(obj: dict) -> bool:
    try:
        client_decoder.decode(msgspec.json.encode(obj))
    except msgspec.ValidationError:
        return True
    return False


def settings(argv=(), **env) -> EdgeSettings:
    return load_settings(EdgeSettings, argv=list(argv), environ=env)


# --- tolerant decoding (§3.1) -------------------------------------------------------------

OPTIONAL_VARIANTS = {"absent": None, "null": "null", "empty": ""}


def with_optional(obj: dict, names: tuple[str, ...], variant: str) -> dict:
    if variant == "absent":
        return obj
    return {**obj, **{n: (None if variant == "null" else "") for n in names}}


@pytest.mark.parametrize("variant", OPTIONAL_VARIANTS)
def test_register_room_accepts_absent_null_or_empty_optional_key_fields(variant):
    obj = with_optional(register_obj(), ("session_nonce", "ephemeral_key", "pairing_token_hash"), variant)
    msg = client_decoder.decode(msgspec.json.encode(obj))
    assert isinstance(msg, RegisterRoom)
    assert (msg.room_id, msg.secret_hash, msg.public_key) == (ROOM, SECRET, MAC_KEY)
    expected = None if variant in ("absent", "null") else ""
    assert (msg.session_nonce, msg.ephemeral_key, msg.pairing_token_hash) == (expected, expected, expected)
    assert msg.pairing_token_expires_at is None


@pytest.mark.parametrize("variant", OPTIONAL_VARIANTS)
def test_join_room_accepts_absent_null_or_empty_optional_fields(variant):
    obj = with_optional(join_obj(), ("secret_hash", "session_nonce", "ephemeral_key", "pairing_token_hash"), variant)
    msg = client_decoder.decode(msgspec.json.encode(obj))
    assert isinstance(msg, JoinRoom)
    expected = None if variant in ("absent", "null") else ""
    assert (msg.secret_hash, msg.session_nonce, msg.ephemeral_key, msg.pairing_token_hash) == (expected,) * 4


def test_register_room_pairing_expiry_null_is_accepted():
    assert decode(**register_obj(pairing_token_hash="c" * 64, pairing_token_expires_at=None)).pairing_token_expires_at is None


def test_register_room_from_the_mac_decodes_with_expiry_in_unix_seconds():
    msg = decode(**register_obj(session_nonce="Zm9v", ephemeral_key="YmFy", pairing_token_hash="c" * 64, pairing_token_expires_at=1_700_000_000))
    assert msg == RegisterRoom(
        room_id=ROOM,
        secret_hash=SECRET,
        public_key=MAC_KEY,
        session_nonce="Zm9v",
        ephemeral_key="YmFy",
        pairing_token_hash="c" * 64,
        pairing_token_expires_at=1_700_000_000,
    )


@pytest.mark.parametrize(
    "obj, expected",
    [
        (register_obj(app_version="2.1", flags=[1, {"a": None}]), RegisterRoom(room_id=ROOM, secret_hash=SECRET, public_key=MAC_KEY)),
        (join_obj(device="iPad", secret_hash=SECRET), JoinRoom(room_id=ROOM, public_key=MAC_KEY, secret_hash=SECRET)),
        ({"type": "relay", "payload": "cA==", "seq": 4}, Relay(payload="cA==")),
        ({"type": "relay_batch", "payloads": ["a", "b"], "n": 2}, RelayBatch(payloads=["a", "b"])),
        ({"type": "heartbeat", "ts": 123, "extra": {"x": 1}}, Heartbeat()),
    ],
    ids=["register_room", "join_room", "relay", "relay_batch", "heartbeat"],
)
def test_unknown_extra_fields_are_ignored(obj, expected):
    assert client_decoder.decode(msgspec.json.encode(obj)) == expected


def test_relay_batch_of_256_payloads_is_accepted():
    assert MAX_BATCH_PAYLOADS == 256
    msg = decode(type="relay_batch", payloads=[str(i) for i in range(256)])
    assert isinstance(msg, RelayBatch) and msg.payloads == [str(i) for i in range(256)]


def test_relay_batch_over_256_payloads_is_rejected():
    assert rejected({"type": "relay_batch", "payloads": ["x"] * 257})


@pytest.mark.parametrize("room_id", BAD_ROOM_IDS.values(), ids=BAD_ROOM_IDS.keys())
@pytest.mark.parametrize("builder", [register_obj, join_obj], ids=["register_room", "join_room"])
def test_bad_room_ids_are_rejected(builder, room_id):
    assert rejected(builder(room_id=room_id))


@pytest.mark.parametrize("room_id", ["A" * 128, "a", "K7X2M9QD4A", "room_id-1"])
def test_url_safe_room_ids_up_to_128_chars_are_accepted(room_id):
    assert decode(**register_obj(room_id=room_id)).room_id == room_id


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "register_room", "room_id": ROOM, "public_key": MAC_KEY},
        {"type": "register_room", "room_id": ROOM, "secret_hash": SECRET},
        {"type": "register_room", "secret_hash": SECRET, "public_key": MAC_KEY},
        {"type": "join_room", "room_id": ROOM},
        {"type": "relay"},
        {"type": "relay", "payload": None},
        {"type": "relay_batch"},
        {"type": "relay_batch", "payloads": "abc"},
        {"type": "register_room", "room_id": ROOM, "secret_hash": SECRET, "public_key": MAC_KEY, "pairing_token_expires_at": "soon"},
    ],
    ids=[
        "register-no-secret",
        "register-no-key",
        "register-no-room",
        "join-no-key",
        "relay-no-payload",
        "relay-null-payload",
        "batch-no-payloads",
        "batch-payloads-not-list",
        "expiry-not-int",
    ],
)
def test_missing_or_mistyped_required_fields_are_rejected(obj):
    assert rejected(obj)


@pytest.mark.parametrize("obj", [{"type": "nope"}, {"no_type": 1}, {"type": "room_registered", "room_id": ROOM}])
def test_unknown_or_server_only_types_are_rejected_from_clients(obj):
    assert rejected(obj)


def test_oversized_key_text_is_rejected():
    assert rejected(register_obj(secret_hash="a" * 513))
    assert not rejected(register_obj(secret_hash="a" * 512))


# --- server → client encoding (§3.3) ----------------------------------------------------------


@pytest.mark.parametrize(
    "msg, expected",
    [
        (RoomRegistered(room_id=ROOM), {"type": "room_registered", "room_id": ROOM}),
        (RoomRegistered(room_id=ROOM, max_sessions=-1), {"type": "room_registered", "room_id": ROOM, "max_sessions": -1}),
        (PeerJoined(public_key="k"), {"type": "peer_joined", "public_key": "k", "session_nonce": "", "ephemeral_key": ""}),
        (PeerDisconnected(reason="timeout"), {"type": "peer_disconnected", "reason": "timeout"}),
        (HeartbeatAck(mac_connected=True), {"type": "heartbeat_ack", "mac_connected": True}),
        (
            HeartbeatAck(mac_connected=True, account_match="mismatch", account_deleted=True),
            {"type": "heartbeat_ack", "mac_connected": True, "account_match": "mismatch", "account_deleted": True},
        ),
        (Error(code="NO_PEER", message="Peer not connected"), {"type": "error", "code": "NO_PEER", "message": "Peer not connected"}),
        (
            QuotaExceeded(usage=2975, limit=1000, period="5h-98568", resets_at="2026-03-23T05:00:00.000Z"),
            {"type": "quota_exceeded", "usage": 2975, "limit": 1000, "period": "5h-98568", "resets_at": "2026-03-23T05:00:00.000Z"},
        ),
    ],
    ids=["registered", "registered-max", "peer_joined-empty-keys", "peer_disconnected", "ack", "ack-flags", "error", "quota"],
)
def test_server_messages_have_the_documented_wire_shape(msg, expected):
    data = encode(msg)
    assert msgspec.json.decode(data) == expected
    assert server_decoder.decode(data) == msg


def test_heartbeat_ack_without_mac_decodes_as_mac_not_connected():
    assert server_decoder.decode(encode(HeartbeatAck(mac_connected=False))).mac_connected is False


# --- edge events and records ---------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        PeerJoinedEvent(peer=SlotHolder(socket_id="s", edge_id="e", boot_id="b", user_id="u"), public_key="k", session_nonce="", ephemeral_key="x"),
        PeerLeftEvent(reason="server_restart"),
        ReplacedEvent(by_socket_id="s2"),
    ],
    ids=["peer_joined", "peer_left", "replaced"],
)
def test_edge_events_round_trip_by_their_event_tag(event):
    data = msgspec.json.encode(event)
    assert "event" in msgspec.json.decode(data)
    assert edge_event_decoder.decode(data) == event


def test_room_record_round_trips_through_kv_json():
    record = RoomRecord(
        room_id=ROOM,
        owner_user_id="u1",
        secret_hash=SECRET,
        mac_public_key=MAC_KEY,
        created_at=1,
        last_activity_at=2,
        pairing_token_expires_at=1_700_000_000,
        mac=SlotHolder(socket_id="s", edge_id="e", boot_id="b", user_id="u1"),
    )
    assert room_record_decoder.decode(msgspec.json.encode(record)) == record


# --- subjects and keys -------------------------------------------------------------------------


ROOM_FUNCS = {
    "room_subject": lambda room_id: subjects.room_subject(room_id, "mac"),
    "room_key": subjects.room_key,
    "last_seen_key": lambda room_id: subjects.last_seen_key(room_id, "ios"),
}


def test_subjects_and_keys_have_the_documented_form():
    assert subjects.room_subject(ROOM, "mac") == f"relay.room.{ROOM}.mac"
    assert subjects.room_subject(ROOM, "ios") == f"relay.room.{ROOM}.ios"
    assert subjects.room_key(ROOM) == ROOM
    assert subjects.last_seen_key(ROOM, "mac") == f"seen.{ROOM}.mac"
    assert subjects.edge_lease_key("edge-1") == "edge.edge-1"
    assert subjects.edge_id_of_lease_key(subjects.edge_lease_key("edge_7")) == "edge_7"


@pytest.mark.parametrize("room_id", BAD_ROOM_IDS.values(), ids=BAD_ROOM_IDS.keys())
@pytest.mark.parametrize("func", ROOM_FUNCS.values(), ids=ROOM_FUNCS.keys())
def test_subjects_and_keys_refuse_invalid_room_ids(func, room_id):
    assert subjects.is_valid_room_id(room_id) is False
    with pytest.raises(ValueError):
        func(room_id)


@pytest.mark.parametrize("func", ROOM_FUNCS.values(), ids=ROOM_FUNCS.keys())
def test_subjects_and_keys_accept_a_128_char_room_id(func):
    assert "A" * 128 in func("A" * 128)


@pytest.mark.parametrize("role", ["", "MAC", "*", ">", "mac.x", "server", "mac ", None])
@pytest.mark.parametrize("func", [subjects.room_subject, subjects.last_seen_key], ids=["room_subject", "last_seen_key"])
def test_subjects_and_keys_refuse_invalid_roles(func, role):
    with pytest.raises(ValueError):
        func(ROOM, role)


@pytest.mark.parametrize("edge_id", ["", ">", "*", "a.b", "E" * 65, "edge 1", "edge\n"])
def test_edge_lease_key_refuses_invalid_edge_ids(edge_id):
    assert subjects.is_valid_edge_id(edge_id) is False
    with pytest.raises(ValueError):
        subjects.edge_lease_key(edge_id)


def test_edge_lease_key_accepts_a_64_char_edge_id():
    assert subjects.edge_lease_key("E" * 64) == "edge." + "E" * 64


# --- settings (flag over env over default) --------------------------------------------------------


def test_settings_defaults_equal_the_seed_constants():
    s = settings()
    assert s.heartbeat_dead_threshold_ms == 45_000
    assert s.room_idle_timeout_ms == 600_000
    assert s.room_reg_ttl_s == 900
    assert s.max_frame_bytes == 4 * 1024 * 1024
    assert s.auth == "required"  # protocol.md §12 item 2
    assert (s.api_key_ttl_s, s.refresh_token_ttl_s) == (30 * 86_400, 180 * 86_400)
    assert subjects.is_valid_edge_id(s.edge_id)


def test_env_overrides_default():
    s = settings(RELAY_HEARTBEAT_DEAD_THRESHOLD_MS="500", RELAY_NATS_URL="nats://n1:4222,nats://n2:4222", RELAY_EDGE_ID="edge-a")
    assert s.heartbeat_dead_threshold_ms == 500
    assert s.nats_url == "nats://n1:4222,nats://n2:4222"
    assert s.edge_id == "edge-a"


def test_flag_overrides_env():
    s = settings(["--heartbeat-dead-threshold-ms", "700", "--edge-id=flag-edge"], RELAY_HEARTBEAT_DEAD_THRESHOLD_MS="500", RELAY_EDGE_ID="env-edge")
    assert s.heartbeat_dead_threshold_ms == 700
    assert s.edge_id == "flag-edge"


def test_flag_overrides_default_without_env():
    assert settings(["--room-idle-timeout-ms", "1000", "--room-reg-ttl-s", "60"]).room_idle_timeout_ms == 1000
    assert settings(["--room-reg-ttl-s", "60"]).room_reg_ttl_s == 60


def test_empty_env_value_falls_back_to_default():
    assert settings(RELAY_ROOM_IDLE_TIMEOUT_MS="").room_idle_timeout_ms == 600_000


def test_unrelated_env_is_ignored():
    assert settings(HEARTBEAT_DEAD_THRESHOLD_MS="1", RELAY_UNKNOWN="x").heartbeat_dead_threshold_ms == 45_000


@pytest.mark.parametrize(
    "argv, env",
    [
        ([], {"RELAY_PORT": "eighty"}),
        (["--port", "80.5"], {}),
        ([], {"RELAY_HEARTBEAT_DEAD_THRESHOLD_MS": "45s"}),
        (["--heartbeat-dead-threshold-ms", "0"], {}),
        ([], {"RELAY_ROOM_IDLE_TIMEOUT_MS": "-1"}),
        ([], {"RELAY_MAX_FRAME_BYTES": "0"}),
        ([], {"RELAY_EDGE_ID": "a.b"}),
        (["--edge-id", ">"], {}),
        ([], {"RELAY_AUTH": "apikey"}),
        ([], {"RELAY_EDGE_LEASE_TTL_MS": "999"}),
        (["--no-such-flag", "1"], {}),
    ],
    ids=[
        "port-not-int",
        "port-float",
        "threshold-with-unit",
        "threshold-zero",
        "idle-negative",
        "frame-zero",
        "edge-id-dot",
        "edge-id-gt",
        "auth-unknown",
        "lease-under-1s",
        "unknown-flag",
    ],
)
def test_bad_settings_exit(argv, env, capsys):
    with pytest.raises(SystemExit) as exc:
        settings(argv, **env)
    assert exc.value.code != 0
    assert capsys.readouterr().err  # the operator is told why


def test_bad_env_value_is_overridden_by_a_good_flag():
    assert settings(["--port", "9000"], RELAY_PORT="eighty").port == 9000


def test_redacted_settings_mask_the_admin_token():
    s = settings(RELAY_ADMIN_TOKEN="super-secret")
    assert s.admin_token == "super-secret"
    assert s.redacted()["admin_token"] == "***"
    assert "super-secret" not in repr(s.redacted())
    assert settings().redacted()["admin_token"] == ""
