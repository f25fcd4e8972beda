"""`relay-edge`: run one edge process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from edge.server import Edge
from edge.settings import EdgeSettings, load_settings


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every HTTP request at INFO; health probes would drown the log.
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def serve_until_signalled(edge: Edge) -> None:
    """Run `edge`; the first SIGTERM/SIGINT starts its graceful shutdown."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, edge.stop)
    await edge.run()


def main(argv: Sequence[str] | None = None) -> None:
    settings: EdgeSettings = load_settings(EdgeSettings, argv, prog="relay-edge")
    configure_logging()
    logging.getLogger("edge").info("settings: %s", settings.redacted())
    try:
        asyncio.run(serve_until_signalled(Edge(settings)))
    except OSError as exc:
        logging.getLogger("edge").error("cannot start: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
