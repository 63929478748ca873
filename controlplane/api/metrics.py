"""``/metrics``: HTTP metrics from prometheus-flask-exporter plus pool state read at scrape time.

Each app gets its own registry (building the app twice must work); no label is built from
unbounded input except the registered model id. Units are base units (seconds, bytes). The
control plane is one gunicorn worker process by design (it owns the pool), so in-process
metrics are the whole truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics

from controlplane.core.states import OCCUPYING, SERVING, State
from controlplane.pool_replicas import best
from controlplane.records import Record
from controlplane.service import PoolService
from controlplane.stats import LOAD_FAILURE_REASONS, SCALE_DIRECTIONS, UNLOAD_REASONS, Histogram

MB = 1024 * 1024


def _histogram(name: str, doc: str, data: dict[str, Histogram]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["model"])
    for model, h in sorted(data.items()):
        fam.add_metric([model], h.cumulative(), sum_value=h.total)
    return fam


def _replicas(groups: list[list[Record]]) -> Iterator[Metric]:
    """Per model, its replica counts; per replica (``replica`` is its number), its state,
    node, requests in flight and served, and memory."""
    counts = GaugeMetricFamily(
        "modelpool_model_replicas",
        "Replicas per model: serving, loaded (any state but COLD/FAILED), and its max",
        labels=["model", "kind"],
    )
    state = GaugeMetricFamily(
        "modelpool_replica_state",
        "1 for the state each replica is in (replicas that ever ran)",
        labels=["model", "replica", "state"],
    )
    in_flight = GaugeMetricFamily(
        "modelpool_replica_in_flight_requests",
        "Requests in flight per replica (front door and direct port)",
        labels=["model", "replica"],
    )
    requests = CounterMetricFamily(
        "modelpool_replica_requests", "Requests served per replica", labels=["model", "replica"]
    )
    memory = GaugeMetricFamily(
        "modelpool_replica_memory_bytes", "Memory held per replica", labels=["model", "replica"]
    )
    for group in groups:
        m = group[0].entry.model_id
        counts.add_metric([m, "serving"], sum(1 for r in group if r.state in SERVING))
        counts.add_metric([m, "loaded"], sum(1 for r in group if r.state in OCCUPYING))
        counts.add_metric([m, "max"], group[0].entry.max_replicas)
        for r in group:
            k = str(r.replica)
            for st in State:
                state.add_metric([m, k, st.value], 1.0 if r.state is st else 0.0)
            in_flight.add_metric([m, k], r.total_in_flight)
            requests.add_metric([m, k], r.requests)
            memory.add_metric([m, k], r.memory() * MB if r.state in OCCUPYING else 0.0)
    yield from (counts, state, in_flight, requests, memory)


class PoolCollector(Collector):
    """Reads the pool when Prometheus scrapes."""

    def __init__(self, svc: PoolService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        pool = self.svc.pool
        now = pool.clock()
        groups = pool.groups()
        # A model shows its best replica's state; its counts are its replicas' summed.
        records = [best(g) for g in groups]
        by_state = GaugeMetricFamily(
            "modelpool_models", "Registered models by state", labels=["state"]
        )
        for st in State:
            by_state.add_metric([st.value], sum(1 for r in records if r.state is st))
        yield by_state
        state = GaugeMetricFamily(
            "modelpool_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        since = GaugeMetricFamily(
            "modelpool_model_state_seconds", "Seconds in the current state", labels=["model"]
        )
        requests = CounterMetricFamily(
            "modelpool_model_requests", "Requests served per model", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "modelpool_model_in_flight_requests", "Requests in flight per model", labels=["model"]
        )
        leases = GaugeMetricFamily(
            "modelpool_leases", "Live leases holding each model", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "modelpool_model_memory_bytes", "Memory held per loaded model", labels=["model"]
        )
        ttl = GaugeMetricFamily(
            "modelpool_model_ttl_remaining_seconds",
            "Seconds until a loaded model's TTL deadline (absent: never expires)",
            labels=["model"],
        )
        for r, group in zip(records, groups, strict=True):
            m = r.entry.model_id
            for st in State:
                state.add_metric([m, st.value], 1.0 if r.state is st else 0.0)
            since.add_metric([m], max(0.0, now - r.since) if r.since else 0.0)
            requests.add_metric([m], sum(x.requests for x in group))
            in_flight.add_metric([m], sum(x.total_in_flight for x in group))
            leases.add_metric([m], len(group[0].leases))
            memory.add_metric([m], sum(x.memory() * MB for x in group if x.state in OCCUPYING))
            if r.state in (State.HOT, State.COOLING) and r.deadline is not None:
                ttl.add_metric([m], max(0.0, r.deadline - now))
        yield from (state, since, requests, in_flight, leases, memory, ttl)
        yield from _replicas(groups)
        yield from self._nodes([x for g in groups for x in g])
        yield from self._lifecycle()
        summary = pool.summary()
        gauges = (
            ("modelpool_ports_available", "Worker ports not in use", summary["available_ports"]),
            (
                "modelpool_ports",
                "Worker ports in port_range (of every node models may use)",
                sum(
                    n["port_range"]["end"] - n["port_range"]["start"] + 1
                    for n in pool.nodes_view()
                    if n["placeable"]
                ),
            ),
            ("modelpool_max_models", "max_concurrent_models", summary["max_concurrent_models"]),
            (
                "modelpool_memory_limit_bytes",
                "memory_limit_mb in bytes (0: no limit)",
                summary["memory_limit_mb"] * MB,
            ),
            (
                "modelpool_memory_used_bytes",
                "Memory held by loaded models",
                summary["total_memory_mb"] * MB,
            ),
            (
                "modelpool_supervisord_up",
                "1 if supervisord answered the last check",
                1.0 if pool.available else 0.0,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)

    def _nodes(self, records: list[Any]) -> Iterator[Metric]:
        """Per node: up, memory used and limit, models; and which node each model is on."""
        up = GaugeMetricFamily(
            "modelpool_node_up", "1 if the node's supervisord answers", labels=["node"]
        )
        used = GaugeMetricFamily(
            "modelpool_node_memory_used_bytes", "Memory held by models on the node", labels=["node"]
        )
        limit = GaugeMetricFamily(
            "modelpool_node_memory_limit_bytes",
            "The node's memory_limit_mb in bytes (0: no limit)",
            labels=["node"],
        )
        models = GaugeMetricFamily(
            "modelpool_node_models",
            "Models loaded on the node (any state but COLD/FAILED)",
            labels=["node"],
        )
        slots = GaugeMetricFamily(
            "modelpool_node_max_models", "The node's max_concurrent_models", labels=["node"]
        )
        for n in self.svc.pool.nodes_view():
            up.add_metric([n["name"]], 1.0 if n["state"] == "UP" else 0.0)
            used.add_metric([n["name"]], n["memory_used_mb"] * MB)
            limit.add_metric([n["name"]], n["memory_limit_mb"] * MB)
            models.add_metric([n["name"]], len(n["models"]))
            slots.add_metric([n["name"]], n["max_concurrent_models"])
        placed = GaugeMetricFamily(
            "modelpool_model_node",
            "Workers (replicas) of each loaded model on each node",
            labels=["model", "node"],
        )
        where: dict[tuple[str, str], int] = {}
        for r in records:
            if r.state in OCCUPYING and r.node is not None:
                at = (r.entry.model_id, r.node)
                where[at] = where.get(at, 0) + 1
        for at, count in sorted(where.items()):
            placed.add_metric(list(at), float(count))
        yield from (up, used, limit, models, slots, placed)

    def _lifecycle(self) -> Iterator[Metric]:
        # Every registered model gets every series from the start (at 0), so that rate() and
        # increase() see the first event of a series too.
        st = self.svc.pool.stats.snapshot()
        models = sorted(self.svc.pool.ids())
        loads = CounterMetricFamily("modelpool_loads", "Models that became HOT", labels=["model"])
        refusals = CounterMetricFamily(
            "modelpool_capacity_refusals", "Loads refused for lack of room", labels=["model"]
        )
        drift = CounterMetricFamily(
            "modelpool_backend_drift",
            "Times Ollama had dropped a HOT model and it was pinned again",
            labels=["model"],
        )
        failures = CounterMetricFamily(
            "modelpool_load_failures", "Loads that failed, by reason", labels=["model", "reason"]
        )
        unloads = CounterMetricFamily(
            "modelpool_unloads", "Unloads by reason", labels=["model", "reason"]
        )
        for model in models:
            loads.add_metric([model], st.loads.get(model, 0))
            refusals.add_metric([model], st.capacity_refusals.get(model, 0))
            drift.add_metric([model], st.drift.get(model, 0))
            for reason in LOAD_FAILURE_REASONS:
                failures.add_metric([model, reason], st.load_failures.get((model, reason), 0))
            for reason in UNLOAD_REASONS:
                unloads.add_metric([model, reason], st.unloads.get((model, reason), 0))
        scale = CounterMetricFamily(
            "modelpool_scale_events",
            "Replicas added (up) or drained (down) by scaling",
            labels=["model", "direction"],
        )
        for model in models:
            for direction in SCALE_DIRECTIONS:
                scale.add_metric([model, direction], st.scale_events.get((model, direction), 0))
        yield from (loads, failures, unloads, refusals, drift, scale)
        known = set(models)
        yield _histogram(
            "modelpool_load_duration_seconds",
            "WARMING to HOT",
            {m: h for m, h in st.load_duration.items() if m in known},
        )
        yield _histogram(
            "modelpool_load_wait_seconds",
            "Time requests waited for their model to load",
            {m: h for m, h in st.load_wait.items() if m in known},
        )


HTTP_EXT = "modelpool_http_metrics"


def install(app: Flask, svc: PoolService) -> CollectorRegistry:
    """Serve ``/metrics`` from a registry of this app's own.

    ``app.extensions[HTTP_EXT]`` keeps the exporter's request histogram and counter, for the
    requests the front door relays without Flask (controlplane/asgi.py) to be counted too.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(svc))
    PrometheusMetrics(
        app,
        registry=registry,
        group_by="url_rule",  # the route, not the path: model ids stay out of these labels
        path="/metrics",
        defaults_prefix="modelpool",
    )
    named = registry._names_to_collectors  # the exporter keeps its metric objects to itself
    app.extensions[HTTP_EXT] = (
        named["modelpool_http_request_duration_seconds"],
        named["modelpool_http_request_total"],
    )
    return registry
