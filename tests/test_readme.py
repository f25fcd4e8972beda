"""The README documents every setting and the two quick-start commands."""

import dataclasses
from pathlib import Path

from edge.settings import EdgeSettings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_documents_every_edge_setting_with_its_variable_and_flag():
    for f in dataclasses.fields(EdgeSettings):
        assert f"`RELAY_{f.name.upper()}`" in README, f.name
        assert f"`--{f.name.replace('_', '-')}`" in README, f.name


def test_readme_quick_start_shows_make_run_and_make_test():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick_start and "make test" in quick_start


def test_readme_documents_every_relay_admin_setting():
    from accounts.admin import AdminSettings

    for f in dataclasses.fields(AdminSettings):
        assert f"`RELAY_{f.name.upper()}`" in README, f.name


def test_every_test_the_readme_names_exists():
    import re

    sources = "\n".join(p.read_text() for p in (Path(__file__).parent).rglob("test_*.py"))
    defined = set(re.findall(r"def (test_\w+)", sources))
    named = set(re.findall(r"`(test_\w+)`", README))
    assert named - defined == set()


def test_readme_documents_every_relay_metering_setting_with_its_variable_and_flag():
    from metering.service import MeteringSettings

    for f in dataclasses.fields(MeteringSettings):
        assert f"`RELAY_{f.name.upper()}`" in README, f.name
        assert f"`--{f.name.replace('_', '-')}`" in README, f.name


def test_readme_relay_admin_commands_work_copied_as_they_are():
    # A bare `relay-admin` is not on PATH after `make run`: commands in shell blocks name
    # .venv/bin/relay-admin (or run it in compose), and need no NATS URL typed by hand.
    import re

    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if "relay-admin" in line]
    assert lines
    for line in lines:
        assert line.lstrip().startswith((".venv/bin/relay-admin", "docker compose run")), line
        assert "nats://…" not in line.split("#")[0], line
