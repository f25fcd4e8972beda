"""`relay-edge`: run one edge process until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from edge.server import Edge
from edge.settings import EdgeSettings
from runtime.service import (
    configure_logging,
    exit_if_start_fails,
    log_settings,
    raise_open_files_limit,
    run_event_loop,
    serve_until_signalled,
    tune_garbage_collector,
)
from runtime.settings import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings: EdgeSettings = load_settings(EdgeSettings, argv, prog="relay-edge")
    configure_logging(settings.log_format, settings.log_level)
    log_settings(logging.getLogger("edge"), settings)
    raise_open_files_limit(logging.getLogger("edge"))
    tune_garbage_collector(logging.getLogger("edge"), settings.gc_full_every)
    exit_if_start_fails(
        "relay-edge",
        lambda: run_event_loop(serve_until_signalled(Edge(settings)), settings.uvloop),
        nats_url=settings.nats_url,
        host=settings.host,
        port=settings.port,
    )


if __name__ == "__main__":
    main()
