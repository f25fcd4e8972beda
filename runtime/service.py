"""Running a service: logging, signals, the event loop, keeping its loops running, and a
failed start explained in one line."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, Protocol

import msgspec
import nats.errors

from runtime.backoff import Backoff
from runtime.settings import redact_urls
from schemas.tiers import TierFileError

log = logging.getLogger(__name__)

#: A failure after a run this long starts the waits before a restart over.
FAILURES_APART_S = 5.0


# Fields a log call may add (`extra=`) that the JSON format carries as fields of their own.
LOG_FIELDS = ("event", "socket", "peer", "room", "role", "status", "code", "reason", "address", "duration_s",
              "frames_in", "frames_out", "settings", "service")  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the fields
    of `LOG_FIELDS` a call gave, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


def configure_logging(log_format: str = "text", log_level: str = "info") -> None:
    """Logging for a service (RELAY_LOG_FORMAT, RELAY_LOG_LEVEL), to standard error."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    # websockets logs every HTTP request at INFO (health probes would drown the log), and at
    # DEBUG every frame's content, secrets and payloads included: never below WARNING,
    # whatever RELAY_LOG_LEVEL says.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("edge.websockets").setLevel(logging.WARNING)  # the same, for the edge's connections
    # nats-py at DEBUG shows protocol lines (subjects, and CONNECT with credentials).
    logging.getLogger("nats").setLevel(max(logging.INFO, root.level))


def log_settings(logger: logging.Logger, settings: Any) -> None:
    """The settings a service starts with, in one readable line, secrets masked."""
    logger.info("settings: %s", settings.described(), extra={"settings": settings.redacted()})


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


# Linux's hard limit can be "unlimited"; a soft limit cannot be set to that.
_OPEN_FILES_CEILING = 1 << 20


def raise_open_files_limit(logger: logging.Logger) -> int:
    """Raise the soft limit of open files to the hard one, and say so: each client socket
    is a file, and a default soft limit of 1,024 would refuse sockets long before the
    machine must. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open files: could not raise the soft limit of %d to %d (%s)", soft, target, exc)
            return soft
        logger.info("open files: soft limit raised from %d to %d (the hard limit); each client socket takes one", soft, target)
        return target
    logger.info("open files: limit %d (the hard limit); each client socket takes one", soft)
    return soft


def tune_garbage_collector(logger: logging.Logger, full_every: int) -> None:
    """Make the cyclic garbage collector's full collections rarer, and leave what the
    process imported out of them.

    A full collection walks every object the process holds (for an edge with 18,000
    sockets, millions) and stops everything while it does. Python attempts one after every
    10 collections of the middle generation; in a reconnect storm, where every socket's
    objects are new and its requests wait long enough to age, that was 30 to 57 full
    collections and 41 % of the edge's CPU (issue 18). Attempted after every `full_every`
    instead (Python still runs one only once a quarter of the heap is new since the last),
    the same storm spent 20 s in the collector instead of 54 s. The young generations keep
    Python's thresholds: larger ones made single collections pauses of seconds."""
    gc.collect()
    gc.freeze()  # modules, classes, settings: alive for the process's life, never garbage
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, full_every)
    logger.info(
        "garbage collector: thresholds %d, %d, %d (a full collection attempted after every %d of the middle "
        "generation; Python's default is %d); %d objects of the start left out of collections",
        young, middle, full_every, full_every, old, gc.get_freeze_count(),
    )  # fmt: skip


def run_event_loop(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    """Run `main` to completion, on uvloop when asked and installed (it moves each frame
    through the event loop in less time than asyncio's own loop)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using asyncio's event loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


async def keep_running(
    what: str, run_once: Callable[[], Awaitable[None]], stopping: asyncio.Event, failures_apart_s: float = FAILURES_APART_S
) -> None:
    """Run `run_once` again each time it returns, until `stopping`; after a failure, wait
    first (0.1 s, doubling up to 5 s while failures follow each other: a failure after a
    run of `failures_apart_s` or more starts again at 0.1 s). A bug in one loop must not
    end the service, and with it every client."""
    backoff = Backoff(0.1, 5.0)
    while not stopping.is_set():
        began = time.monotonic()
        try:
            await run_once()
            backoff.reset()
        except asyncio.CancelledError:
            raise
        except Exception:
            if time.monotonic() - began >= failures_apart_s:
                backoff.reset()
            wait = backoff.next()
            log.warning("%s failed; recreating it in %.1fs", what, wait, exc_info=True)
            await asyncio.sleep(wait)


class StartError(Exception):
    """A service cannot start; the message is one line: the cause. `hint`, if a subclass
    sets one, says what to do."""

    hint = ""


def start_error(exc: BaseException, *, nats_url: str, host: str | None = None, port: int | None = None) -> str | None:
    """The one line that explains a failed start, or None for an error nobody foresaw.

    An ExceptionGroup (a TaskGroup's) is explained by the first of its errors that can be.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            line = start_error(inner, nats_url=nats_url, host=host, port=port)
            if line:
                return line
        return None
    if isinstance(exc, (StartError, TierFileError)):
        return f"{exc}; {exc.hint}" if exc.hint else str(exc)
    where = f"{host}:{port}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use; stop what holds it, or choose another (--port / RELAY_PORT)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: this machine has no address {host} (--host / RELAY_HOST; 0.0.0.0 is every address)"
    if isinstance(exc, OSError) and exc.errno == errno.EACCES and port is not None:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root; choose another with --port)"
    if isinstance(exc, (nats.errors.NoServersError, nats.errors.TimeoutError, ConnectionRefusedError)):
        return f"cannot reach NATS at {redact_urls(nats_url)} ({exc or type(exc).__name__}); start it, or fix --nats-url / RELAY_NATS_URL"
    if isinstance(exc, OSError) and port is not None:
        return f"cannot start (listening on {where}, NATS at {redact_urls(nats_url)}): {exc.strerror or exc}"
    return None


def exit_if_start_fails(prog: str, run: Callable[[], None], **context: Any) -> None:
    """Run `run`; a foreseen failure to start ends the process with one line and exit 1
    (an unforeseen one keeps its traceback: that is a bug to report)."""
    try:
        run()
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        line = start_error(exc, **context)
        if line is None:
            raise
        fail(prog, line)


def fail(prog: str, line: str) -> NoReturn:
    """End the process with `prog: error: line` on standard error and exit code 1."""
    logging.shutdown()
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    sys.exit(1)
