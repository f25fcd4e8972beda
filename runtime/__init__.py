"""What every service uses: the NATS connection, KV helpers, settings, the service runner,
the clock, and the embedded nats-server. It imports only `schemas`."""
