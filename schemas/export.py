"""Generate the JSON Schema files in `schemas/json/` from the Structs.

Run `make schemas` (or `python -m schemas.export`) after changing a message; a test
fails while the files are stale. `--check` only compares.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from schemas.client import ClientMessage, ServerMessage
from schemas.edge_events import EdgeEvent, LastSeenAnswer, LastSeenQuery
from schemas.http_api import API_BODIES, RefreshRequest
from schemas.metering import OverLimit, QuotaAnswer, QuotaCheck, UsageBatch
from schemas.status import EdgeStats, FleetStatus, MeteringStats
from schemas.records import (
    ApiKeyRecord,
    EdgeLease,
    Registration,
    RoomClaims,
    RoomRecord,
    UsageLedger,
    User,
)

JSON_DIR = Path(__file__).parent / "json"

DOCUMENTS: dict[str, tuple[str, Any]] = {
    "client-to-server.schema.json": ("Messages a TermOnMac client sends to the relay", ClientMessage),
    "server-to-client.schema.json": ("Messages the relay sends to a TermOnMac client", ServerMessage),
    "edge-events.schema.json": ("Control events edges send each other over NATS", EdgeEvent),
    "edge-last-seen.schema.json": ("An edge's question to another about its sockets' lastSeen, and the answer", (LastSeenQuery, LastSeenAnswer)),
    "room-record.schema.json": ("A room's record in the relay_rooms KV bucket", RoomRecord),
    "edge-lease.schema.json": ("An edge's lease in the relay_presence KV bucket", EdgeLease),
    "http-api-responses.schema.json": ("JSON bodies of the relay's HTTP API answers (protocol.md §8)", API_BODIES),
    "http-auth-refresh-request.schema.json": ("The body of POST /auth/refresh", RefreshRequest),
    "user.schema.json": ("An account in the relay_accounts KV bucket", User),
    "api-key-record.schema.json": ("An API key's record (under its SHA-256) in relay_accounts", ApiKeyRecord),
    "registration.schema.json": ("A room registration in the relay_registrations KV bucket", Registration),
    "room-claims.schema.json": ("A user's claims on rooms against his room limit, in the relay_registrations KV bucket", RoomClaims),
    "usage-ledger.schema.json": ("A user's usage windows and welcome-bonus use in the relay_usage KV bucket", UsageLedger),
    "usage-batch.schema.json": ("An edge's usage batch on the relay_usage_events stream", UsageBatch),
    "status.schema.json": (
        "The operator's status page: GET /admin/status.json, and what edges and metering processes answer for it over NATS",
        (FleetStatus, EdgeStats, MeteringStats),
    ),
    "metering-messages.schema.json": (
        "Quota check, answer and over-limit notice between edges and metering",
        (QuotaCheck, QuotaAnswer, OverLimit),
    ),
}


def _canonical(node: Any) -> Any:
    """The schema in one spelling, whatever msgspec release wrote it.

    msgspec copies docstrings into descriptions: 0.23 dedents them, older releases did
    not, so every description is cleaned as `inspect.cleandoc` does (a no-op on clean
    text). Releases also order the alternatives of an `anyOf` differently; their order
    means nothing in JSON Schema, so they are sorted.
    """
    if isinstance(node, dict):
        canonical = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                canonical[key] = inspect.cleandoc(value)
            elif key == "anyOf" and isinstance(value, list):
                canonical[key] = sorted((_canonical(item) for item in value), key=lambda item: json.dumps(item, sort_keys=True))
            else:
                canonical[key] = _canonical(value)
        return canonical
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    return node


def render(title: str, type_: Any) -> str:
    """A JSON Schema document for one type, or (for a tuple) for any one of several."""
    if isinstance(type_, tuple):
        refs, definitions = msgspec.json.schema_components(type_)
        schema = {"anyOf": list(refs), "$defs": definitions}
    else:
        schema = msgspec.json.schema(type_)
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **_canonical(schema)}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def stale_files() -> list[str]:
    """Names of schema files that differ from what the Structs generate."""
    stale = []
    for name, (title, type_) in DOCUMENTS.items():
        path = JSON_DIR / name
        if not path.exists() or path.read_text() != render(title, type_):
            stale.append(name)
    return stale


def main() -> None:
    if "--check" in sys.argv[1:]:
        stale = stale_files()
        if stale:
            sys.exit(f"stale schema files (run `make schemas`): {', '.join(stale)}")
        return
    JSON_DIR.mkdir(exist_ok=True)
    for name, (title, type_) in DOCUMENTS.items():
        (JSON_DIR / name).write_text(render(title, type_))
        print(f"wrote schemas/json/{name}")


if __name__ == "__main__":
    main()
