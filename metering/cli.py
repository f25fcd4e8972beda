"""`relay-metering`: run one metering process until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import nats.errors

from accounts.tiers import TierFileError
from edge.cli import configure_logging, run_event_loop, serve_until_signalled
from edge.settings import load_settings, redact_urls
from metering.service import Metering, MeteringSettings

log = logging.getLogger("metering")


def main(argv: Sequence[str] | None = None) -> None:
    settings: MeteringSettings = load_settings(MeteringSettings, argv, prog="relay-metering")
    configure_logging()
    log.info("settings: nats_url=%s kv_replicas=%d ack_wait_ms=%d", redact_urls(settings.nats_url), settings.kv_replicas, settings.ack_wait_ms)
    try:
        run_event_loop(serve_until_signalled(Metering(settings)), settings.uvloop)
    except TierFileError as exc:
        log.error("tiers file: %s", exc)
        sys.exit(1)
    except (OSError, nats.errors.NoServersError, nats.errors.TimeoutError) as exc:
        log.error("cannot start (NATS at %s): %s", redact_urls(settings.nats_url), exc or type(exc).__name__)
        sys.exit(1)


if __name__ == "__main__":
    main()
