"""The lock (requirements/*.txt) is what gets installed, and it matches pyproject.toml."""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = {name: ROOT / "requirements" / f"{name}.txt" for name in ("runtime", "dev", "bench")}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: Path) -> dict[str, str]:
    """Package → version of the pins in one lock that apply on this machine."""
    found = {}
    lines = lock.read_text().splitlines()
    for line in lines:
        match = PIN.match(line)
        if not match:
            continue
        name, version, marker = match.groups()
        if marker and not Requirement(f"x; {marker}").marker.evaluate():
            continue
        found[canonicalize_name(name)] = version
    return found


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in extras:
        listed += project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


@pytest.mark.parametrize(("lock", "extras"), [("runtime", ()), ("dev", ("dev",)), ("bench", ("dev", "bench"))])
def test_each_lock_pins_every_dependency_within_its_range(lock, extras):
    pinned = pins(LOCKS[lock])
    environment = default_environment()
    for requirement in project_requirements(*extras):
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in requirements/{lock}.txt: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements/{lock}.txt pins {name}=={pinned[name]}, outside {requirement}: run `make lock`"
        )
    build_backend = Requirement(tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"][0])
    assert build_backend.specifier.contains(pinned[canonicalize_name(build_backend.name)])


def test_the_locks_agree_on_every_version():
    everything = pins(LOCKS["bench"])
    for lock in ("runtime", "dev"):
        for name, version in pins(LOCKS[lock]).items():
            assert everything[name] == version, f"{lock}.txt and bench.txt disagree on {name}: run `make lock`"


def test_every_pin_carries_a_hash():
    for lock in LOCKS.values():
        text = lock.read_text()
        for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2]):
            if "==" in block.splitlines()[0]:
                assert "--hash=sha256:" in block, f"{lock.name}: no hash for {block.splitlines()[0]}"


def test_installs_go_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in makefile and "-r requirements/dev.txt" in makefile
    assert "-r requirements/bench.txt" in makefile
    assert "--require-hashes --no-deps -r requirements/runtime.txt" in dockerfile
    # The project itself is installed without resolving (or fetching) anything more.
    assert "--no-deps --no-build-isolation" in makefile and "--no-deps --no-build-isolation" in dockerfile


def test_the_suite_runs_on_exactly_the_locked_versions():
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not the locked venv ({sys.prefix}): `make test-latest` and `make test-oldest` run off the lock on purpose")
    for name, version in pins(LOCKS["dev"]).items():
        assert metadata.version(name) == version, f"{name} {metadata.version(name)} is installed, the lock says {version}"
