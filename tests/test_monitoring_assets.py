"""The Prometheus config, alert rules and Grafana dashboard under deploy/.

They are checked with promtool (config, rules, rule unit tests, PromQL syntax of every dashboard
query), and against one list of metrics, ``DOCUMENTED_METRICS``, which must equal the metric
table of deploy/README.md: rules and dashboard may only use documented metrics. The tests that
take ``live_metrics`` (the ``/metrics`` texts of a running control plane and one of its
workers) check that those metrics are exported, with the documented types and labels, and that
``promtool check metrics`` accepts both texts.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "modelpool-dashboard.json"
DEPLOY_README = DEPLOY / "README.md"


class MetricDoc(NamedTuple):
    type: str
    labels: frozenset[str]


def _doc(type_: str, *labels: str) -> MetricDoc:
    return MetricDoc(type_, frozenset(labels))


# Every metric the rules and the dashboard may use: the table in deploy/README.md, as code.
# Names as PromQL sees them (counters with _total, histograms by their base name).
DOCUMENTED_METRICS: dict[str, MetricDoc] = {
    # control plane, job "modelpool"
    "modelpool_models": _doc("gauge", "state"),
    "modelpool_model_state": _doc("gauge", "model", "state"),
    "modelpool_model_state_seconds": _doc("gauge", "model"),
    "modelpool_model_requests_total": _doc("counter", "model"),
    "modelpool_model_in_flight_requests": _doc("gauge", "model"),
    "modelpool_leases": _doc("gauge", "model"),
    "modelpool_model_memory_bytes": _doc("gauge", "model"),
    "modelpool_model_ttl_remaining_seconds": _doc("gauge", "model"),
    "modelpool_loads_total": _doc("counter", "model"),
    "modelpool_load_failures_total": _doc("counter", "model", "reason"),
    "modelpool_unloads_total": _doc("counter", "model", "reason"),
    "modelpool_capacity_refusals_total": _doc("counter", "model"),
    "modelpool_load_duration_seconds": _doc("histogram", "model"),
    "modelpool_load_wait_seconds": _doc("histogram", "model"),
    "modelpool_ports_available": _doc("gauge"),
    "modelpool_ports": _doc("gauge"),
    "modelpool_max_models": _doc("gauge"),
    "modelpool_memory_limit_bytes": _doc("gauge"),
    "modelpool_memory_used_bytes": _doc("gauge"),
    "modelpool_supervisord_up": _doc("gauge"),
    "modelpool_backend_drift_total": _doc("counter", "model"),
    "modelpool_node_up": _doc("gauge", "node"),
    "modelpool_node_memory_used_bytes": _doc("gauge", "node"),
    "modelpool_node_memory_limit_bytes": _doc("gauge", "node"),
    "modelpool_node_models": _doc("gauge", "node"),
    "modelpool_node_max_models": _doc("gauge", "node"),
    "modelpool_model_node": _doc("gauge", "model", "node"),
    "modelpool_model_replicas": _doc("gauge", "model", "kind"),
    "modelpool_replica_state": _doc("gauge", "model", "replica", "state"),
    "modelpool_replica_in_flight_requests": _doc("gauge", "model", "replica"),
    "modelpool_replica_requests_total": _doc("counter", "model", "replica"),
    "modelpool_replica_memory_bytes": _doc("gauge", "model", "replica"),
    "modelpool_scale_events_total": _doc("counter", "model", "direction"),
    "modelpool_http_request_duration_seconds": _doc("histogram", "method", "status", "url_rule"),
    "modelpool_http_request_total": _doc("counter", "method", "status"),
    # model workers, job "modelpool-workers"
    "modelpool_worker_ready": _doc("gauge", "model"),
    "modelpool_worker_requests_total": _doc("counter", "model", "endpoint", "status"),
    "modelpool_worker_in_flight_requests": _doc("gauge", "model"),
    "modelpool_worker_request_duration_seconds": _doc("histogram", "model", "endpoint"),
    "modelpool_worker_time_to_first_token_seconds": _doc("histogram", "model", "endpoint"),
    "modelpool_worker_tokens_total": _doc("counter", "model", "kind"),
    # made by Prometheus for every target
    "up": _doc("gauge", "job", "instance"),
}

WORKER_PREFIX = "modelpool_worker_"
# The keys of the live_metrics fixture holding /metrics texts.
EXPOSITIONS = ("controlplane", "worker")
SYNTHETIC_METRICS = {"up"}

EXPECTED_ALERTS = {
    "ModelPoolDown": "critical",
    "SupervisordDown": "critical",
    "NodeDown": "critical",
    "ModelStuckWarming": "warning",
    "ModelStuckUnloading": "warning",
    "LoadFailuresRising": "warning",
    "PoolAtCapacity": "warning",
    "NoPortsLeft": "warning",
    "MemoryOverLimit": "warning",
    "WorkerNotReady": "warning",
}
# Alerts about one model: their annotations must name it.
PER_MODEL_ALERTS = {
    "ModelStuckWarming",
    "ModelStuckUnloading",
    "LoadFailuresRising",
    "PoolAtCapacity",
    "WorkerNotReady",
}

# What the dashboard must show (the operator's questions it answers).
REQUIRED_DASHBOARD_METRICS = {
    "modelpool_models",
    "modelpool_model_state",
    "modelpool_loads_total",
    "modelpool_unloads_total",
    "modelpool_load_failures_total",
    "modelpool_load_duration_seconds",
    "modelpool_load_wait_seconds",
    "modelpool_model_requests_total",
    "modelpool_model_in_flight_requests",
    "modelpool_memory_used_bytes",
    "modelpool_memory_limit_bytes",
    "modelpool_model_memory_bytes",
    "modelpool_model_ttl_remaining_seconds",
    "modelpool_ports_available",
    "modelpool_worker_time_to_first_token_seconds",
    "modelpool_worker_tokens_total",
}

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
MODEL_VARIABLE_QUERY = "label_values(modelpool_model_state, model)"
GRAFANA_BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms"}
# Values the dashboard variables are replaced with to check the queries' PromQL syntax.
VARIABLE_SAMPLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "6h",
    "window": "30m",
    "model": ".*",
}

# Exposition suffixes that belong to one metric family: histogram series, the counter
# suffix, and the creation timestamps prometheus_client adds to counters and histograms.
_FAMILY_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")
_METRIC_REF = re.compile(r"(?<![\w:])(modelpool_[A-Za-z0-9_]+|up)(?![\w:])")
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+\S+")
_LABEL_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"(?<![\w:])(modelpool_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


# ---------------------------------------------------------------------------- helpers


def normalize_metric_name(name: str) -> str:
    """The family name of a series or reference: one of ``_FAMILY_SUFFIXES`` removed.

    ``modelpool_loads_total``, ``modelpool_loads_created`` and a ``# TYPE modelpool_loads
    counter`` line (older clients) all give ``modelpool_loads``; ``x_bucket``, ``x_sum`` and
    ``x_count`` give ``x``. Compare only names normalised this way on both sides.
    """
    for suffix in _FAMILY_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _exposition_lines(text: str) -> Iterator[tuple[str, str, str]]:
    """(kind, name, rest) for ``# TYPE`` lines (kind "type") and samples (kind "sample")."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                yield "type", parts[2], parts[3].strip()
            continue
        match = _SAMPLE_LINE.match(line)
        if match:
            yield "sample", match.group(1), match.group(2) or ""


