"""The deploy files (infra/Dockerfile, infra/compose.yaml, infra/k8s/), checked offline.

Each file against its schema or linter (kubernetes-validate on the rendered overlays,
check-jsonschema with the Compose Specification's schema vendored in infra/schemas/,
hadolint), and against the code: every `outbox ...` command they run parses with the real
command line, runs in the image target that installs what it imports, every `OUTBOX_*`
variable they set is a field of a settings class, every probe looks where its process
listens, and the autoscalers stop at the topic's partition count. No image is built and
nothing is started here; tests/test_kustomize.py checks the Kubernetes overlays further.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from outbox.cli import build_parser
from outbox.kafka import topic_name
from outbox.settings import Settings
from outbox_app.projector_specs import BUILTIN
from outbox_images.store import AGGREGATE
from tests.project_modules import PACKAGES, import_project_modules

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "compose.yaml"
# The Compose Specification's JSON schema, as check-jsonschema 0.39.0 vendors it
# (check_jsonschema/builtin_schemas/vendor/compose-spec.json).
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec.json"
K8S = INFRA / "k8s"
OVERLAYS = ("dev", "production")
# The oldest Kubernetes with the PDBs' unhealthyPodEvictionPolicy generally available, and
# the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
IMAGE = "outbox-sidecar"
# The Dockerfile target each command runs in: the one that installs the extras it imports.
TARGETS = {("api", None): "api", ("reconcile", None): "api", ("relay", None): "relay",
           ("migrate", None): "relay", ("grants", None): "relay", ("topics", None): "relay",
           ("project", "ocr"): "worker", ("project", "embed"): "worker",
           ("project", "search"): "views", ("project", "cache"): "views"}
# Every process the deployments must run, as (command, projector name or None).
PROCESSES = {("api", None), ("relay", None), ("reconcile", None),
             *(("project", spec.name) for spec in BUILTIN)}
JOBS = {("migrate", None), ("topics", None)}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: install the dev extra (pip install -e '.[dev]')"
    return str(path)


def kustomize(directory: Path) -> str:
    """`kubectl kustomize directory`: the manifests an apply -k would send, rendered offline."""
    kubectl = Path(sys.executable).parent / "kubectl"
    done = _run(str(kubectl) if kubectl.exists() else shutil.which("kubectl") or "kubectl",
                "kustomize", str(directory))
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    return done.stdout


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The documents of an overlay of infra/k8s/overlays, rendered."""
    return tuple(d for d in yaml.safe_load_all(kustomize(K8S / "overlays" / overlay)) if d)


