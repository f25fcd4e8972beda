"""Metering: usage per user and 5-hour window, quota checks.

`ledger` applies usage and judges quotas (no I/O), `service` is `relay-metering` (the
usage stream's consumer and the quota answers), `usage` reads ledgers for the edge's
HTTP API and `relay-admin usage`, `windows` holds the window arithmetic.
"""
