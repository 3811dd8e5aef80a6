"""The Kubernetes manifests as users apply them: infra/k8s/overlays rendered offline by
`kubectl kustomize`, and checked for what a platform team expects of them: Secrets by
reference, configuration changes that roll the pods, disruption budgets that protect
something, graceful API rollouts, startup probes, no service-account token, network
policies, autoscaler names that follow the topic prefix, and custom resources (KEDA, the
Prometheus Operator) valid against their definitions' schemas. Nothing is applied.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_files import (
    INFRA,
    K8S,
    OVERLAYS,
    _run,
    _tool,
    render_variant,
    rendered,
)

# JSON schemas of the custom resources, converted from the CustomResourceDefinitions of KEDA
# and the Prometheus Operator (infra/schemas/crds/README.md).
CRD_SCHEMAS = {
    "ScaledObject": INFRA / "schemas" / "crds" / "keda.sh_scaledobject_v1alpha1.json",
    "ServiceMonitor": INFRA / "schemas" / "crds" / "monitoring.coreos.com_servicemonitor_v1.json",
    "PrometheusRule": INFRA / "schemas" / "crds" / "monitoring.coreos.com_prometheusrule_v1.json",
}
NAMESPACE = "outbox-sidecar"
# The servers each kind of pod connects to, by port (NetworkPolicy egress).
DNS, POSTGRES, KAFKA, S3, SEARCH, REDIS = {53}, {5432}, {9092, 9093}, {443, 9000}, {9200}, {6379}
EGRESS = {
    "api": DNS | POSTGRES | S3 | SEARCH | REDIS,
    "reconciler": DNS | POSTGRES | S3,
    "relay": DNS | POSTGRES | KAFKA,
    "project-ocr": DNS | POSTGRES | KAFKA | S3,
    "project-embed": DNS | POSTGRES | KAFKA,
    "project-search": DNS | POSTGRES | KAFKA | SEARCH | REDIS,
    "project-cache": DNS | POSTGRES | KAFKA | REDIS,
    "migrate": DNS | POSTGRES,
    "grants": DNS | POSTGRES,
    "topics": DNS | POSTGRES | KAFKA,
}


def _of(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]], kind: str
        ) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pods(docs: tuple[dict[str, Any], ...] | list[dict[str, Any]]
          ) -> list[tuple[str, dict[str, Any]]]:
    """(component, pod template) of every Deployment and Job."""
    return [(d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
             d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions In/Exists) matches."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_renders_everything_into_its_namespace(overlay):
    docs = rendered(overlay)
    assert len(_of(docs, "Deployment")) == 7 and len(_of(docs, "Job")) == 3
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


# --- secrets by reference, configuration that rolls the pods ------------------------------

def _referenced_secrets(docs: tuple[dict[str, Any], ...]) -> set[str]:
    names = set()
    for _, pod in _pods(docs):
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            names |= {ref["secretRef"]["name"] for ref in container.get("envFrom", [])
                      if "secretRef" in ref}
    return names


def test_the_base_and_production_create_no_secret(tmp_path):
    # An apply must never overwrite a Secret made by hand or by a secret manager.
    assert not _of(render_variant(tmp_path, []), "Secret")
    production = rendered("production")
    assert not _of(production, "Secret")
    assert _referenced_secrets(production) == {
        "outbox-db-owner", "outbox-db-app", "outbox-db-relay", "outbox-db-admin",
        "outbox-secrets", "outbox-api-keys"}


def test_dev_generates_every_secret_it_references_with_a_content_hash():
    docs = rendered("dev")
    secrets = {d["metadata"]["name"] for d in _of(docs, "Secret")}
    referenced = _referenced_secrets(docs)
    assert referenced == secrets
    for name in secrets:
        stem, _, suffix = name.rpartition("-")
        assert stem.startswith("outbox-") and len(suffix) == 10, name


def test_a_configuration_change_renames_the_configmap_every_pod_reads(tmp_path):
    names = set()
    for i, settings in enumerate(({}, {"OUTBOX_TOPIC_PARTITIONS": "6"})):
        where = tmp_path / str(i)
        where.mkdir()
        docs = render_variant(where, [], settings)
        [config] = _of(docs, "ConfigMap")
        name = config["metadata"]["name"]
        assert name.startswith("outbox-config-"), "no content hash in the name"
        for component, pod in _pods(docs):
            refs = {ref["configMapRef"]["name"] for c in pod["spec"]["containers"]
                    for ref in c.get("envFrom", []) if "configMapRef" in ref}
            assert refs == {name}, component
        names.add(name)
    assert len(names) == 2, "a changed setting must give the ConfigMap a new name"


# --- availability ---------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_only_guard_deployments_of_more_than_one_pod(overlay):
    docs = rendered(overlay)
    deployments = _of(docs, "Deployment")
    for budget in _of(docs, "PodDisruptionBudget"):
        [guarded] = [d for d in deployments if _selects(
            budget["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        assert guarded["spec"].get("replicas", 1) > 1, \
            f"{budget['metadata']['name']} guards a single pod: it protects nothing"
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    if overlay == "production":
        guarded = {d["metadata"]["name"] for d in deployments
                   for b in _of(docs, "PodDisruptionBudget")
                   if _selects(b["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])}
        assert guarded == {d["metadata"]["name"] for d in deployments
                           if d["spec"].get("replicas", 1) > 1} == {"outbox-api", "outbox-relay"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_waits_to_leave_its_endpoints_before_stopping(overlay):
    [api] = [d for d in _of(rendered(overlay), "Deployment")
             if d["metadata"]["name"] == "outbox-api"]
    pod = api["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert 5 <= int(command[1]) < pod["terminationGracePeriodSeconds"] - 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_a_startup_probe(overlay):
    for deployment in _of(rendered(overlay), "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            probe = container["startupProbe"]
            assert probe["httpGet"]["path"] == "/healthz", deployment["metadata"]["name"]
            # Liveness is held back while the probe allows a slow start.
            assert probe["periodSeconds"] * probe["failureThreshold"] >= 60


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_gets_a_service_account_token(overlay):
    docs = rendered(overlay)
    [account] = _of(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for component, pod in _pods(docs):
        assert pod["spec"]["automountServiceAccountToken"] is False, component
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], component


# --- network policies -----------------------------------------------------------------------

def _allowed_ports(policies: list[dict[str, Any]], labels: dict[str, str], direction: str,
                   ) -> set[int | str]:
    """The ports the policies open to a pod with `labels` in `direction` (egress, ingress)."""
    ports: set[int | str] = set()
    for policy in policies:
        if _selects(policy["spec"]["podSelector"], labels):
            for rule in policy["spec"].get(direction, []):
                ports |= {p["port"] for p in rule["ports"]}
    return ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_what_each_role_needs(overlay):
    docs = rendered(overlay)
    policies = _of(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny policy"
    pods = _pods(docs)
    assert {component for component, _ in pods} == set(EGRESS)
    for component, pod in pods:
        labels = pod["metadata"]["labels"]
        assert _allowed_ports(policies, labels, "egress") == EGRESS[component], component
        ingress = _allowed_ports(policies, labels, "ingress")
        named = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        # Each served port is open (the API's, every /metrics port); nothing else.
        assert ingress & named == named - {None}, component
        if component == "api":
            assert "http" in ingress


# --- autoscaling and monitoring -------------------------------------------------------------

def test_autoscaler_names_follow_the_configured_topic_prefix(tmp_path):
    docs = render_variant(tmp_path, ["keda", "hpa"], {"OUTBOX_TOPIC_PREFIX": "acme",
                                                      "OUTBOX_KAFKA_BOOTSTRAP": "k:9092"})
    names = []
    for scaled in _of(docs, "ScaledObject"):
        metadata = scaled["spec"]["triggers"][0]["metadata"]
        names += [metadata["consumerGroup"], metadata["topic"]]
        assert metadata["bootstrapServers"] == "k:9092"
    for hpa in _of(docs, "HorizontalPodAutoscaler"):
        labels = hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
        names += [labels["consumergroup"], labels["topic"]]
    assert sorted(names) == sorted(["acme.ocr", "acme.embed"] * 2 + ["acme.image"] * 4)


def test_custom_resources_are_valid_against_their_definitions(tmp_path):
    docs = [d for d in rendered("production") if d["kind"] in CRD_SCHEMAS]
    assert sorted(d["kind"] for d in docs) == sorted(
        ["ScaledObject", "ScaledObject", "ServiceMonitor", "PrometheusRule"])
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}-{doc['kind']}.json"
        path.write_text(json.dumps(doc))
        done = _run(_tool("check-jsonschema"), "--schemafile", str(CRD_SCHEMAS[doc["kind"]]),
                    str(path))
        assert done.returncode == 0, f"{doc['kind']}: {done.stdout}{done.stderr}"


def test_the_prometheus_rule_is_the_rule_file_regenerated():
    script = K8S / "generate_prometheus_rule.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [rule] = _of(rendered("production"), "PrometheusRule")
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_the_service_monitor_scrapes_one_job_per_kind_of_process():
    docs = rendered("production")
    [monitor] = _of(docs, "ServiceMonitor")
    label = monitor["spec"]["jobLabel"]
    services = [s for s in _of(docs, "Service")
                if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    # The jobs of the plain Prometheus configuration, whose names the alert rules use.
    scrape = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    assert {s["metadata"]["labels"][label] for s in services} == {
        job["job_name"] for job in scrape["scrape_configs"]}
    endpoints = {e["port"] for e in monitor["spec"]["endpoints"]}
    pods = [pod for _, pod in _pods(docs)]
    for service in services:
        [port] = service["spec"]["ports"]
        assert port["name"] in endpoints, service["metadata"]["name"]
        served = [pod for pod in pods if _selects(service["spec"], pod["metadata"]["labels"])
                  and port["targetPort"] in {p["name"] for c in pod["spec"]["containers"]
                                             for p in c.get("ports", [])}]
        assert served, f"{service['metadata']['name']} reaches no /metrics"


def test_the_crd_schemas_are_vendored_with_their_origin():
    readme = (INFRA / "schemas" / "crds" / "README.md").read_text()
    for path in CRD_SCHEMAS.values():
        assert path.name in readme
        assert json.loads(Path(path).read_text())["type"] == "object"
