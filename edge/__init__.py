"""The edge: terminates WebSockets and HTTP, carries the room logic's actions out over NATS.

- `rooms`, `session`: the protocol's decisions, without I/O.
- `store`, `presence`: JetStream KV (room records, leases, lastSeen).
- `server`: the asyncio process that ties sockets to NATS.
"""
