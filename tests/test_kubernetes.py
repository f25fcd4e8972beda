"""deploy/kubernetes: valid objects for the Kubernetes API, and true to the services they run.

Every document of every manifest is checked against the API's own schemas in strict mode
(an unknown or misspelt field fails) for one stated Kubernetes release; every RELAY_*
variable the manifests set is a setting of the service that reads it and parses as one;
the probes, the stop grace period, the metrics ports and the NATS URLs agree with what
the edge, metering and the NATS chart's values do.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edge.settings import EdgeSettings
from metering.service import MeteringSettings
from runtime.settings import load_settings
from schemas.subjects import is_valid_edge_id
from schemas.tiers import DEFAULT_TIERS, load_tiers

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"

#: The Kubernetes release the manifests are validated against: the oldest they claim
#: (deploy/kubernetes/README.md). Only stable APIs are used (apps/v1, v1, policy/v1).
KUBERNETES_VERSION = "1.31"

#: Files of deploy/kubernetes that are YAML but not Kubernetes objects.
NOT_MANIFESTS = {"kustomization.yaml", "nats-values.yaml"}

#: Variables metering is given ahead of its settings class: the metrics port for
#: metering is being added alongside these manifests. While MeteringSettings lacks the
#: matching field, only these two names are let through; once the field is there, the
#: ordinary check below covers them like every other variable.
METERING_VARIABLES_BEING_ADDED = {"RELAY_METRICS_PORT", "RELAY_METRICS_HOST"}

#: A pod name the edge Deployment can produce, at its longest: the Deployment's name,
#: the ReplicaSet's template hash (up to 10 characters) and the pod's 5-character suffix.
EXAMPLE_POD_SUFFIX = "-7d9f8c6b5f-x2x4q"


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in documents(path)]


def the(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


EDGE = ("Deployment", "termrelay-edge")
METERING = ("Deployment", "termrelay-metering")


def container(deployment: tuple[str, str]) -> dict[str, Any]:
    (only,) = the(*deployment)["spec"]["template"]["spec"]["containers"]
    return only


def pod_spec(deployment: tuple[str, str]) -> dict[str, Any]:
    return the(*deployment)["spec"]["template"]["spec"]


def env_of(deployment: tuple[str, str]) -> dict[str, Any]:
    """The container's variables: a plain value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment).get("env", [])}


def literal_env(deployment: tuple[str, str]) -> dict[str, str]:
    """The variables as the process would see them, valueFrom ones given an example value
    of the kind Kubernetes would put there."""
    name = the(*deployment)["metadata"]["name"]
    out = {}
    for key, value in env_of(deployment).items():
        if isinstance(value, str):
            out[key] = value
        elif value.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            out[key] = name + EXAMPLE_POD_SUFFIX
        elif "secretKeyRef" in value:
            out[key] = "an-operator-token-from-the-secret"
        else:
            raise AssertionError(f"{key}: no example for {value}")
    return out


def variables_of(cls: type) -> set[str]:
    return {f"RELAY_{f.name.upper()}" for f in dataclasses.fields(cls)}


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return number


# --- the API's schemas ----------------------------------------------------------------


def validate_strictly(doc: dict[str, Any]) -> str:
    """Validate `doc`; a failure names the field and the reason (not the whole schema)."""
    try:
        return kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}", pytrace=False)


@pytest.mark.parametrize(
    "path, index",
    [(p.name, i) for p in manifest_files() for i in range(len(documents(p)))],
)
def test_every_manifest_document_validates_strictly_against_the_kubernetes_schemas(path: str, index: int) -> None:
    doc = documents(KUBE / path)[index]
    assert validate_strictly(doc) == KUBERNETES_VERSION  # that release's schema, not an older fallback


