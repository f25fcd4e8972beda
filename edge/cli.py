"""`relay-edge`: run one edge process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

import nats.errors

from edge.server import Edge
from edge.settings import EdgeSettings, load_settings, redact_urls


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # websockets logs every HTTP request at INFO; health probes would drown the log.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("edge.websockets").setLevel(logging.WARNING)  # the same, for our server's connections


class Service(Protocol):
    """A long-running service (`Edge`, `Metering`): runs until stopped."""

    @property
    def serving(self) -> bool: ...

    def stop(self) -> None: ...

    async def run(self) -> None: ...


async def serve_until_signalled(service: Service) -> None:
    """Run `service`; SIGTERM/SIGINT starts its graceful stop, or ends a start that is still waiting."""
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(service.run())

    def on_signal() -> None:
        if service.serving:
            service.stop()
        else:
            run.cancel()  # still waiting for NATS: there is nothing to hand over or finish

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await run
    except asyncio.CancelledError:
        if not run.cancelled():
            raise
        logging.getLogger(type(service).__name__.lower()).info("stopped before it was serving")


def run_event_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    """Run `main` to completion, on uvloop when asked and installed (it moves each frame
    through the event loop in less time than asyncio's own loop)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            logging.getLogger("edge").warning("uvloop is not installed; using asyncio's event loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    settings: EdgeSettings = load_settings(EdgeSettings, argv, prog="relay-edge")
    configure_logging()
    logging.getLogger("edge").info("settings: %s", settings.redacted())
    try:
        run_event_loop(serve_until_signalled(Edge(settings)), settings.uvloop)
    except (OSError, nats.errors.NoServersError, nats.errors.TimeoutError) as exc:
        logging.getLogger("edge").error(
            "cannot start (NATS at %s, listening on %s:%s): %s",
            redact_urls(settings.nats_url),
            settings.host,
            settings.port,
            exc or type(exc).__name__,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
