"""The edge's decisions, without I/O: state and an event in, new state and actions out.

Nothing here imports asyncio, NATS, websockets or the edge's asyncio side
(`tests/test_layout.py`), so every rule is tested in microseconds.
"""
