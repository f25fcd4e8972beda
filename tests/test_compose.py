"""compose.yaml runs on a fresh machine: nothing it needs is pulled from a registry that has no such image;
Prometheus scrapes every edge and metering service, and Grafana gets its data source and dashboard."""

import json
import re
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


# --- Prometheus and Grafana ------------------------------------------------------------------

GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DATASOURCES_FILE = "/etc/grafana/provisioning/datasources/prometheus.yml"  # in the grafana container


def _compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _relay_services(role: str) -> dict[str, dict]:
    """The compose services that run relay-edge (the image's CMD) or relay-metering."""
    services = _compose()["services"]
    found = {}
    for name, service in services.items():
        if not str(service.get("image", "")).startswith("termrelay"):
            continue
        entrypoint = service.get("entrypoint") or ["relay-edge"]
        program = entrypoint[0] if isinstance(entrypoint, list) else entrypoint.split()[0]
        if program == f"relay-{role}":
            found[name] = service
    return found


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of each volume the service mounts from the repository."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, target = (volume.split(":") + [""])[:2]
        if source.startswith(("./", "../", "/")):
            mounts.append((source, target))
    return mounts


def _mounted_at(service: dict, container_path: str) -> Path:
    """The repository file or folder the service sees at `container_path` (a bind mount of
    it, or of a folder above it)."""
    best = None
    for source, target in _bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[1]):
                best = (source, target)
    assert best is not None, f"nothing of the repository is mounted at {container_path}"
    source, target = best
    return (ROOT / source / container_path[len(target) :].lstrip("/")).resolve()


def _dashboard() -> dict:
    return json.loads((GRAFANA_DASHBOARDS / "termrelay.json").read_text())


def _all_panels(panels: list[dict]) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels") or []))
    return out


def test_compose_yaml_parses_with_edges_metering_prometheus_and_grafana():
    services = _compose()["services"]
    assert {"edge1", "edge2"} <= set(_relay_services("edge"))
    assert {"metering1", "metering2"} <= set(_relay_services("metering"))
    assert {"prometheus", "grafana"} <= set(services)
    # The earlier services are still there.
    assert {"nats1", "nats2", "nats3", "admin", "proxy"} <= set(services)


def test_prometheus_and_grafana_images_are_pinned_to_a_version():
    services = _compose()["services"]
    for name, repository in (("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")):
        image = services[name]["image"]
        assert image.startswith(f"{repository}:"), (name, image)
        tag = image.split(":", 1)[1]
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release, not {tag!r}"


def test_every_file_or_folder_a_service_mounts_from_the_repository_exists():
    services = _compose()["services"]
    checked = 0
    for name, service in services.items():
        for source, _ in _bind_mounts(service):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            checked += 1
    assert checked >= 7  # nats.conf ×3, nginx.conf, prometheus.yml, grafana's three


def test_edges_and_metering_serve_metrics_on_the_compose_network_and_publish_no_port_for_them():
    for role, port in (("edge", "9090"), ("metering", "9091")):
        for name, service in _relay_services(role).items():
            env = _environment(service)
            assert env.get("RELAY_METRICS_PORT") == port, (name, env.get("RELAY_METRICS_PORT"))
            assert env.get("RELAY_METRICS_HOST") == "0.0.0.0", name
            published = [str(p.get("target") if isinstance(p, dict) else p) for p in service.get("ports") or []]
            assert not [p for p in published if p.split(":")[-1].split("/")[0] == port], f"{name} publishes {port}"


def test_prometheus_scrapes_every_edge_and_metering_service_at_its_metrics_port():
    prometheus = _compose()["services"]["prometheus"]
    config_file = _mounted_at(prometheus, "/etc/prometheus/prometheus.yml")
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(config_file.read_text())
    scrape_configs = config["scrape_configs"]
    assert config["global"]["scrape_interval"] == "15s"
    targets = {
        target
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs") or []
        for target in static["targets"]
    }
    expected = {
        f"{name}:{_environment(service)['RELAY_METRICS_PORT']}"
        for role in ("edge", "metering")
        for name, service in _relay_services(role).items()
    }
    assert len(expected) >= 4
    assert expected <= targets, f"not scraped: {sorted(expected - targets)}"
    # The dashboard tells the services apart by job.
    jobs = {job["job_name"]: {t for s in job["static_configs"] for t in s["targets"]} for job in scrape_configs}
    assert {f"{name}:9090" for name in _relay_services("edge")} <= jobs["relay-edge"]
    assert {f"{name}:9091" for name in _relay_services("metering")} <= jobs["relay-metering"]


def test_grafana_is_published_on_3000_and_prometheus_on_the_hosts_loopback_only():
    services = _compose()["services"]
    assert "3000:3000" in [str(p) for p in services["grafana"]["ports"]]
    for port in services["prometheus"].get("ports") or []:
        assert str(port).startswith("127.0.0.1:"), port


def test_grafana_provisions_the_prometheus_datasource_and_the_mounted_dashboard_folder():
    grafana = _compose()["services"]["grafana"]
    datasources = yaml.safe_load(_mounted_at(grafana, DATASOURCES_FILE).read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the prometheus service, in the container's port

    providers = yaml.safe_load(_mounted_at(grafana, "/etc/grafana/provisioning/dashboards/termrelay.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert _mounted_at(grafana, folder) == GRAFANA_DASHBOARDS.resolve()
    assert (GRAFANA_DASHBOARDS / "termrelay.json").is_file()
    home = _environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert _mounted_at(grafana, home).is_file(), home


def test_the_dashboard_parses_and_every_panel_uses_the_provisioned_datasource():
    grafana = _compose()["services"]["grafana"]
    datasources = yaml.safe_load(_mounted_at(grafana, DATASOURCES_FILE).read_text())
    uid = datasources["datasources"][0]["uid"]
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    # The classic JSON model (panels, schemaVersion): what file provisioning loads.
    assert "panels" in dashboard and "elements" not in dashboard
    panels = [p for p in _all_panels(dashboard["panels"]) if p.get("type") != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["datasource"]["uid"] == uid, variable["name"]
    ids = [p["id"] for p in _all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "two panels share an id"


def test_each_edge_stop_grace_period_is_above_its_longest_graceful_stop():
    # Compose SIGKILLs an edge its stop_grace_period after SIGTERM: a drain cut short
    # loses the last usage and tells peers `timeout` instead of `server_restart`.
    from edge.settings import EdgeSettings

    for name, service in _relay_services("edge").items():
        grace = re.fullmatch(r"(\d+)s", str(service["stop_grace_period"]))
        assert grace, f"{name}: stop_grace_period {service['stop_grace_period']!r} is not in seconds"
        env = {k: v for k, v in _environment(service).items() if k.startswith("RELAY_") and "$" not in v}
        settings = EdgeSettings(**{k.removeprefix("RELAY_").lower(): int(v) for k, v in env.items() if k.endswith("_MS")})
        assert int(grace.group(1)) > settings.longest_graceful_stop_s, name


def test_prometheus_loads_the_alert_rules_compose_mounts_and_each_alert_is_explained_in_the_readme():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    prometheus = _compose()["services"]["prometheus"]
    for rule_file in config["rule_files"]:
        assert _mounted_at(prometheus, rule_file).is_file(), rule_file
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Alerts") :].split("\n### ", 1)[0]
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert f"`{rule['alert']}`" in section, f"{rule['alert']} is not explained in README, Operations, Alerts"
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
