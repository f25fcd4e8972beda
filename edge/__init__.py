"""The edge: terminates WebSockets and HTTP, carries the protocol's actions out over NATS.

`protocol/` decides, without I/O; the modules beside it carry out one job each, wired by
`server.Edge` (see the README's "How the code is built").
"""
