"""The contract between termrelay's processes and its clients.

- `client`: every WebSocket message of the TermOnMac protocol, both directions.
- `edge_events`: the control events edges send each other over NATS.
- `records`: what the edges keep in JetStream KV.
- `subjects`: the one place where NATS subjects and KV keys are built.

JSON Schema for client authors is generated from these Structs (`python -m schemas.export`).
"""
