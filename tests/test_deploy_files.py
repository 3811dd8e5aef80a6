"""The deploy files (infra/Dockerfile, infra/compose.yaml, infra/k8s/), checked offline.

Each file against its schema or linter (kubernetes-validate, check-jsonschema with the
Compose Specification's schema vendored in infra/schemas/, hadolint), and against the code:
every `outbox ...` command they run parses with the real command line, every `OUTBOX_*`
variable they set is a field of a settings class, every probe looks where its process
listens, and the HPAs stop at the topic's partition count. No image is built and nothing is
started here.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import os
import shlex
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
from outbox_images.store import AGGREGATE
from projectors.builtin_specs import BUILTIN
from tests.project_modules import PACKAGES, import_project_modules

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "compose.yaml"
# The Compose Specification's JSON schema, as check-jsonschema 0.39.0 vendors it
# (check_jsonschema/builtin_schemas/vendor/compose-spec.json).
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec.json"
K8S = INFRA / "k8s"
# The oldest Kubernetes with the PDBs' unhealthyPodEvictionPolicy generally available, and
# the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.31.0", "1.37.0")
IMAGE = "outbox-sidecar"
# Every process the deployments must run, as (command, projector name or None).
PROCESSES = {("api", None), ("relay", None), ("reconcile", None),
             *(("project", spec.name) for spec in BUILTIN)}
JOBS = {("migrate", None), ("topics", None)}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is missing: install the dev extra (pip install -e '.[dev]')"
    return str(path)


def _run(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in _manifest_files() for doc in yaml.safe_load_all(path.read_text())
            if doc]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


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


def _configmap() -> dict[str, str]:
    maps = [d for d in _k8s_docs() if d["kind"] == "ConfigMap"]
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
        if service.get("image", "").split(":")[0] == IMAGE or "build" in service:
            assert "entrypoint" not in service, f"compose {name}: the image's entrypoint is outbox"
            yield Process(f"compose service {name}", service["command"], service)


def _k8s_workloads() -> Iterator[dict[str, Any]]:
    return (d for d in _k8s_docs() if d["kind"] in ("Deployment", "Job"))


def _k8s_processes() -> Iterator[Process]:
    for doc in _k8s_workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] == IMAGE:
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


def _listens(args: argparse.Namespace) -> tuple[str, int]:
    """Host and port of a long-running process's /healthz (the API: its own port)."""
    if args.command == "api":
        return args.host, args.port
    port = args.metrics_port
    if port is None:
        port = {spec.name: spec.metrics_port for spec in BUILTIN}[args.name]
    return args.metrics_host, port


# --- schemas and linters ------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version):
    files = _manifest_files()
    assert len(files) >= 5
    done = _run(_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version,
                *map(str, files))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout


def test_the_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]


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
    entrypoint = [yaml.safe_load(rest) for keyword, rest in _dockerfile_instructions()
                  if keyword == "ENTRYPOINT"]
    assert entrypoint == [["outbox"]]
    processes = [*_compose_processes(), *_k8s_processes(), *_dockerfile_processes()]
    parsed = {p.where: _parse(p) for p in processes}
    compose = {_kind(parsed[p.where]) for p in _compose_processes()}
    k8s = {_kind(parsed[p.where]) for p in _k8s_processes()}
    wanted = PROCESSES | JOBS
    assert not wanted - compose, f"compose does not run {wanted - compose}"
    assert not wanted - k8s, f"k8s does not run {wanted - k8s}"
    for where, args in parsed.items():  # the topic job creates the topic the pipeline uses
        if _kind(args) == ("topics", None):
            assert args.create == [AGGREGATE], f"{where}: topics --create {AGGREGATE} expected"


def _served(processes: Iterator[Process]) -> Iterator[tuple[Process, int]]:
    """The long-running processes, with the port they serve on (checked to be reachable
    from outside their container)."""
    for process in processes:
        args = _parse(process)
        if _kind(args) in PROCESSES:
            host, port = _listens(args)
            assert host == "0.0.0.0", f"{process.where}: unreachable from outside its container"
            yield process, port


def test_every_probe_looks_where_its_process_listens():
    for process, port in _served(_compose_processes()):
        url = urlsplit(process.spec["healthcheck"]["test"][-1])
        assert (url.port, url.path) == (port, "/readyz"), process.where

    for process, port in _served(_k8s_processes()):
        ports = {p["name"]: p["containerPort"] for p in process.spec["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
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
    for doc in _k8s_docs():
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            found.update((k, where) for k in doc["data"])
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

def test_every_deployment_has_probes_resources_and_a_disruption_budget():
    docs = _k8s_docs()
    budgets = [d["spec"]["selector"]["matchLabels"] for d in docs
               if d["kind"] == "PodDisruptionBudget"]
    for doc in _k8s_workloads():
        pod = doc["spec"]["template"]
        for container in pod["spec"]["containers"]:
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, \
                    f"{doc['metadata']['name']}: {bound}"
        if doc["kind"] == "Deployment":
            labels = pod["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), \
                f"{doc['metadata']['name']}: the selector does not select its own pods"
            assert [b for b in budgets if b.items() <= labels.items()], \
                f"{doc['metadata']['name']} has no PodDisruptionBudget"
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in docs
            if d["kind"] == "Deployment"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert [p for p in pods if selector.items() <= p.items()], \
            f"Service {service['metadata']['name']} selects no pods"
    relays = [d for d in docs if d["kind"] == "Deployment"
              and _kind(_parse(next(_k8s_processes_of(d)))) == ("relay", None)]
    assert [d["spec"]["replicas"] for d in relays] == [2], "one leader and one standby"
    compose_relays = [p for p in _compose_processes() if _parse(p).command == "relay"]
    assert len(compose_relays) == 2, "compose: one leader and one standby"


def test_the_workers_autoscale_on_their_lag_up_to_the_partition_count():
    docs = _k8s_docs()
    config = _configmap()
    partitions = int(config.get("OUTBOX_TOPIC_PARTITIONS", _default("topic_partitions")))
    prefix = config.get("OUTBOX_TOPIC_PREFIX", _default("topic_prefix"))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = set()
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        command, projector = _kind(_parse(next(_k8s_processes_of(target))))
        assert command == "project"
        scaled.add(projector)
        assert hpa["spec"]["maxReplicas"] == partitions, hpa["metadata"]["name"]
        [metric] = hpa["spec"]["metrics"]
        assert metric["type"] == "External"
        labels = metric["external"]["metric"]["selector"]["matchLabels"]
        assert labels == {"consumergroup": f"{prefix}.{projector}",
                          "topic": topic_name(prefix, AGGREGATE)}
    assert scaled == {"ocr", "embed"}
