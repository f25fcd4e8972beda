"""A new user's first contact, through real subprocesses: `make run` (relay-local) and the
services refusing to start say why in one line, a second run leaves the first alone,
`kill -INT` of make ends everything, and relay-admin finds the local relay by itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from runtime.embedded_nats import free_port

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30


def http_request_sync(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(extra)
    return env


def _one_error_line(prog: str, done: subprocess.CompletedProcess[str], *mentions: str) -> str:
    """The last line of stderr is `prog: error: ...`, and no traceback came before it."""
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), done.stderr
    for word in mentions:
        assert word in last, last
    return last


class LocalRelay:
    """relay-local as a child process (its own session), with its banner read."""

    def __init__(self, data: Path, *args: str, **env: str) -> None:
        # Port 0: the relay takes a free one and the banner says which (a port picked here
        # could be taken by another test before the relay binds it).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge.local", *args],
            env=_env(RELAY_PORT="0", RELAY_LOCAL_DATA=str(data), **env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        )
        self.banner = ""
        deadline = time.monotonic() + TIMEOUT_S
        while "Ctrl-C" not in self.banner:
            line = self.process.stdout.readline()
            assert line and time.monotonic() < deadline, f"no banner: {self.process.stderr.read()}"
            self.banner += line
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)/healthz", self.banner).group(1))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        self.process.wait(TIMEOUT_S)


@pytest.fixture
def local_relay(tmp_path):
    relays: list[LocalRelay] = []

    def start(*args: str, **env: str) -> LocalRelay:
        relays.append(LocalRelay(tmp_path / "data", *args, **env))
        return relays[-1]

    yield start
    for relay in relays:
        relay.stop()


def _nats_pid(data: Path) -> int:
    """The PID of the nats-server a relay started on `data` (its command line names the folder)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"nats-server") for part in cmdline[:1]) and str(data).encode() in b" ".join(cmdline):
                return int(entry.name)
    raise AssertionError(f"no nats-server on {data}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_second_run_on_the_same_data_says_one_is_running_and_leaves_the_store_alone(local_relay, tmp_path):
    first = local_relay()
    nats_pid = _nats_pid(tmp_path / "data")
    second = subprocess.run(
        [sys.executable, "-m", "edge.local"], env=_env(RELAY_PORT=str(free_port()), RELAY_LOCAL_DATA=str(tmp_path / "data")),
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    _one_error_line("relay-local", second, "already running", str(first.process.pid))
    assert len(second.stderr.strip().splitlines()) == 1
    # The first relay and its one nats-server go on; no second server touched the store.
    assert first.process.poll() is None and _alive(nats_pid)
    assert "will rebuild" not in (tmp_path / "data" / "nats" / "nats-server.log").read_text()
    assert http_request_sync(first.port, "GET", "/healthz")[0] == 200


def test_kill_int_of_makes_pid_stops_the_relay_and_its_nats_server(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # The Makefile's own recipe, with this interpreter: make is the relay's parent, as in `make run`.
    (tmp_path / "Makefile").write_text(f"run:\n\t{sys.executable} -m edge.local --local-stop-with-parent true\n")
    data = tmp_path / "data"
    make = subprocess.Popen(
        ["make", "-s", "-f", str(tmp_path / "Makefile"), "run"],
        env=_env(RELAY_PORT="0", RELAY_LOCAL_DATA=str(data), PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True,
    )
    try:
        banner = ""
        while "Ctrl-C" not in banner:
            line = make.stdout.readline()
            assert line, "make run ended before its banner"
            banner += line
        relay_pid = json.loads((data / "relay.lock").read_text())["pid"]
        nats_pid = _nats_pid(data)
        os.kill(make.pid, signal.SIGINT)  # make's PID alone, not its process group
        make.wait(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while (_alive(relay_pid) or _alive(nats_pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(relay_pid) and not _alive(nats_pid)
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()


def test_relay_admin_finds_the_local_relay_by_itself(local_relay, tmp_path):
    relay = local_relay(RELAY_AUTH="required")
    assert ".venv/bin/relay-admin users add alice" in relay.banner

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        # No --nats-url and no RELAY_NATS_URL: as the banner's commands are written.
        return subprocess.run(
            [sys.executable, "-m", "accounts.admin", *args], env=_env(RELAY_LOCAL_DATA=str(tmp_path / "data")),
            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
        )

    added = admin("users", "add", "alice", "--email", "alice@example.com", "--tier", "pro")
    assert added.returncode == 0, added
    key = admin("keys", "create", "alice").stdout.splitlines()[-1]
    assert http_request_sync(relay.port, "GET", "/profile", {"Authorization": f"Bearer {key}"})[0] == 200
    relay.stop()
    # Once it stopped, the record it left is not followed: relay-admin falls back to its default.
    gone = admin("--nats-url", "nats://127.0.0.1:1", "users", "list")
    assert gone.returncode == 1
    assert json.loads((tmp_path / "data" / "relay.lock").read_text() or "{}") == {}


def test_a_port_in_use_is_one_line_for_relay_local_and_relay_edge(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        local = subprocess.run(
            [sys.executable, "-m", "edge.local"], env=_env(RELAY_PORT=port, RELAY_LOCAL_DATA=str(tmp_path / "a")),
            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
        )
        _one_error_line("relay-local", local, "in use", port, "RELAY_PORT")
        edge = subprocess.run(
            [sys.executable, "-m", "edge.cli", "--port", port, "--nats-url", "nats://127.0.0.1:1"],
            env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
        )
        _one_error_line("relay-edge", edge, "in use", port)


@pytest.mark.parametrize("prog, module", [("relay-local", "edge.local"), ("relay-edge", "edge.cli"), ("relay-metering", "metering.cli")])
def test_a_bad_tiers_file_is_one_line_naming_the_file(prog, module, tmp_path):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers.free\nmax_rooms = 'x'\n")
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=_env(RELAY_TIERS_FILE=str(tiers), RELAY_PORT=str(free_port()), RELAY_LOCAL_DATA=str(tmp_path / "d"), RELAY_NATS_URL="nats://127.0.0.1:1"),
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    _one_error_line(prog, done, str(tiers), "RELAY_TIERS_FILE")


@pytest.mark.parametrize("args", [["--port", "70000"], ["--nats-url", "not-a-url"]])
def test_relay_edge_refuses_bad_settings_at_start(args):
    done = subprocess.run([sys.executable, "-m", "edge.cli", *args], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("relay-edge: error: ")


def test_relay_local_help_lists_its_own_settings():
    done = subprocess.run([sys.executable, "-m", "edge.local", "--help"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0
    for name in ("RELAY_LOCAL_DATA", "RELAY_LOCAL_NATS_PORT", "RELAY_PORT"):
        assert name in done.stdout
