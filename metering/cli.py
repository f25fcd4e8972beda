"""`relay-metering`: run one metering process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import nats.errors

from accounts.tiers import TierFileError
from edge.cli import configure_logging, run_event_loop
from edge.settings import load_settings, redact_urls
from metering.service import Metering, MeteringSettings

log = logging.getLogger("metering")


async def serve_until_signalled(metering: Metering) -> None:
    """Run `metering`; SIGTERM/SIGINT stops it after the batch in hand."""
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(metering.run())

    def on_signal() -> None:
        if metering.ready.is_set():
            metering.stop()
        else:
            run.cancel()  # still starting: nothing in hand to finish

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await run
    except asyncio.CancelledError:
        if not run.cancelled():
            raise
        log.info("stopped before it was ready")


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
