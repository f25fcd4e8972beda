"""The JSON Schema files for client authors are generated from the Structs, never edited by hand."""

import json

import msgspec

from schemas.client import client_decoder
from schemas.export import DOCUMENTS, JSON_DIR, stale_files


def test_json_schema_files_match_the_structs():
    assert stale_files() == [], "run `make schemas` and commit schemas/json/"


def test_every_schema_file_is_valid_json_with_a_title():
    for name in DOCUMENTS:
        document = json.loads((JSON_DIR / name).read_text())
        assert document["title"] and ("$ref" in document or "anyOf" in document or "properties" in document)


def test_client_schema_lists_every_client_message_type():
    document = json.loads((JSON_DIR / "client-to-server.schema.json").read_text())
    tags = {d["properties"]["type"]["enum"][0] for d in document["$defs"].values() if "type" in d.get("properties", {})}
    assert tags == {"register_room", "join_room", "relay", "relay_batch", "heartbeat"}
    # And what the schema calls a heartbeat is what the relay decodes as one.
    assert type(client_decoder.decode(msgspec.json.encode({"type": "heartbeat"}))).__name__ == "Heartbeat"


def test_schema_export_writes_one_spelling_whatever_the_msgspec_release():
    # msgspec 0.23 dedents docstrings and older releases do not; releases also order a
    # union's alternatives differently. Both spellings must give the same file.
    from schemas.export import _canonical

    older = {"description": "First line.\n\n    Indented rest.", "anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}
    newer = {"description": "First line.\n\nIndented rest.", "anyOf": [{"type": "null"}, {"$ref": "#/$defs/A"}]}
    assert _canonical(older) == _canonical(newer) == _canonical(_canonical(newer))
    assert _canonical(older)["description"] == "First line.\n\nIndented rest."
