"""compose.yaml runs on a fresh machine: nothing it needs is pulled from a registry that has no such image."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_every_service_of_the_termrelay_image_builds_it():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    ours = {name: service for name, service in services.items() if str(service.get("image", "")).startswith("termrelay")}
    assert {"edge1", "edge2", "metering1", "metering2", "admin"} <= set(ours)
    for name, service in ours.items():
        assert service.get("build") == ".", f"{name} uses the termrelay image without building it"


def test_the_nats_nodes_fsync_every_write_and_are_checked_with_js_enabled_only():
    # Issue 17: acknowledged usage, ledgers, accounts and keys survive a power loss of
    # every node only if each write is on disk before it is acknowledged.
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert "sync_interval: always" in conf
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name in ("nats1", "nats2", "nats3"):
        assert "/healthz?js-enabled-only=true" in " ".join(services[name]["healthcheck"]["test"]), name
