"""The lock on `make run`'s data folder, and the record in it that `relay-admin` reads.

One `make run` per data folder: a second nats-server on the same JetStream store would
rebuild the first one's streams under it. The lock is an advisory `flock` on
`<data>/relay.lock`, held for the life of the process and dropped by the kernel whatever
way the process ends, so a crash never leaves a stale lock behind. The file holds the
relay's NATS URL and PID as JSON: `relay-admin` connects there by default, but only
while the process that wrote it lives.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "relay.lock"
DEFAULT_DATA = ".local"


class AlreadyRunning(Exception):
    """Another process holds the data folder."""


class LocalRelayLock:
    """The exclusive hold of one data folder by one running relay."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the folder, or raise AlreadyRunning (naming the holder's PID when known)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened without truncating: the holder's record must survive a failed attempt.
        file = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(file).get("pid")
            file.close()
            raise AlreadyRunning(f"pid {holder}" if holder else "another process") from None
        self._file = file
        self.record(pid=os.getpid())

    def record(self, **fields: Any) -> None:
        """Add `fields` to the record `relay-admin` reads."""
        assert self._file is not None, "acquire() first"
        current = _read_record(self._file)
        current.update(fields)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(current) + "\n")
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # nothing for relay-admin to find once we are gone
            self._file.close()  # closing drops the flock
            self._file = None


def _read_record(file: IO[str]) -> dict[str, Any]:
    file.seek(0)
    try:
        record = json.loads(file.read() or "{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def running_relay_nats_url(data_dir: str | Path = DEFAULT_DATA) -> str | None:
    """The NATS URL of the relay `make run` runs with data in `data_dir`, if one runs now."""
    try:
        with open(Path(data_dir) / LOCK_NAME) as file:
            record = _read_record(file)
    except OSError:
        return None
    pid, url = record.get("pid"), record.get("nats_url")
    if not isinstance(pid, int) or not isinstance(url, str) or not url:
        return None
    # Not by taking the lock ourselves: a relay starting that instant would find it held.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a relay that was killed left its record behind
    except PermissionError:
        pass  # alive, someone else's
    return url