def metric_names_in_exposition(text: str) -> set[str]:
    """Normalised names of the metric families in a Prometheus text exposition.

    Families come from ``# TYPE`` lines (so a family without samples yet, e.g. a labelled
    histogram nothing was observed in, counts) and from sample lines. Names go through
    ``normalize_metric_name``: ``modelpool_loads_total`` in a query matches the exposition's
    ``modelpool_loads_total`` samples and either form of its ``# TYPE`` line.
    """
    return {normalize_metric_name(name) for _, name, _ in _exposition_lines(text)}


def metric_types_in_exposition(text: str) -> dict[str, str]:
    """Normalised family name -> type from ``# TYPE`` lines.

    The ``<name>_created`` gauges that prometheus_client writes next to counters and
    histograms do not override the family's own type.
    """
    types: dict[str, str] = {}
    created: dict[str, str] = {}
    for kind, name, rest in _exposition_lines(text):
        if kind != "type":
            continue
        target = created if name.endswith("_created") else types
        target[normalize_metric_name(name)] = rest
    for name, type_ in created.items():
        types.setdefault(name, type_)
    return types


def series_names_in_exposition(text: str) -> set[str]:
    """The exact names PromQL can select from an exposition, unnormalised.

    Sample names as they are, plus the names a declared family will have once it has samples
    (``<base>_total`` for a counter, ``_bucket``/``_sum``/``_count`` for a histogram), so a
    labelled metric nothing was recorded in yet still counts. Unlike the normalised names, this
    tells ``modelpool_ports`` from ``modelpool_ports``.
    """
    names: set[str] = set()
    for kind, name, rest in _exposition_lines(text):
        if kind == "sample":
            names.add(name)
        elif rest == "counter":
            names.add(name.removesuffix("_total") + "_total")
        elif rest in {"histogram", "summary"}:
            suffixes = ("_sum", "_count") + (("_bucket",) if rest == "histogram" else ("",))
            names.update(name + suffix for suffix in suffixes)
        else:
            names.add(name)
    return names


