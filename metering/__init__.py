"""The metering service (usage per user and window, quota checks). Not built yet.

Edges will publish usage to a JetStream stream; this package will consume it. See the
README's roadmap and the metering issue.
"""
