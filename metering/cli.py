"""`relay-metering`: run one metering process until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from metering.service import Metering, MeteringSettings
from runtime.service import configure_logging, exit_if_start_fails, log_settings, run_event_loop, serve_until_signalled
from runtime.settings import load_settings

log = logging.getLogger("metering")


def main(argv: Sequence[str] | None = None) -> None:
    settings: MeteringSettings = load_settings(MeteringSettings, argv, prog="relay-metering")
    configure_logging(settings.log_format, settings.log_level)
    log_settings(log, settings)
    exit_if_start_fails(
        "relay-metering",
        lambda: run_event_loop(serve_until_signalled(Metering(settings)), settings.uvloop),
        nats_url=settings.nats_url,
    )


if __name__ == "__main__":
    main()
