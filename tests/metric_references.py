"""Checking PromQL written for dashboards and alert rules against the metrics the code
exports: every metric name exists, and every label an expression names (in a matcher, in
`by`/`without`, in `on`/`ignoring`/`group_left`) is one the series at that point carry."""

from __future__ import annotations

from pathlib import Path

import promql_parser as pq
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from tests.project_modules import import_project_modules

ROOT = Path(__file__).resolve().parent.parent
# Prometheus adds these to every scraped series, and writes `up` for every target itself.
TARGET_LABELS = frozenset({"job", "instance"})
SCRAPE_SERIES = {"up": frozenset()}
# The series the client library writes for each kind of metric, with their extra labels.
SUFFIXES: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "counter": (("_total", frozenset()), ("_created", frozenset())),
    "gauge": (("", frozenset()),),
    "histogram": (("_bucket", frozenset({"le"})), ("_sum", frozenset()),
                  ("_count", frozenset()), ("_created", frozenset())),
    "summary": (("_sum", frozenset()), ("_count", frozenset()), ("_created", frozenset())),
    "info": (("_info", frozenset()),),
}
SET_OPERATORS = {"and", "or", "unless"}

Labels = frozenset[str] | None  # None: a scalar or a string


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the processes can export, with its label names (target labels
    included), read from the registry once every module that defines metrics is imported."""
    import_project_modules()
    series = dict(SCRAPE_SERIES)
    # The registry lists its collectors only through this private mapping; a labelled
    # metric without children yields no samples, so its label names come from the metric.
    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            kind, name = collector._type, collector._name
            extra = frozenset({name}) if kind in {"enum", "stateset"} else frozenset()
            for suffix, labels in SUFFIXES.get(kind, (("", frozenset()),)):
                series[name + suffix] = frozenset(collector._labelnames) | labels | extra
        else:
            for family in collector.collect():
                for sample in family.samples:
                    series[sample.name] = series.get(sample.name, frozenset()) | frozenset(
                        sample.labels)
    return {name: labels | TARGET_LABELS for name, labels in series.items()}


class ExpressionCheck:
    """Parse one expression and collect what it gets wrong; `labels` are the label names of
    its result (what an alert's `$labels` can use)."""

    def __init__(self, expr: str, series: dict[str, frozenset[str]]) -> None:
        self.series = series
        self.problems: list[str] = []
        self.metrics: set[str] = set()
        self.labels: Labels = None
        try:
            tree = pq.parse(expr)
        except ValueError as exc:
            self.problems.append(f"does not parse: {exc}")
            return
        self.labels = self._labels(tree)

    def _labels(self, node: pq.Expr) -> Labels:
        if isinstance(node, pq.VectorSelector):
            return self._selector(node)
        if isinstance(node, pq.MatrixSelector):
            return self._selector(node.vector_selector)
        if isinstance(node, pq.ParenExpr | pq.SubqueryExpr | pq.UnaryExpr):
            return self._labels(node.expr)
        if isinstance(node, pq.NumberLiteral | pq.StringLiteral):
            return None
        if isinstance(node, pq.Call):
            return self._call(node)
        if isinstance(node, pq.AggregateExpr):
            return self._aggregate(node)
        if isinstance(node, pq.BinaryExpr):
            return self._binary(node)
        raise TypeError(f"unexpected PromQL node {type(node).__name__}")

    def _selector(self, node: pq.VectorSelector) -> frozenset[str]:
        matchers = [m.name for m in node.matchers.matchers if m.name != "__name__"]
        if node.name is None:
            self.problems.append(f"a selector without a metric name: {node}")
            return frozenset(matchers)
        self.metrics.add(node.name)
        if node.name not in self.series:
            self.problems.append(f"unknown metric {node.name}")
            return frozenset(matchers) | TARGET_LABELS
        labels = self.series[node.name]
        for name in matchers:
            if name not in labels:
                self.problems.append(f"{node.name} has no label {name!r}")
        return labels

    def _call(self, node: pq.Call) -> Labels:
        args = [self._labels(arg) for arg in node.args]
        name = node.func.name
        if name in {"absent", "absent_over_time"}:
            arg = node.args[0]
            selector = arg.vector_selector if isinstance(arg, pq.MatrixSelector) else arg
            if not isinstance(selector, pq.VectorSelector):
                return frozenset()
            return frozenset(m.name for m in selector.matchers.matchers
                             if m.op == pq.MatchOp.Equal and m.name != "__name__")
        if name == "vector":
            return frozenset()
        if name == "histogram_quantile":
            if args[1] is not None and "le" not in args[1]:
                self.problems.append(f"histogram_quantile over series without 'le': {node}")
            return None if args[1] is None else args[1] - {"le"}
        if name in {"label_replace", "label_join"} and args[0] is not None:
            return args[0] | {node.args[1].val}
        return next((labels for labels in args if labels is not None), None)

    def _aggregate(self, node: pq.AggregateExpr) -> frozenset[str]:
        inner = self._labels(node.expr) or frozenset()
        modifier = node.modifier
        names = frozenset(modifier.labels) if modifier is not None else frozenset()
        missing = names - inner
        if missing:
            self.problems.append(
                f"{node.op} by/without {sorted(missing)} over series without them: {node}")
        if str(node.op) in {"topk", "bottomk", "limitk", "limit_ratio"}:
            return inner
        if modifier is None:
            return frozenset()
        if modifier.type == pq.AggModifierType.By:
            return names
        return inner - names

    def _binary(self, node: pq.BinaryExpr) -> Labels:
        lhs, rhs = self._labels(node.lhs), self._labels(node.rhs)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        names = frozenset(matching.labels) if matching is not None else frozenset()
        on = matching is not None and matching.type == pq.LabelModifierType.Include
        if on and (names - lhs or names - rhs):
            self.problems.append(f"on {sorted(names)}: a side lacks {sorted(names - lhs)}"
                                 f"/{sorted(names - rhs)}: {node}")
        if not on and names - (lhs | rhs):
            self.problems.append(f"ignoring {sorted(names - (lhs | rhs))}: no side has them")
        group = frozenset(modifier.group_labels or ()) if modifier is not None else frozenset()
        card = modifier.card if modifier is not None else None
        op = str(node.op)
        if op in SET_OPERATORS:
            return lhs | rhs if op == "or" else lhs
        if card == pq.VectorMatchCardinality.ManyToOne:
            if group - rhs:
                self.problems.append(f"group_left {sorted(group - rhs)}: not on the right")
            return lhs | group
        if card == pq.VectorMatchCardinality.OneToMany:
            if group - lhs:
                self.problems.append(f"group_right {sorted(group - lhs)}: not on the left")
            return rhs | group
        if matching is None:
            return lhs
        return names if on else lhs - names