def label_sets_in_exposition(text: str) -> dict[str, set[frozenset[str]]]:
    """Normalised family name -> the label-name sets of its samples (``le`` and
    ``quantile`` left out; ``_created`` samples skipped)."""
    found: dict[str, set[frozenset[str]]] = {}
    for kind, name, rest in _exposition_lines(text):
        if kind != "sample" or name.endswith("_created"):
            continue
        labels = frozenset(_LABEL_PAIR.findall(rest)) - {"le", "quantile"}
        found.setdefault(normalize_metric_name(name), set()).add(labels)
    return found


def metric_names_in_expr(expr: str) -> set[str]:
    """Metric names (``modelpool_*`` and ``up``) a PromQL expression refers to, as written."""
    return set(_METRIC_REF.findall(_STRING_LITERAL.sub('""', expr)))


def load_alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels inside collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(dashboard) for t in p.get("targets", [])]


def template_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var["query"]
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name as written -> where it is used (``alerts.yml`` or the dashboard)."""
    found: dict[str, set[str]] = {}
    dashboard = load_dashboard()
    sources = [(rule["expr"], "alerts.yml") for rule in load_alert_rules()]
    sources += [(expr, "dashboard") for expr in dashboard_exprs(dashboard)]
    sources += [(query, "dashboard variables") for query in template_queries(dashboard)]
    for expr, where in sources:
        for name in metric_names_in_expr(expr):
            found.setdefault(name, set()).add(where)
    return found


def documented_by_family() -> dict[str, str]:
    """Normalised family name -> documented name."""
    return {normalize_metric_name(name): name for name in DOCUMENTED_METRICS}


def readme_metric_table() -> dict[str, MetricDoc]:
    """The rows of the metric tables in deploy/README.md's "Metrics" section."""
    text = DEPLOY_README.read_text()
    match = re.search(r"^## Metrics\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "deploy/README.md has no '## Metrics' section"
    rows: dict[str, MetricDoc] = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`[A-Za-z_:][A-Za-z0-9_:]*`", cells[0]):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} is in the README's metric tables twice"
        rows[name] = MetricDoc(cells[1], frozenset(re.findall(r"`([^`]+)`", cells[2])))
    return rows


def run_promtool(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> str:
    """Run promtool, assert it succeeded, return its output."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not on PATH (Debian package prometheus)"
    proc = subprocess.run(
        [promtool, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


# ---------------------------------------------------------------------------- promtool


def test_promtool_check_config() -> None:
    output = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert "SUCCESS" in output


def test_promtool_check_rules() -> None:
    output = run_promtool("check", "rules", str(ALERT_RULES.relative_to(ROOT)))
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in output, output


def test_prometheus_config_scrapes_control_plane_and_discovered_workers() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"]
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"modelpool", "modelpool-workers"}
    control = jobs["modelpool"]
    assert control.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in control["static_configs"] for t in sc["targets"]] == ["127.0.0.1:8050"]
    workers = jobs["modelpool-workers"]
    assert [sd["url"] for sd in workers["http_sd_configs"]] == ["http://127.0.0.1:8050/sd/workers"]
    assert workers.get("metrics_path", "/metrics") == "/metrics"
    # The workers' own `model` label must not become `exported_model`.
    assert workers.get("honor_labels") is True


# ---------------------------------------------------------------------------- alert rules


def test_alert_rules_shape() -> None:
    data = yaml.safe_load(ALERT_RULES.read_text())
    assert [group["name"] for group in data["groups"]] == ["modelpool"]
    rules = load_alert_rules()
    names = [str(rule.get("alert")) for rule in rules]
    assert sorted(names) == sorted(EXPECTED_ALERTS), names
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] == EXPECTED_ALERTS[name], name
        annotations = rule["annotations"]
        assert annotations.get("summary", "").strip(), f"{name}: no summary"
        assert annotations.get("description", "").strip(), f"{name}: no description"
        if name in PER_MODEL_ALERTS:
            text = annotations["summary"] + annotations["description"]
            assert "$labels.model" in text, f"{name}: annotations do not name the model"


CP = {"job": "modelpool", "instance": "127.0.0.1:8050"}
CP2 = {"job": "modelpool", "instance": "127.0.0.1:9050"}
CP3 = {"job": "modelpool", "instance": "127.0.0.1:9150"}
GIB = 1024**3


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _expect(alertname: str, eval_time: str, *firing: dict[str, str]) -> dict[str, Any]:
    severity = EXPECTED_ALERTS[alertname]
    return {
        "eval_time": eval_time,
        "alertname": alertname,
        "exp_alerts": [{"exp_labels": {**labels, "severity": severity}} for labels in firing],
    }


def _worker(port: int) -> dict[str, str]:
    return {"job": "modelpool-workers", "instance": f"127.0.0.1:{port}"}


# promtool unit tests: each alert fires in the situation it describes, after its `for:`, and
# not in the neighbouring healthy situations.
ALERT_CASES: list[dict[str, Any]] = [
    {
        "input_series": [
            _series("up", CP, "0x15"),
            _series("up", CP2, "1x15"),
        ],
        "alert_rule_test": [
            _expect("ModelPoolDown", "0m"),
            _expect("ModelPoolDown", "5m", CP),
        ],
    },
    {
        "input_series": [
            _series("modelpool_supervisord_up", CP, "0x15"),
            _series("modelpool_supervisord_up", CP2, "1x15"),
        ],
        "alert_rule_test": [
            _expect("SupervisordDown", "0m"),
            _expect("SupervisordDown", "5m", CP),
        ],
    },
    {
        "input_series": [
            _series("modelpool_node_up", {**CP, "node": "gpu-a"}, "1 0x15"),
            _series("modelpool_node_up", {**CP, "node": "gpu-b"}, "1x15"),
            _series("modelpool_node_up", {**CP2, "node": "local"}, "1x15"),
        ],
        "alert_rule_test": [
            _expect("NodeDown", "0m"),
            _expect("NodeDown", "5m", {**CP, "node": "gpu-a"}),
        ],
    },
    {
        "input_series": [
            _series("modelpool_model_state", {**CP, "model": "a", "state": "WARMING"}, "1x20"),
            _series("modelpool_model_state_seconds", {**CP, "model": "a"}, "0+60x20"),
            # HOT for just as long: not stuck
            _series("modelpool_model_state", {**CP, "model": "b", "state": "WARMING"}, "0x20"),
            _series("modelpool_model_state", {**CP, "model": "b", "state": "HOT"}, "1x20"),
            _series("modelpool_model_state_seconds", {**CP, "model": "b"}, "0+60x20"),
        ],
        "alert_rule_test": [
            _expect("ModelStuckWarming", "10m"),
            _expect("ModelStuckWarming", "13m", {**CP, "model": "a", "state": "WARMING"}),
        ],
    },
    {
        "input_series": [
            _series("modelpool_model_state", {**CP, "model": "a", "state": "UNLOADING"}, "1x20"),
            _series("modelpool_model_state_seconds", {**CP, "model": "a"}, "0+60x20"),
            _series("modelpool_model_state", {**CP, "model": "b", "state": "UNLOADING"}, "0x20"),
            _series("modelpool_model_state", {**CP, "model": "b", "state": "COLD"}, "1x20"),
            _series("modelpool_model_state_seconds", {**CP, "model": "b"}, "0+60x20"),
        ],
        "alert_rule_test": [
            _expect("ModelStuckUnloading", "5m"),
            _expect("ModelStuckUnloading", "8m", {**CP, "model": "a", "state": "UNLOADING"}),
        ],
    },
    {
        "input_series": [
            _series(
                "modelpool_load_failures_total",
                {**CP, "model": "a", "reason": "timeout"},
                "0+1x30",
            ),
            # one failure: not rising
            _series(
                "modelpool_load_failures_total",
                {**CP, "model": "b", "reason": "exited"},
                "0 1x30",
            ),
        ],
        "alert_rule_test": [
            _expect("LoadFailuresRising", "2m"),
            _expect("LoadFailuresRising", "20m", {**CP, "model": "a"}),
        ],
    },
    {
        "input_series": [
            # CP: room left, but a load of model a was refused at 3m
            _series("modelpool_capacity_refusals_total", {**CP, "model": "a"}, "0 0 0 1x12"),
            _series("modelpool_models", {**CP, "state": "HOT"}, "1x15"),
            _series("modelpool_models", {**CP, "state": "COLD"}, "3x15"),
            _series("modelpool_max_models", CP, "5x15"),
            # CP2: as many models loaded as allowed
            _series("modelpool_models", {**CP2, "state": "HOT"}, "3x15"),
            _series("modelpool_models", {**CP2, "state": "WARMING"}, "1x15"),
            _series("modelpool_models", {**CP2, "state": "COOLING"}, "1x15"),
            _series("modelpool_models", {**CP2, "state": "COLD"}, "7x15"),
            _series("modelpool_max_models", CP2, "5x15"),
            # CP3: failed models hold no slot
            _series("modelpool_models", {**CP3, "state": "HOT"}, "1x15"),
            _series("modelpool_models", {**CP3, "state": "FAILED"}, "5x15"),
            _series("modelpool_max_models", CP3, "5x15"),
        ],
        "alert_rule_test": [
            _expect("PoolAtCapacity", "0m"),
            _expect("PoolAtCapacity", "6m", {**CP, "model": "a"}, CP2),
        ],
    },
    {
        "input_series": [
            _series("modelpool_ports_available", CP, "0x10"),
            _series("modelpool_ports_available", CP2, "4x10"),
        ],
        "alert_rule_test": [
            _expect("NoPortsLeft", "0m"),
            _expect("NoPortsLeft", "5m", CP),
        ],
    },
    {
        "input_series": [
            _series("modelpool_memory_used_bytes", CP, f"{10 * GIB}x20"),
            _series("modelpool_memory_limit_bytes", CP, f"{8 * GIB}x20"),
            # no limit
            _series("modelpool_memory_used_bytes", CP2, f"{10 * GIB}x20"),
            _series("modelpool_memory_limit_bytes", CP2, "0x20"),
            # under the limit
            _series("modelpool_memory_used_bytes", CP3, f"{1 * GIB}x20"),
            _series("modelpool_memory_limit_bytes", CP3, f"{8 * GIB}x20"),
        ],
        "alert_rule_test": [
            _expect("MemoryOverLimit", "4m"),
            _expect("MemoryOverLimit", "10m", CP),
        ],
    },
    {
        "input_series": [
            _series("modelpool_worker_ready", {**_worker(8051), "model": "a"}, "0x20"),
            _series("up", {**_worker(8051), "model": "a", "backend": "llamacpp"}, "1x20"),
            # ready
            _series("modelpool_worker_ready", {**_worker(8052), "model": "b"}, "1x20"),
            _series("up", {**_worker(8052), "model": "b", "backend": "ollama"}, "1x20"),
            # not answering at all: not this alert
            _series("modelpool_worker_ready", {**_worker(8053), "model": "c"}, "0x20"),
            _series("up", {**_worker(8053), "model": "c", "backend": "ollama"}, "0x20"),
        ],
        "alert_rule_test": [
            _expect("WorkerNotReady", "9m"),
            _expect("WorkerNotReady", "15m", {**_worker(8051), "model": "a"}),
        ],
    },
]


def test_alert_cases_cover_every_alert() -> None:
    tested = {case["alertname"] for group in ALERT_CASES for case in group["alert_rule_test"]}
    assert tested == set(EXPECTED_ALERTS)


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    # Annotations are compared verbatim by promtool; the rules are tested without them (their
    # templates are checked by `promtool check rules` above).
    rules = yaml.safe_load(ALERT_RULES.read_text())
    stripped = copy.deepcopy(rules)
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(stripped, sort_keys=False))
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in ALERT_CASES],
    }
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    output = run_promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert "SUCCESS" in output, output


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 39
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE_REF
    assert MODEL_VARIABLE_QUERY in template_queries(dashboard)
    assert model["multi"] is True
    assert model["includeAll"] is True

    panels = all_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    queried = query_panels(dashboard)
    assert len(queried) >= 14
    for panel in queried:
        where = f"panel {panel['id']} ({panel.get('title')!r})"
        assert panel.get("title"), where
        assert panel["datasource"] == DATASOURCE_REF, where
        targets = panel.get("targets")
        assert targets, f"{where} has no targets"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refIds {ref_ids}"
        for target in targets:
            assert isinstance(target.get("expr"), str), where
            assert target["expr"].strip(), where
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, where


def _datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def test_dashboard_has_no_fixed_datasource() -> None:
    dashboard = load_dashboard()
    refs = list(_datasource_refs(dashboard["panels"]))
    refs += list(_datasource_refs(dashboard["templating"]))
    assert refs
    for ref in refs:
        assert ref == DATASOURCE_REF, ref


def test_dashboard_layout_does_not_overlap() -> None:
    taken: dict[tuple[int, int], int] = {}
    for panel in all_panels(load_dashboard()):
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0, panel["id"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["id"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = taken.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"


def test_dashboard_variables_are_defined() -> None:
    dashboard = load_dashboard()
    defined = {var["name"] for var in dashboard["templating"]["list"]}
    for expr in dashboard_exprs(dashboard):
        for braced, bare in _VARIABLE.findall(expr):
            name = braced or bare
            assert name in defined | GRAFANA_BUILTIN_VARIABLES, f"${name} in {expr!r}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Grafana variables replaced by sample values; promtool parses each query as a
    # recording rule.
    rules = []
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            expr = _VARIABLE.sub(
                lambda m: VARIABLE_SAMPLES[m.group(1) or m.group(2)], target["expr"]
            )
            rules.append(
                {"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output, output


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = load_dashboard()
    used = {name for expr in dashboard_exprs(dashboard) for name in metric_names_in_expr(expr)}
    used_families = {normalize_metric_name(name) for name in used}
    missing = {
        name
        for name in REQUIRED_DASHBOARD_METRICS
        if normalize_metric_name(name) not in used_families
    }
    assert not missing, f"dashboard shows nothing of {sorted(missing)}"
    histograms = [expr for expr in dashboard_exprs(dashboard) if "histogram_quantile" in expr]
    for metric in ("modelpool_load_duration_seconds", "modelpool_worker_time_to_first_token"):
        quantiles = {
            q for expr in histograms if f"{metric}" in expr for q in re.findall(r"\((0\.\d+)", expr)
        }
        assert {"0.5", "0.95"} <= quantiles, f"{metric}: p50 and p95 wanted, got {quantiles}"


def test_dashboard_per_model_queries_follow_the_model_variable() -> None:
    family_labels = {
        normalize_metric_name(name): doc.labels for name, doc in DOCUMENTED_METRICS.items()
    }
    for expr in dashboard_exprs(load_dashboard()):
        for name, selector in _SELECTOR.findall(expr):
            labels = family_labels.get(normalize_metric_name(name), frozenset())
            if "model" in labels:
                assert 'model=~"$model"' in selector, f"{name} not filtered by $model in {expr!r}"


# ---------------------------------------------------------------------------- metric names


def test_readme_metric_table_matches_documented_metrics() -> None:
    table = readme_metric_table()
    assert set(table) == set(DOCUMENTED_METRICS), (
        f"only in README: {sorted(set(table) - set(DOCUMENTED_METRICS))}, "
        f"only in DOCUMENTED_METRICS: {sorted(set(DOCUMENTED_METRICS) - set(table))}"
    )
    for name, doc in DOCUMENTED_METRICS.items():
        assert table[name] == doc, f"{name}: README says {table[name]}, tests say {doc}"


def test_documented_metric_families_are_distinct() -> None:
    families = [normalize_metric_name(name) for name in DOCUMENTED_METRICS]
    assert len(families) == len(set(families)), families
    for name, doc in DOCUMENTED_METRICS.items():
        assert doc.type in {"gauge", "counter", "histogram"}, name
        if doc.type == "counter":
            assert name.endswith("_total"), f"{name}: counters are named *_total"


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    used = referenced_metrics()
    assert "modelpool_load_duration_seconds_bucket" in used  # the scan sees histogram series
    assert "up" in used
    documented = documented_by_family()
    unknown = {
        name: sorted(where)
        for name, where in used.items()
        if normalize_metric_name(name) not in documented
    }
    assert not unknown, f"used but not documented in deploy/README.md: {unknown}"
    # A histogram is used through its series, a counter by its _total name.
    for name in used:
        doc = DOCUMENTED_METRICS[documented[normalize_metric_name(name)]]
        if doc.type == "histogram":
            assert re.search(r"_(bucket|sum|count)$", name), f"{name}: histogram used bare"
        elif doc.type == "counter":
            assert name.endswith("_total"), f"{name}: counter used without _total"
        else:
            assert name in DOCUMENTED_METRICS, f"{name}: gauge used with a suffix"


def test_metric_names_in_exposition_parser() -> None:
    text = "\n".join(
        [
            "# HELP modelpool_loads_total Successful loads",
            "# TYPE modelpool_loads_total counter",
            'modelpool_loads_total{model="a:b/c"} 3.0',
            "# HELP modelpool_loads_created Successful loads",
            "# TYPE modelpool_loads_created gauge",
            'modelpool_loads_created{model="a:b/c"} 1.7e+09',
            "# TYPE modelpool_unloads counter",  # older clients: TYPE without _total
            'modelpool_unloads_total{model="x",reason="ttl"} 1',
            "# TYPE modelpool_load_wait_seconds histogram",
            'modelpool_load_wait_seconds_bucket{le="0.5",model="x"} 1',
            'modelpool_load_wait_seconds_bucket{le="+Inf",model="x"} 1',
            'modelpool_load_wait_seconds_sum{model="x"} 0.2',
            'modelpool_load_wait_seconds_count{model="x"} 1',
            "# HELP modelpool_worker_time_to_first_token_seconds no samples yet",
            "# TYPE modelpool_worker_time_to_first_token_seconds histogram",
            "modelpool_supervisord_up 1",
            'modelpool_models{state="A \\"quoted\\", value"} 2 1700000000000',
            "# EOF",
            "",
        ]
    )
    names = metric_names_in_exposition(text)
    assert names == {
        "modelpool_loads",
        "modelpool_unloads",
        "modelpool_load_wait_seconds",
        "modelpool_worker_time_to_first_token_seconds",
        "modelpool_supervisord_up",
        "modelpool_models",
    }
    for reference in (
        "modelpool_loads_total",
        "modelpool_unloads_total",
        "modelpool_load_wait_seconds_bucket",
        "modelpool_load_wait_seconds",
    ):
        assert normalize_metric_name(reference) in names, reference
    assert normalize_metric_name("modelpool_load_failures_total") not in names
    assert metric_types_in_exposition(text) == {
        "modelpool_loads": "counter",
        "modelpool_unloads": "counter",
        "modelpool_load_wait_seconds": "histogram",
        "modelpool_worker_time_to_first_token_seconds": "histogram",
    }
    series = series_names_in_exposition(text)
    assert {
        "modelpool_loads_total",
        "modelpool_unloads_total",
        "modelpool_load_wait_seconds_bucket",
        "modelpool_worker_time_to_first_token_seconds_bucket",
        "modelpool_worker_time_to_first_token_seconds_count",
        "modelpool_supervisord_up",
    } <= series
    assert "modelpool_loads" not in series
    assert "modelpool_supervisord" not in series
    assert label_sets_in_exposition(text) == {
        "modelpool_loads": {frozenset({"model"})},
        "modelpool_unloads": {frozenset({"model", "reason"})},
        "modelpool_load_wait_seconds": {frozenset({"model"})},
        "modelpool_supervisord_up": {frozenset()},
        "modelpool_models": {frozenset({"state"})},
    }


def test_metric_names_in_expr() -> None:
    expr = (
        'sum by (model) (rate(modelpool_loads_total{job="modelpool_x", model=~"$model"}[5m]))'
        ' and on(instance) up{job="up"} == 1 or modelpool_load_wait_seconds_bucket'
    )
    assert metric_names_in_expr(expr) == {
        "modelpool_loads_total",
        "up",
        "modelpool_load_wait_seconds_bucket",
    }


# ---------------------------------------------------------------------------- live stack


def _exporter(name: str) -> str:
    return "worker" if name.startswith(WORKER_PREFIX) else "controlplane"


def test_referenced_metrics_are_exported(live_metrics: dict[str, str]) -> None:
    families = {key: metric_names_in_exposition(live_metrics[key]) for key in EXPOSITIONS}
    series = {key: series_names_in_exposition(live_metrics[key]) for key in EXPOSITIONS}
    missing = {}
    for name in referenced_metrics():
        if name in SYNTHETIC_METRICS:
            continue
        exporter = _exporter(name)
        if normalize_metric_name(name) not in families[exporter]:
            missing[name] = f"no such family in the {exporter} exposition"
        elif name not in series[exporter]:
            missing[name] = f"the {exporter} exports the family under another name"
    assert not missing, f"used by alerts.yml or the dashboard but not exported: {missing}"


def test_exported_metric_types_and_labels_match_docs(live_metrics: dict[str, str]) -> None:
    problems = []
    for name, doc in DOCUMENTED_METRICS.items():
        if name in SYNTHETIC_METRICS:
            continue
        exporter = _exporter(name)
        text = live_metrics[exporter]
        family = normalize_metric_name(name)
        selectable = f"{name}_bucket" if doc.type == "histogram" else name
        if selectable not in series_names_in_exposition(text):
            problems.append(f"{name}: not exported by the {exporter}")
            continue
        type_ = metric_types_in_exposition(text).get(family)
        if type_ != doc.type:
            problems.append(f"{name}: exported as {type_}, documented as {doc.type}")
        for labels in label_sets_in_exposition(text).get(family, set()):
            if labels != doc.labels:
                problems.append(
                    f"{name}: exported with labels {sorted(labels)}, "
                    f"documented {sorted(doc.labels)}"
                )
    assert not problems, "\n".join(problems)


def test_promtool_check_metrics_on_live_exposition(live_metrics: dict[str, str]) -> None:
    for key in EXPOSITIONS:
        text = live_metrics[key]
        assert text.strip(), f"{key}: empty /metrics"
        proc = subprocess.run(
            [shutil.which("promtool") or "promtool", "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, (
            f"promtool check metrics on the {key} exposition exited {proc.returncode}:\n"
            f"{proc.stdout}{proc.stderr}"
        )
