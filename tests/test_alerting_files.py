"""The alert rules and the Grafana dashboard in infra/: the shape Prometheus and Grafana
load, only metrics and labels the code exports, and a section of the documentation's alert
page for every alert, which its runbook_url opens."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.metric_references import ROOT, ExpressionCheck, exported_series

RULES = ROOT / "infra/prometheus/alerts.yaml"
RULE_TESTS = ROOT / "infra/prometheus/alerts.test.yaml"
SCRAPE_CONFIG = ROOT / "infra/prometheus/prometheus.yml"
DASHBOARD = ROOT / "infra/grafana/outbox-dashboard.json"
ALERTS_PAGE = ROOT / "docs/operating/alerts.md"
# Where the documentation site serves docs/operating/alerts.md.
ALERTS_URL = "https://outbox-sidecar.readthedocs.io/en/latest/operating/alerts/"

RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
SEVERITIES = {"warning", "critical"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_REFERENCE = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "gauge", "table", "state-timeline",
               "heatmap", "text"}
# Grafana's own interval variables; any other `$variable` must be one the dashboard defines.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
DASHBOARD_UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def runbook_url(alert: str) -> str:
    """The alert's section of the alert page: MkDocs makes a heading that is one word its
    lower-cased anchor."""
    return f"{ALERTS_URL}#{alert.lower()}"


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return exported_series()


@pytest.fixture
def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


@pytest.fixture
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alerts_of(doc: dict) -> list[dict]:
    return [rule for group in doc.get("groups") or [] for rule in group.get("rules") or []]


def rule_file_problems(doc: object, series: dict[str, frozenset[str]]) -> list[str]:
    """What keeps `doc` from being a Prometheus rule file of documented alerts on the
    exported metrics."""
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not doc["groups"]:
        return ["the file must hold exactly a non-empty `groups` list"]
    problems, groups, names = [], set(), set()
    for group in doc["groups"]:
        if not isinstance(group.get("name"), str) or group["name"] in groups:
            problems.append(f"group without a unique name: {group.get('name')!r}")
        groups.add(group.get("name"))
        if not isinstance(group.get("rules"), list) or not group["rules"]:
            problems.append(f"group {group.get('name')!r} has no rules")
            continue
        for rule in group["rules"]:
            problems += [f"{rule.get('alert')}: {p}" for p in _rule_problems(rule, series)]
            if rule.get("alert") in names:
                problems.append(f"{rule['alert']}: a second alert of that name")
            names.add(rule.get("alert"))
    return problems


def _rule_problems(rule: dict, series: dict[str, frozenset[str]]) -> list[str]:
    problems = [f"unknown key {k!r}" for k in set(rule) - RULE_KEYS]
    if not isinstance(rule.get("alert"), str) or not ALERT_NAME.match(rule["alert"]):
        problems.append("`alert` must be a metric-style name")
    if "for" in rule and not DURATION.match(str(rule["for"])):
        problems.append(f"`for: {rule['for']}` is not a duration")
    if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
        problems.append(f"labels.severity must be one of {sorted(SEVERITIES)}")
    annotations = rule.get("annotations") or {}
    for key in ("summary", "description"):
        if not isinstance(annotations.get(key), str) or not annotations[key].strip():
            problems.append(f"annotations.{key} is missing")
    if isinstance(rule.get("alert"), str) and \
            annotations.get("runbook_url") != runbook_url(rule["alert"]):
        problems.append(f"annotations.runbook_url must be {runbook_url(rule['alert'])}")
    if not isinstance(rule.get("expr"), str):
        return [*problems, "`expr` is missing"]
    check = ExpressionCheck(rule["expr"], series)
    problems += check.problems
    available = (check.labels or frozenset()) | set(rule.get("labels") or {})
    for text in annotations.values():
        for label in set(LABEL_REFERENCE.findall(str(text))) - available:
            problems.append(f"annotations use $labels.{label}, which the result has not")
    return problems


def dashboard_problems(doc: object, series: dict[str, frozenset[str]]) -> list[str]:
    """What keeps `doc` from being a Grafana dashboard on a Prometheus data source variable
    whose queries use the exported metrics."""
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    problems = []
    if not isinstance(doc.get("uid"), str) or not DASHBOARD_UID.match(doc["uid"]):
        problems.append("uid must be 1-40 letters, digits, - or _")
    if not isinstance(doc.get("title"), str) or not doc["title"]:
        problems.append("title is missing")
    if not isinstance(doc.get("schemaVersion"), int):
        problems.append("schemaVersion is missing")
    variables = (doc.get("templating") or {}).get("list") or []
    sources = [v["name"] for v in variables
               if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not sources:
        return [*problems, "no Prometheus data source variable"]
    datasource = {"type": "prometheus", "uid": f"${{{sources[0]}}}"}
    known_variables = {v.get("name") for v in variables}
    panels = doc.get("panels") or []
    if not any(p.get("type") != "row" for p in panels):
        problems.append("no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append("panel ids must be unique integers")
    for panel in panels:
        problems += [f"panel {panel.get('title')!r}: {p}"
                     for p in _panel_problems(panel, datasource, known_variables, series)]
    return problems


def _panel_problems(panel: dict, datasource: dict, variables: set[str],
                    series: dict[str, frozenset[str]]) -> list[str]:
    problems = []
    if panel.get("type") not in PANEL_TYPES:
        problems.append(f"unknown type {panel.get('type')!r}")
    grid = panel.get("gridPos") or {}
    if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
        problems.append(f"gridPos {grid} is not within the 24 columns")
    if panel.get("type") == "row":
        return problems
    if panel.get("datasource") != datasource:
        problems.append(f"datasource must be {datasource}")
    targets = panel.get("targets") or []
    if not targets:
        problems.append("no targets")
    refs = [t.get("refId") for t in targets]
    if len(set(refs)) != len(refs):
        problems.append("refIds must be unique")
    for target in targets:
        if target.get("datasource", datasource) != datasource:
            problems.append(f"target {target.get('refId')}: datasource must be {datasource}")
        expr = GRAFANA_INTERVALS.sub("5m", str(target.get("expr", "")))
        for name in set(re.findall(r"\$\{?(\w+)", expr)) - variables:
            problems.append(f"target {target.get('refId')}: unknown variable ${name}")
        problems += [f"target {target.get('refId')}: {p}"
                     for p in ExpressionCheck(expr, series).problems]
    return problems


def alert_page_problems(page: str, alert_names: list[str]) -> list[str]:
    """The alert page must have a `##` section named exactly as each alert (the anchor its
    runbook_url opens), with text in it, and none for an alert that does not exist."""
    sections = dict(re.findall(r"^## (.+?)\s*\n(.*?)(?=^## |\Z)", page,
                               re.MULTILINE | re.DOTALL))
    headings = {name for name in sections if ALERT_NAME.match(name) and
                name.startswith("Outbox")}
    problems = [f"no `## {name}` section" for name in alert_names if name not in sections]
    problems += [f"the `## {name}` section is empty" for name in alert_names
                 if name in sections and not sections[name].strip()]
    problems += [f"`## {name}` is no alert" for name in sorted(headings - set(alert_names))]
    return problems


def test_the_rule_file_is_valid_and_uses_exported_metrics(rules, series):
    assert rule_file_problems(rules, series) == []
    assert len(alerts_of(rules)) >= 10


def test_the_dashboard_is_valid_and_uses_exported_metrics(dashboard, series):
    assert dashboard_problems(dashboard, series) == []


def test_the_alert_page_explains_every_alert_where_its_runbook_url_points(rules):
    names = [rule["alert"] for rule in alerts_of(rules)]
    assert alert_page_problems(ALERTS_PAGE.read_text(), names) == []
    for rule in alerts_of(rules):
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(ALERTS_URL), url
        assert url.removeprefix(ALERTS_URL) == f"#{rule['alert'].lower()}"


def test_counters_and_histograms_are_known_by_their_series_names(series):
    assert "outbox_relay_events_published_total" in series
    assert "outbox_relay_events_published" not in series
    assert series["outbox_relay_publish_latency_seconds_bucket"] >= {"le", "job"}
    assert "le" not in series["outbox_relay_publish_latency_seconds_count"]
    assert series["outbox_projector_lag_seconds"] == {"projector", "job", "instance"}
    # Prometheus' naming rule: a histogram of durations ends in _duration_seconds.
    assert series["outbox_http_request_duration_seconds_bucket"] >= {"route", "le"}
    assert "outbox_http_request_seconds_bucket" not in series
    assert series["outbox_images"] == {"state", "job", "instance"}


def _set(doc: dict, path: tuple, value: object) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


FIRST = ("groups", 0, "rules", 0)


@pytest.mark.parametrize(("path", "value", "expected"), [
    ((*FIRST, "expr"), "outbox_relay_slot_retained_wall_bytes > 1", "unknown metric"),
    ((*FIRST, "expr"), 'outbox_projector_lag_seconds{stage="ocr"} > 1', "has no label 'stage'"),
    ((*FIRST, "expr"), "max by (projector) (outbox_relay_leader) > 1", "over series without"),
    ((*FIRST, "expr"), "outbox_relay_leader > on (mode) outbox_relay_batches_total",
     "a side lacks"),
    ((*FIRST, "expr"), "sum(outbox_relay_leader", "does not parse"),
    ((*FIRST, "expr"), "histogram_quantile(0.9, outbox_relay_publish_latency_seconds_sum)",
     "without 'le'"),
    ((*FIRST, "expr"), "outbox_relay_events_published > 1", "unknown metric"),
    ((*FIRST, "annotations", "summary"), "{{ $labels.projector }}", "$labels.projector"),
    ((*FIRST, "labels"), {}, "labels.severity"),
    ((*FIRST, "for"), "5 minutes", "is not a duration"),
    ((*FIRST, "annotations", "runbook_url"), "README.md#alerts", "runbook_url"),
    ((*FIRST, "annotations", "runbook_url"), f"{ALERTS_URL}#outboxrelaynoleader",
     "runbook_url must be"),
    ((*FIRST, "annotations", "description"), "", "annotations.description"),
    ((*FIRST, "alert"), "OutboxRelayWalRetainedCritical", "a second alert"),
    ((*FIRST, "severity"), "warning", "unknown key"),
    (("groups",), [], "non-empty `groups`"),
])
def test_the_rule_checks_catch_mistakes(rules, series, path, value, expected):
    problems = rule_file_problems(_set(rules, path, value), series)
    assert any(expected in p for p in problems), problems


def _first_panel(doc: dict) -> int:
    return next(i for i, p in enumerate(doc["panels"]) if p["type"] != "row")


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: _set(d, ("templating", "list"), []), "no Prometheus data source variable"),
    (lambda d: _set(d, ("uid",), "outbox pipeline"), "uid"),
    (lambda d: _set(d, ("panels", _first_panel(d), "targets"), []), "no targets"),
    (lambda d: _set(d, ("panels", _first_panel(d), "datasource"), {"uid": "prom"}),
     "datasource must be"),
    (lambda d: _set(d, ("panels", _first_panel(d), "targets", 0, "expr"),
                    "rate(outbox_projector_applied_total[$__rate_interval])"), "unknown metric"),
    (lambda d: _set(d, ("panels", _first_panel(d), "targets", 0, "expr"),
                    "sum by (stage) (outbox_projector_lag_seconds)"), "over series without"),
    (lambda d: _set(d, ("panels", _first_panel(d), "targets", 0, "expr"),
                    'outbox_images{org="$org"}'), "unknown variable $org"),
    (lambda d: _set(d, ("panels", _first_panel(d), "gridPos", "x"), 20), "24 columns"),
    (lambda d: _set(d, ("panels", 1, "id"), d["panels"][0]["id"]), "unique integers"),
])
def test_the_dashboard_checks_catch_mistakes(dashboard, series, change, expected):
    problems = dashboard_problems(change(dashboard), series)
    assert any(expected in p for p in problems), problems


def test_the_alert_page_check_catches_a_missing_empty_or_unknown_section():
    page = ("# Alerts\n\n## Before you start\n\nText.\n\n## OutboxRelayNoLeader\n\n"
            "What to do.\n\n## OutboxGone\n\nOld.\n\n## OutboxEmpty\n\n")
    assert alert_page_problems(page, ["OutboxRelayNoLeader", "OutboxGone", "OutboxEmpty"]) \
        == ["the `## OutboxEmpty` section is empty"]
    assert alert_page_problems(page, ["OutboxRelayNoLeader", "OutboxEmpty", "OutboxNew"]) == [
        "no `## OutboxNew` section", "the `## OutboxEmpty` section is empty",
        "`## OutboxGone` is no alert"]


def test_every_alert_has_a_firing_and_a_silent_unit_test(rules):
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {rule["alert"] for rule in alerts_of(rules)}
    assert names - fires == set()
    assert names - silent == set()
    assert (fires | silent) - names == set()


# `make test` unpacks promtool from Debian's `prometheus` package (it is not on PyPI).
PROMTOOL = shutil.which("promtool") or str(ROOT / ".outbox/tools/usr/bin/promtool")


def test_promtool_accepts_the_files_and_the_rules_pass_their_unit_tests():
    assert shutil.which(PROMTOOL), f"{PROMTOOL} is missing: `make test` installs it"
    for args in (["check", "config", str(SCRAPE_CONFIG)], ["check", "rules", str(RULES)],
                 ["test", "rules", str(RULE_TESTS)]):
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
