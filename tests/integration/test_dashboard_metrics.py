"""The Grafana dashboard (deploy/grafana/dashboards/termrelay.json) asks only for metrics the
services export: an edge and a metering service are scraped, and every metric name in every
panel's PromQL must be one of theirs. A renamed or removed metric fails here, not as an empty
panel in production."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import http_get, running_edges, running_metering

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "termrelay.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

OUR_PREFIXES = ("relay_", "process_", "termrelay_")
# Clauses whose parentheses hold label names, not series: `sum by (role) (…)`, `… on (instance) …`.
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# The sample names a family exposes beyond its own name, by the family's type.
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def metric_names(expr: str) -> set[str]:
    """The metric names of ours a PromQL expression reads: identifiers starting with
    relay_, process_ or termrelay_, outside strings, label matchers `{…}`, range and
    subquery brackets `[…]`, label lists of `by (…)` and the like, and not called as a
    function."""
    text = _STRING.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function (or an aggregation) called
        if name.startswith(OUR_PREFIXES):
            names.add(name)
    return names


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, inside rows too."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    found.append((panel.get("title", ""), target["expr"]))
            walk(panel.get("panels") or [])

    walk(dashboard["panels"])
    return found


def exported_names(bodies: list[str]) -> dict[str, str]:
    """Every family name (with its type) and sample name in these scrapes."""
    names: dict[str, str] = {}
    for body in bodies:
        for family in text_string_to_metric_families(body):
            names.setdefault(family.name, family.type)
            for sample in family.samples:
                names.setdefault(sample.name, "sample")
    return names


def not_exported(used: set[str], exported: dict[str, str]) -> set[str]:
    """The names in `used` that no scrape has: a histogram's _bucket/_sum/_count and a
    counter's _total count as their family, even before a labelled family has a sample."""
    missing = set()
    for name in used:
        if name in exported:
            continue
        if any(
            name.endswith(suffix) and exported.get(name[: -len(suffix)]) == kind
            for kind, suffixes in _SUFFIXES.items()
            for suffix in suffixes
        ):
            continue
        missing.add(name)
    return missing


def used_by_dashboard() -> dict[str, list[str]]:
    """Metric name → the titles of the panels that read it."""
    used: dict[str, list[str]] = {}
    for title, expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        for name in metric_names(expr):
            used.setdefault(name, []).append(title)
    return used


def used_by_alerts() -> dict[str, list[str]]:
    """Metric name → the alerts whose expression reads it."""
    used: dict[str, list[str]] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                used.setdefault(name, []).append(rule["alert"])
    return used


def test_metric_names_are_found_and_functions_labels_and_strings_are_not():
    expr = (
        'histogram_quantile(0.99, sum by (le, relay_label) (rate(relay_made_up_seconds_bucket{job="relay_x",'
        ' relay_label=~"$instance"}[$__rate_interval])))'
        " / on (instance) group_left (version) termrelay_fake_info"
        ' + sum(process_fake_total) without (relay_other) + label_replace(relay_g, "d", "relay_s", "i", "(.*)")'
    )
    assert metric_names(expr) == {"relay_made_up_seconds_bucket", "termrelay_fake_info", "process_fake_total", "relay_g"}
    assert metric_names("sum(rate(relay_frames_forwarded_total[5m:1m]))") == {"relay_frames_forwarded_total"}
    assert metric_names('count(up{job="relay-edge"})') == set()


def test_a_name_no_service_exports_is_reported():
    exported = {
        "relay_closes": "counter",  # a labelled counter with no sample yet
        "relay_frame_write_seconds": "histogram",
        "relay_connections": "gauge",
        "relay_connections_total": "sample",
    }
    used = {
        "relay_closes_total",
        "relay_frame_write_seconds_bucket",
        "relay_frame_write_seconds_count",
        "relay_connections",
        "relay_made_up_total",  # not a family
        "relay_connections_bucket",  # a gauge has no buckets
        "relay_closes_bucket",  # nor has a counter
    }
    assert not_exported(used, exported) == {"relay_made_up_total", "relay_connections_bucket", "relay_closes_bucket"}
    made_up = metric_names('sum(rate(relay_made_up_total{job="relay-edge"}[$__rate_interval]))')
    assert not_exported(made_up, exported) == {"relay_made_up_total"}


def test_the_dashboard_uses_at_least_15_metrics_and_every_one_is_in_the_readmes_metrics_section():
    used = used_by_dashboard()
    assert len(used) >= 15, sorted(used)
    text = (ROOT / "README.md").read_text()
    start = text.index("### Metrics")
    end = text.find("\n## ", start)
    section = text[start : end if end > 0 else None]
    undocumented = set()
    for name in used:
        if name.startswith("process_"):
            assert "`process_*`" in section
            continue
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        if not re.search(rf"\b({re.escape(name)}|{re.escape(family)})\b", section):
            undocumented.add(name)
    assert not undocumented, f"not in README, Operations, Metrics: {sorted(undocumented)}"


async def test_every_metric_the_dashboard_uses_is_exported_by_an_edge_or_metering(nats_url):
    async with running_metering(nats_url, metrics_port=0) as metering, running_edges(nats_url, 1) as (edge,):
        assert edge.metrics_port and metering.metrics_port
        bodies = []
        for port in (edge.metrics_port, metering.metrics_port):
            status, body = await http_get(port, "/metrics")
            assert status == 200, (port, status)
            bodies.append(body)
    exported = exported_names(bodies)
    # Both scrapes are real: each service's own families are there.
    assert "relay_connections" in exported and "relay_metering_usage_pending" in exported
    used = used_by_dashboard()
    missing = not_exported(set(used), exported)
    assert not missing, {name: used[name] for name in sorted(missing)}
    # And the alerts (deploy/prometheus/alerts.yml): a renamed metric must not silence one.
    alerting = used_by_alerts()
    assert len(alerting) >= 10, sorted(alerting)
    missing = not_exported(set(alerting), exported)
    assert not missing, {name: alerting[name] for name in sorted(missing)}
