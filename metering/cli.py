"""`relay-metering`: run one metering process until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from edge.cli import configure_logging, exit_if_start_fails, run_event_loop, serve_until_signalled
from edge.settings import load_settings, redact_urls
from metering.service import Metering, MeteringSettings

log = logging.getLogger("metering")


def main(argv: Sequence[str] | None = None) -> None:
    settings: MeteringSettings = load_settings(MeteringSettings, argv, prog="relay-metering")
    configure_logging()
    log.info("settings: nats_url=%s kv_replicas=%d ack_wait_ms=%d", redact_urls(settings.nats_url), settings.kv_replicas, settings.ack_wait_ms)
    exit_if_start_fails(
        "relay-metering",
        lambda: run_event_loop(serve_until_signalled(Metering(settings)), settings.uvloop),
        nats_url=settings.nats_url,
    )


if __name__ == "__main__":
    main()
