"""Accounts: users, API keys and refresh tokens, tiers, room registrations.

Shared by the edge (authentication, room limits, the HTTP API), `relay-admin` and
metering. Records live in JetStream KV (`schemas.records`); keys are stored only as
SHA-256 hashes.
"""
