"""Prometheus metrics for every service, made with prometheus_client.

Each service instance has a registry of its own (`service_registry`): the process's
`process_*` and `python_*` metrics, `termrelay_build_info`, and what the service adds. A
test runs several edges in one process, so nothing is registered in the library's global
registry. What storage costs is measured where storage is called (`timed_storage`), in
collectors shared by every service of the process.

No metric has a label naming a room, a user or a key: labels are few and bounded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import platform
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from runtime.connection import STORAGE_ERRORS

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Storage operations take from well under a millisecond (KV get, loopback) to the
# JetStream timeout (2 s) and the retry budgets (8 s).
STORAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

storage_seconds = Histogram(
    "relay_storage_operation_seconds",
    "Duration of KV and JetStream operations, by operation (failed ones included)",
    ["operation"],
    buckets=STORAGE_BUCKETS,
    registry=None,
)
storage_errors = Counter(
    "relay_storage_errors_total",
    "KV and JetStream operations that failed for storage reasons (timeouts, no leader, NATS away), by operation",
    ["operation"],
    registry=None,
)


def version() -> str:
    try:
        return metadata.version("termrelay")
    except metadata.PackageNotFoundError:
        return "unknown"


def service_registry(service: str) -> CollectorRegistry:
    """A registry for one service instance: process, platform and build metrics, storage timings."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    info = Gauge(
        "termrelay_build_info", "Always 1; the labels say what runs", ["service", "version", "python"], registry=registry
    )
    info.labels(service=service, version=version(), python=platform.python_version()).set(1)
    registry.register(storage_seconds)
    registry.register(storage_errors)
    return registry


def total(metric: Counter | Gauge) -> float:
    """What a counter counted, summed over its labels, or a gauge's value: read as a scrape
    reads it (prometheus_client has no public getter)."""
    return sum(sample.value for family in metric.collect() for sample in family.samples if not sample.name.endswith("_created"))


def timed_storage(operation: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async storage call: its duration in `relay_storage_operation_seconds`, its
    storage failures in `relay_storage_errors_total`, both labelled `operation`."""
    observe = storage_seconds.labels(operation=operation).observe
    count_error = storage_errors.labels(operation=operation).inc

    def decorate(call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(call)
        async def timed(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            except STORAGE_ERRORS:
                count_error()
                raise
            finally:
                observe(time.perf_counter() - start)

        return timed

    return decorate


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's metrics in the format the scraper asks for (its Accept header), and that
    format's content type."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serve `GET /metrics` of `registry` on host:port (a service without an HTTP server of
    its own: metering). One request per connection; anything else is 404."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = (request_line.split(" ") + ["", ""])[:3]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines if line)}
            if method == "GET" and target.partition("?")[0] == "/metrics":
                body, content_type = exposition(registry, headers.get("accept"))
                status = "200 OK"
            else:
                body, content_type, status = b"not found: this port serves /metrics only\n", "text/plain; charset=utf-8", "404 Not Found"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1") + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, UnicodeDecodeError):
            pass  # a scraper that went away, or not HTTP: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)