def render_variant(where: Path, components: list[str],
                   settings: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The base with `components` (names under infra/k8s/components) and `settings` merged
    into its ConfigMap, rendered from an overlay written in `where`."""
    up = os.path.relpath(K8S, where)  # kustomize takes no absolute path to a base
    kustomization: dict[str, Any] = {
        "resources": [f"{up}/base"],
        "components": [f"{up}/components/{name}" for name in components]}
    if settings:
        kustomization["configMapGenerator"] = [{
            "name": "outbox-config", "behavior": "merge",
            "literals": [f"{k}={v}" for k, v in settings.items()]}]
    (where / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return [d for d in yaml.safe_load_all(kustomize(where)) if d]


def _run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def _k8s_docs(overlay: str = "production") -> list[dict[str, Any]]:
    return list(rendered(overlay))


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each named stage of the Dockerfile (its FROM line first)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            current = stages.setdefault(rest.split()[-1], [])
        current.append((keyword, rest))
    return stages


def _image_target(image: str) -> str:
    """The Dockerfile target an image name stands for: outbox-sidecar-<target>[:tag]."""
    match = re.fullmatch(rf"{IMAGE}-([a-z]+)(:[\w.-]+)?", image)
    assert match, f"{image}: not an image of infra/Dockerfile (outbox-sidecar-<target>)"
    return match[1]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _configmap(overlay: str = "production") -> dict[str, str]:
    maps = [d for d in _k8s_docs(overlay) if d["kind"] == "ConfigMap"]
    assert len(maps) == 1, "one ConfigMap holds the settings"
    return maps[0]["data"]


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


@dataclass
class Process:
    """An `outbox` command line one of the deploy files runs."""

    where: str
    argv: list[str]
    spec: dict[str, Any]  # the compose service, or the k8s container


def _compose_processes() -> Iterator[Process]:
    for name, service in _compose()["services"].items():
        if service.get("image", "").startswith(f"{IMAGE}-") or "build" in service:
            assert "entrypoint" not in service, f"compose {name}: the image's entrypoint is outbox"
            yield Process(f"compose service {name}", service["command"], service)


def _k8s_workloads(overlay: str = "production") -> Iterator[dict[str, Any]]:
    return (d for d in _k8s_docs(overlay) if d["kind"] in ("Deployment", "Job"))


def _k8s_processes(overlay: str = "production") -> Iterator[Process]:
    for doc in _k8s_workloads(overlay):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith(f"{IMAGE}-"):
                where = f"{doc['kind']} {doc['metadata']['name']}"
                assert "command" not in container, f"{where}: the image's entrypoint is outbox"
                yield Process(where, container["args"], container)


def _k8s_processes_of(doc: dict[str, Any]) -> Iterator[Process]:
    for container in doc["spec"]["template"]["spec"]["containers"]:
        yield Process(doc["metadata"]["name"], container["args"], container)


def _dockerfile_processes() -> Iterator[Process]:
    for keyword, rest in _dockerfile_instructions():
        if keyword == "CMD":
            yield Process("Dockerfile CMD", yaml.safe_load(rest), {})
        elif keyword == "RUN":
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = ["&&", *lexer]
            for i, token in enumerate(tokens[1:], start=1):
                if token == "outbox" and _is_operator(tokens[i - 1]):  # a command, not an arg
                    argv = []
                    for arg in tokens[i + 1:]:
                        if _is_operator(arg):
                            break
                        argv.append(arg)
                    yield Process("Dockerfile RUN", argv, {})


def _is_operator(token: str) -> bool:
    return set(token) <= set("&|;<>()")


def _parse(process: Process) -> argparse.Namespace:
    """The real parser's reading of `process.argv`; fails the test when it refuses it."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return build_parser().parse_args(process.argv)
    except SystemExit as exc:
        assert exc.code == 0, f"{process.where}: `outbox {' '.join(process.argv)}`: " \
                              f"{err.getvalue().strip()}"
        return argparse.Namespace(command=None)  # --help


def _kind(args: argparse.Namespace) -> tuple[str | None, str | None]:
    return args.command, getattr(args, "name", None)


def _image_env() -> dict[str, str]:
    """The environment every role image sets (the base stage's ENV)."""
    env: dict[str, str] = {}
    for keyword, rest in _dockerfile_stages()["base"]:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def _listens(process: Process) -> tuple[str, int]:
    """Host and port of a long-running process's /healthz (the API: its own port). The
    metrics host is the image's OUTBOX_METRICS_HOST unless the command line names one."""
    args = _parse(process)
    if args.command == "api":
        return args.host, args.port
    port = args.metrics_port
    if port is None:
        port = {spec.name: spec.metrics_port for spec in BUILTIN}[args.name]
    if "--metrics-host" in process.argv:
        return args.metrics_host, port
    return _image_env()["OUTBOX_METRICS_HOST"], port


# --- schemas and linters ------------------------------------------------------------------

# Kinds whose schemas kubernetes-validate does not have; tests/test_kustomize.py checks
# them against their CustomResourceDefinitions' schemas.
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_manifest_is_valid_kubernetes(overlay, version, tmp_path):
    docs = [d for d in rendered(overlay) if d["kind"] not in CUSTOM_KINDS]
    assert len(docs) >= 20
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    done = _run(_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version,
                str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(docs), done.stdout + done.stderr


def test_every_kustomization_lists_every_manifest_beside_it():
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        here = sorted(p.name for p in kustomization.parent.glob("*.yaml")
                      if p.name != "kustomization.yaml")
        assert sorted(r for r in listed if r.endswith(".yaml")) == here, kustomization


def test_the_compose_file_follows_the_compose_specification():
    schema = yaml.safe_load(COMPOSE_SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    done = _run(_tool("check-jsonschema"), "--schemafile", str(COMPOSE_SCHEMA), str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr
    # What the schema cannot see: a dependency on a service that is not there.
    services = _compose()["services"]
    for name, service in services.items():
        unknown = set(service.get("depends_on", {})) - set(services)
        assert not unknown, f"compose service {name} depends on undefined {unknown}"


def test_every_role_image_is_small_non_root_and_reachable():
    stages = _dockerfile_stages()
    assert {"relay", "views", "api", "worker"} <= set(stages)
    assert {_image_target(f"{IMAGE}-{t}") for t in TARGETS.values()} <= set(stages)
    env = _image_env()
    assert env["OUTBOX_METRICS_HOST"] == "0.0.0.0", "metrics unreachable from outside"
    extras = {"relay": ".", "views": "'.[views]'", "api": "'.[api]'",
              "worker": "'.[ocr,embedding]'"}
    for target, extra in extras.items():
        instructions = stages[target]
        assert instructions[0][1].split()[0] == "base", f"{target}: not built on base"
        assert ("USER", "10001:10001") in instructions, f"{target}: runs as root"
        assert ("ENTRYPOINT", '["outbox"]') in instructions, target
        [source] = [rest.split()[0].removeprefix("--from=") for keyword, rest in instructions
                    if keyword == "COPY"]
        installs = [" ".join(rest.split()) for keyword, rest in stages[source]
                    if keyword == "RUN"]
        assert installs == [f"pip install --no-cache-dir -c constraints.txt {extra} "
                            "&& pip uninstall --yes pip"], f"{target}: installs {installs}"
        runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
        # Only the worker carries tesseract; no final stage installs a compiler.
        assert ("tesseract-ocr" in runs) == (target == "worker"), target
        assert not re.search(r"\b(gcc|build-essential|python3-dev)\b", runs), target


def test_the_dockerfile_passes_hadolint_with_no_rule_ignored(tmp_path):
    # No configuration file or variable can ignore a rule: an empty home and working
    # directory, no HADOLINT_* variables, inline ignore pragmas disabled.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    done = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style",
                "--disable-ignore-pragma", str(DOCKERFILE), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_build_context_holds_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not checked here"
    sources = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        parts = Path(source).parts
        for pattern in patterns:
            for depth in range(1, len(parts) + 1):
                prefix = "/".join(parts[:depth])
                assert not fnmatch.fnmatch(prefix, pattern.removeprefix("**/")), \
                    f"COPY {source}: .dockerignore excludes it ({pattern})"


# --- the files against the command line and the settings ---------------------------------

def test_the_image_runs_outbox_and_every_command_the_files_use_exists():
    entrypoints = [yaml.safe_load(rest) for keyword, rest in _dockerfile_instructions()
                   if keyword == "ENTRYPOINT"]
    assert entrypoints == [["outbox"]] * 4, "one per role target"
    processes = [*_compose_processes(), *_k8s_processes(), *_k8s_processes("dev"),
                 *_dockerfile_processes()]
    parsed = {p.where: _parse(p) for p in processes}
    compose = {_kind(parsed[p.where]) for p in _compose_processes()}
    k8s = {_kind(parsed[p.where]) for p in _k8s_processes()}
    wanted = PROCESSES | JOBS
    assert not wanted - compose, f"compose does not run {wanted - compose}"
    assert not wanted - k8s, f"k8s does not run {wanted - k8s}"
    for where, args in parsed.items():  # the topic job creates the topic the pipeline uses
        if _kind(args) == ("topics", None):
            assert args.create == [AGGREGATE], f"{where}: topics --create {AGGREGATE} expected"


def test_every_process_runs_in_its_roles_image():
    for process in _compose_processes():
        target = TARGETS[_kind(_parse(process))]
        assert process.spec["build"]["target"] == target, process.where
        assert _image_target(process.spec["image"]) == target, process.where
    for overlay in OVERLAYS:
        for process in _k8s_processes(overlay):
            assert _image_target(process.spec["image"]) == TARGETS[_kind(_parse(process))], \
                f"{overlay}: {process.where}"


def _served(processes: Iterator[Process]) -> Iterator[tuple[Process, int]]:
    """The long-running processes, with the port they serve on (checked to be reachable
    from outside their container)."""
    for process in processes:
        args = _parse(process)
        if _kind(args) in PROCESSES:
            host, port = _listens(process)
            assert host == "0.0.0.0", f"{process.where}: unreachable from outside its container"
            yield process, port


def test_every_probe_looks_where_its_process_listens():
    for process, port in _served(_compose_processes()):
        url = urlsplit(process.spec["healthcheck"]["test"][-1])
        assert (url.port, url.path) == (port, "/readyz"), process.where

    for process, port in _served(p for o in OVERLAYS for p in _k8s_processes(o)):
        ports = {p["name"]: p["containerPort"] for p in process.spec["ports"]}
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                            ("readinessProbe", "/readyz")):
            get = process.spec[probe]["httpGet"]
            assert (get["path"], ports.get(get["port"], get["port"])) == (path, port), \
                f"{process.where} {probe}"


def _settings_classes() -> set[type[BaseSettings]]:
    """Every settings class of the packages (all their modules imported)."""
    import_project_modules()
    found, todo = set(), [BaseSettings]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.split(".")[0] in PACKAGES:
                found.add(sub)
            todo.append(sub)
    return found


def _setting_names() -> set[str]:
    names = set()
    for cls in _settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias or field.alias
            names.add((alias if isinstance(alias, str) else prefix + field_name).upper())
    return names


def _variables_set() -> dict[str, str]:
    """Every environment variable the deploy files set, with where."""
    found: dict[str, str] = {}
    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        keys = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        found.update((k, f"compose service {name}") for k in keys)
    for doc in (d for overlay in OVERLAYS for d in _k8s_docs(overlay)):
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            found.update((k, where) for k in doc["data"])
            assert "OUTBOX_DATABASE_URL" not in doc["data"], f"{where}: a secret in a ConfigMap"
        elif doc["kind"] == "Secret":
            found.update((k, where) for k in doc.get("stringData", {}) | doc.get("data", {}))
        elif doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found.update((e["name"], where) for e in container.get("env", []))
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ENV":
            found.update((pair.split("=", 1)[0], "Dockerfile") for pair in shlex.split(rest))
    return found


def test_every_outbox_variable_the_files_set_is_a_setting():
    names = _setting_names()
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_API_KEYS", "OUTBOX_OCR_CONCURRENCY"} <= names
    ours = {k: where for k, where in _variables_set().items() if k.startswith("OUTBOX_")}
    assert "OUTBOX_DATABASE_URL" in ours
    unknown = {k: where for k, where in ours.items() if k not in names}
    assert not unknown, f"not a setting of any settings class: {unknown}"


# --- what the deployments promise ----------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_resources_and_every_service_selects_pods(overlay):
    docs = _k8s_docs(overlay)
    for doc in _k8s_workloads(overlay):
        pod = doc["spec"]["template"]
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, \
                    f"{doc['metadata']['name']}: {bound}"
        if doc["kind"] == "Deployment":
            labels = pod["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), \
                f"{doc['metadata']['name']}: the selector does not select its own pods"
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert [p for p in pods if selector.items() <= p.items()], \
            f"Service {service['metadata']['name']} selects no pods"


def test_production_runs_a_leader_and_a_standby_relay():
    relays = [d for d in _k8s_docs() if d["kind"] == "Deployment"
              and _kind(_parse(next(_k8s_processes_of(d)))) == ("relay", None)]
    assert [d["spec"]["replicas"] for d in relays] == [2], "one leader and one standby"
    compose_relays = [p for p in _compose_processes() if _parse(p).command == "relay"]
    assert len(compose_relays) == 2, "compose: one leader and one standby"


def _scaled_workers(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The autoscalers of kind `kind` by the projector of the Deployment each one scales,
    checked to own the replica count of a `project` Deployment."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = {}
    for scaler in (d for d in docs if d["kind"] == kind):
        target = deployments[scaler["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the autoscaler owns the replica count"
        command, projector = _kind(_parse(next(_k8s_processes_of(target))))
        assert command == "project"
        scaled[projector] = scaler
    assert set(scaled) == {"ocr", "embed"}, f"{kind}: scales {set(scaled)}"
    return scaled


def test_production_scales_the_workers_with_kedas_kafka_scaler_up_to_the_partitions():
    docs = _k8s_docs()
    config = _configmap()
    partitions = int(config.get("OUTBOX_TOPIC_PARTITIONS", _default("topic_partitions")))
    prefix = config.get("OUTBOX_TOPIC_PREFIX", _default("topic_prefix"))
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns them"
    for projector, scaled in _scaled_workers(docs, "ScaledObject").items():
        assert scaled["spec"]["maxReplicaCount"] == partitions, projector
        [trigger] = scaled["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"] | {
            "consumerGroup": f"{prefix}.{projector}", "topic": topic_name(prefix, AGGREGATE),
            "bootstrapServers": config["OUTBOX_KAFKA_BOOTSTRAP"],
        } == trigger["metadata"], projector


def test_the_fallback_hpas_scale_the_workers_on_their_lag_up_to_the_partitions(tmp_path):
    docs = render_variant(tmp_path, ["hpa"])
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    partitions = int(config.get("OUTBOX_TOPIC_PARTITIONS", _default("topic_partitions")))
    prefix = config.get("OUTBOX_TOPIC_PREFIX", _default("topic_prefix"))
    for projector, hpa in _scaled_workers(docs, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["maxReplicas"] == partitions, projector
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        labels = metric["external"]["metric"]["selector"]["matchLabels"]
        assert labels == {"consumergroup": f"{prefix}.{projector}",
                          "topic": topic_name(prefix, AGGREGATE)}


# --- Compose: a first start that works ----------------------------------------------------

def test_postgres_is_healthy_only_once_it_listens_on_tcp():
    # The image's temporary initialisation server listens on the Unix socket only.
    test = _compose()["services"]["postgres"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    host = test[test.index("--host") + 1]
    assert host == "127.0.0.1", f"pg_isready must check over TCP, not {host}"


def test_every_one_shot_job_is_retried_until_it_succeeds():
    services = _compose()["services"]
    awaited = {name for service in services.values()
               for name, dep in service.get("depends_on", {}).items()
               if dep["condition"] == "service_completed_successfully"}
    assert {"migrate", "grants", "topics", "roles", "bucket"} <= awaited
    for name in awaited:
        assert services[name]["restart"] == "on-failure", name


def test_every_process_waits_for_the_servers_it_uses():
    services = _compose()["services"]
    needs = {"api": {"postgres", "kafka", "minio", "elasticsearch", "redis"},
             "project-search": {"elasticsearch", "redis"}, "project-cache": {"redis"},
             "project-ocr": {"minio"}}

    def reached(name: str) -> set[str]:
        deps = set(services[name].get("depends_on", {}))
        return deps.union(*(reached(d) for d in deps))

    for name, servers in needs.items():
        assert servers <= reached(name), f"{name} starts before {servers - reached(name)}"
        for server in servers & set(services[name]["depends_on"]):
            assert services[name]["depends_on"][server]["condition"] == "service_healthy"


def test_elasticsearch_runs_at_the_version_of_the_client():
    # Elastic promises a client compatibility with servers of its version and newer only.
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
                if "==" in line)
    image = _compose()["services"]["elasticsearch"]["image"]
    server = tuple(int(n) for n in image.rsplit(":", 1)[1].split(".")[:2])
    client = tuple(int(n) for n in pins["elasticsearch"].split(".")[:2])
    assert server >= client, f"Elasticsearch {image} is older than the client {client}"


def test_no_password_is_put_into_a_url():
    # `${VAR}` in a URL would break on `@`, `/` or `%`: libpq reads PGPASSWORD instead.
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if isinstance(value, str) and "://" in value:
                assert urlsplit(value).password is None, f"{name}: {key} holds a password"
        if "OUTBOX_DATABASE_URL" in (service.get("environment") or {}):
            assert "PGPASSWORD" in service["environment"], name


def test_presigned_urls_name_an_endpoint_the_host_reaches():
    services = _compose()["services"]
    env = services["api"]["environment"]
    default = re.fullmatch(r"\$\{OUTBOX_S3_PUBLIC_ENDPOINT:-(.+)\}",
                           env["OUTBOX_S3_PUBLIC_ENDPOINT"])
    assert default, "the public endpoint can be overridden from the environment"
    public, internal = urlsplit(default[1]), urlsplit(env["OUTBOX_S3_ENDPOINT"])
    assert internal.hostname in services, "the processes reach the store by service name"
    # "host address:host port:container port" of the store's published ports.
    published = [port.split(":") for port in services[internal.hostname]["ports"]]
    assert [public.hostname, str(public.port), str(internal.port)] in published, published
