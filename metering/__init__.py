"""Metering: usage per user and 5-hour window, quota checks.

`windows` holds the window arithmetic and `usage` reads usage records and reports them
(for the edge's HTTP API and `relay-admin usage`). The consumer that counts usage is
the metering issue's work.
"""