def test_strict_validation_rejects_a_misspelt_field() -> None:
    # The check above would pass anything if the validator ignored unknown fields.
    deployment = copy.deepcopy(the(*EDGE))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 75
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_except_the_example_secret() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    manifests = {p.name for p in manifest_files()}
    # An example Secret applied as it is would install a token everyone knows.
    assert listed == {name for name in manifests if not name.endswith(".example.yaml")}
    for generator in kustomization.get("configMapGenerator", []):
        for file in generator["files"]:
            assert (KUBE / file.split("=")[-1]).is_file(), file


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_the_kustomization_builds_into_valid_objects_that_mount_the_generated_tiers() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60, check=True)
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    for doc in docs:
        validate_strictly(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "termrelay", doc["metadata"]["name"]
    (tiers,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert tiers["metadata"]["name"].startswith("termrelay-tiers-")  # hashed: a change rolls the pods
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {EDGE[1], METERING[1]}
    for d in deployments:
        names = [v["configMap"]["name"] for v in d["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
        assert names == [tiers["metadata"]["name"]], d["metadata"]["name"]


# --- the settings the manifests set ------------------------------------------------------


def test_every_relay_variable_of_the_edge_is_an_edge_setting() -> None:
    unknown = {name for name in env_of(EDGE) if name.startswith("RELAY_")} - variables_of(EdgeSettings)
    assert unknown == set()


def test_every_relay_variable_of_metering_is_a_metering_setting() -> None:
    known = variables_of(MeteringSettings)
    pending = METERING_VARIABLES_BEING_ADDED - known
    unknown = {name for name in env_of(METERING) if name.startswith("RELAY_")} - known - pending
    assert unknown == set()


def test_the_edge_environment_makes_valid_edge_settings() -> None:
    # The values parse and pass the edge's own checks (URLs, ports, the pod name as edge id).
    settings = load_settings(EdgeSettings, [], literal_env(EDGE))
    assert settings.edge_id == EDGE[1] + EXAMPLE_POD_SUFFIX
    assert is_valid_edge_id(settings.edge_id)
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    assert settings.kv_replicas == 3
    assert settings.admin_token


def test_the_metering_environment_makes_valid_metering_settings() -> None:
    settings = load_settings(MeteringSettings, [], literal_env(METERING))
    assert settings.kv_replicas == 3


def test_the_edge_id_comes_from_the_pod_name() -> None:
    assert env_of(EDGE)["RELAY_EDGE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert the(*EDGE)["spec"]["replicas"] == 3


def test_the_admin_token_comes_from_the_secret_the_example_describes() -> None:
    ref = env_of(EDGE)["RELAY_ADMIN_TOKEN"]["secretKeyRef"]
    secret = the("Secret", ref["name"])
    assert ref["key"] in secret.get("stringData", secret.get("data", {}))


def test_edges_and_metering_read_the_same_tiers_file_from_the_tiers_config_map() -> None:
    generator_files = [
        f.split("=")[-1]
        for g in yaml.safe_load((KUBE / "kustomization.yaml").read_text())["configMapGenerator"]
        if g["name"] == "termrelay-tiers"
        for f in g["files"]
    ]
    paths = set()
    for deployment in (EDGE, METERING):
        path = Path(env_of(deployment)["RELAY_TIERS_FILE"])
        paths.add(path)
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert volumes[mount["name"]]["configMap"]["name"] == "termrelay-tiers"
        assert path.name in generator_files
    assert len(paths) == 1


def test_the_shipped_tiers_file_loads_and_keeps_the_default_tiers() -> None:
    assert set(DEFAULT_TIERS) <= set(load_tiers(KUBE / "tiers.toml"))


def test_no_pod_gets_service_link_variables_and_no_service_name_could_make_relay_ones() -> None:
    # Kubernetes turns Service "x-y" into X_Y_PORT, X_Y_SERVICE_HOST, ... in every pod.
    for deployment in (EDGE, METERING):
        assert pod_spec(deployment)["enableServiceLinks"] is False, deployment
    for service in (d for d in all_documents() if d["kind"] == "Service"):
        assert not service["metadata"]["name"].upper().replace("-", "_").startswith("RELAY_")


# --- probes, stopping, rolling -----------------------------------------------------------


def test_edge_readiness_probe_is_readyz_and_liveness_is_healthz_on_the_public_port() -> None:
    c = container(EDGE)
    public = int(env_of(EDGE)["RELAY_PORT"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == public
    assert port_number(c, c["livenessProbe"]["httpGet"]["port"]) == public


def test_edge_grace_period_covers_every_bounded_phase_of_its_shutdown() -> None:
    # edge/server.py `_shutdown`, phase by phase (`EdgeSettings.longest_graceful_stop_s`).
    # Settings left out count at their defaults.
    s = load_settings(EdgeSettings, [], literal_env(EDGE))
    assert pod_spec(EDGE)["terminationGracePeriodSeconds"] > s.longest_graceful_stop_s


def test_the_shutdown_settings_are_set_explicitly_on_the_edge() -> None:
    # So that the grace period's relation to them is visible in edge.yaml itself.
    env = env_of(EDGE)
    for name in ("RELAY_DRAIN_GRACE_MS", "RELAY_DRAIN_MS", "RELAY_CLOSE_TIMEOUT_MS", "RELAY_SHUTDOWN_RELEASE_MS", "RELAY_SHUTDOWN_USAGE_MS"):
        assert name in env, name


def test_edge_rollout_replaces_one_edge_at_a_time_and_waits_out_each_drain() -> None:
    spec = the(*EDGE)["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    s = load_settings(EdgeSettings, [], literal_env(EDGE))
    assert spec["minReadySeconds"] * 1000 >= s.drain_grace_ms + s.drain_ms


def test_disruption_budgets_and_the_service_select_the_pods_they_are_for() -> None:
    for deployment, budget in ((EDGE, "termrelay-edge"), (METERING, "termrelay-metering")):
        labels = the(*deployment)["spec"]["template"]["metadata"]["labels"]
        pdb = the("PodDisruptionBudget", budget)["spec"]
        assert pdb["maxUnavailable"] == 1
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        assert the(*deployment)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = the("Service", "termrelay-edge")["spec"]
    assert service["selector"].items() <= the(*EDGE)["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["ports"]
    assert port_number(container(EDGE), port["targetPort"]) == int(env_of(EDGE)["RELAY_PORT"]) == port["port"]


def test_metering_runs_two_replicas_of_relay_metering() -> None:
    assert the(*METERING)["spec"]["replicas"] == 2
    assert container(METERING)["command"] == ["relay-metering"]
    assert container(EDGE)["command"] == ["relay-edge"]


# --- metrics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("deployment, port", [(EDGE, 9090), (METERING, 9091)])
def test_prometheus_annotations_point_at_the_metrics_port_the_service_serves(deployment: tuple[str, str], port: int) -> None:
    annotations = the(*deployment)["spec"]["template"]["metadata"]["annotations"]
    env = env_of(deployment)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(env["RELAY_METRICS_PORT"]) == port
    assert port_number(container(deployment), "metrics") == port
    assert env["RELAY_METRICS_HOST"] == "0.0.0.0"  # a scraper in another pod must reach it


def test_the_edge_service_does_not_expose_the_metrics_port() -> None:
    exposed = {p["port"] for p in the("Service", "termrelay-edge")["spec"]["ports"]}
    assert int(env_of(EDGE)["RELAY_METRICS_PORT"]) not in exposed


# --- the image and how it runs ------------------------------------------------------------


def test_pods_run_the_project_image_as_its_user_with_a_read_only_root() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"useradd[^\n]*--uid (\d+)", dockerfile).group(1))
    assert re.search(r"^USER \S+", dockerfile, re.MULTILINE)
    for deployment in (EDGE, METERING):
        c, pod = container(deployment), pod_spec(deployment)
        assert c["image"] == f"termrelay:{version}"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


# --- NATS: the Helm chart's values -----------------------------------------------------------


def nats_values() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "nats-values.yaml").read_text())


def test_nats_values_make_a_three_node_jetstream_cluster_on_file_storage() -> None:
    config = nats_values()["config"]
    assert config["cluster"]["enabled"] is True
    assert config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    for deployment in (EDGE, METERING):
        assert int(env_of(deployment)["RELAY_KV_REPLICAS"]) == config["cluster"]["replicas"]


def test_nats_values_fsync_every_write_and_carry_8mb_messages_like_deploy_nats_conf() -> None:
    config = nats_values()["config"]
    assert config["jetstream"]["merge"]["sync_interval"] == "always"
    assert config["merge"]["max_payload"] == "<< 8MB >>"  # the chart writes << … >> unquoted
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert "sync_interval: always" in conf and "max_payload: 8MB" in conf


def test_nats_values_keep_the_monitor_port_that_the_charts_js_enabled_only_check_uses() -> None:
    assert nats_values()["config"]["monitor"]["enabled"] is True


def test_edges_and_metering_name_every_node_of_the_chart_cluster() -> None:
    # An edge whose NATS node goes into lame-duck mode moves to another node it knows;
    # through the client Service alone it would know none (edge/nats_move.py).
    values = nats_values()
    name = values["fullnameOverride"]
    nodes = {f"nats://{name}-{i}.{name}-headless:4222" for i in range(values["config"]["cluster"]["replicas"])}
    for deployment in (EDGE, METERING):
        assert set(env_of(deployment)["RELAY_NATS_URL"].split(",")) == nodes, deployment
