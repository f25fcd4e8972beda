"""The packages' imports go one way (README, How the code is built): schemas ← runtime ←
metering ← accounts ← edge; and inside `edge`, the protocol package does no I/O and
imports nothing of the asyncio side."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"accounts", "edge", "metering", "runtime", "schemas"}
# Libraries that do I/O or run an event loop: none belongs in the pure protocol package.
IO_LIBRARIES = {"asyncio", "nats", "websockets", "socket", "subprocess", "uvloop"}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def imported_by(package: str) -> dict[str, set[str]]:
    """File (relative to the root) → the modules it imports, for every file of `package`."""
    return {str(p.relative_to(ROOT)): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def offending(package: str, allowed: set[str]) -> list[str]:
    return [
        f"{path} imports {module}"
        for path, modules in imported_by(package).items()
        for module in sorted(modules)
        if module.split(".")[0] in OURS - allowed
    ]


#: Each package may import itself and those before it, never one after it.
ORDER = ["schemas", "runtime", "metering", "accounts", "edge"]


def test_the_packages_import_one_way() -> None:
    assert [line for n, package in enumerate(ORDER) for line in offending(package, set(ORDER[: n + 1]))] == []


def test_schemas_import_nothing_of_ours() -> None:
    assert offending("schemas", {"schemas"}) == []


def test_runtime_imports_only_schemas() -> None:
    assert offending("runtime", {"runtime", "schemas"}) == []


def test_nothing_outside_edge_imports_edge() -> None:
    outside = [p for p in ("accounts", "metering", "runtime", "schemas", "bench") if (ROOT / p).is_dir()]
    assert [line for package in outside for line in offending(package, OURS - {"edge"})] == []


def test_the_protocol_package_does_no_io_and_imports_nothing_of_the_asyncio_side() -> None:
    problems = []
    for path, modules in imported_by("edge/protocol").items():
        for module in sorted(modules):
            top = module.split(".")[0]
            if top in IO_LIBRARIES or (top == "edge" and not module.startswith("edge.protocol")):
                problems.append(f"{path} imports {module}")
    assert problems == []


def test_every_folder_of_code_is_a_package_that_an_install_includes() -> None:
    # setuptools' find leaves out folders without __init__.py: an installed relay (the
    # Dockerfile's) would miss them while an editable one still works.
    missing = [
        str(folder.relative_to(ROOT))
        for top in sorted(OURS)
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]
        if any(folder.glob("*.py")) and not (folder / "__init__.py").exists()
    ]
    assert missing == []


def test_the_dockerfile_copies_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert [top for top in sorted(OURS) if f"COPY {top} ./{top}" not in dockerfile] == []
