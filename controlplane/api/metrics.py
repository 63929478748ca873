"""``/metrics``: HTTP metrics from prometheus-flask-exporter plus pool state read at scrape time.

Each app gets its own registry (building the app twice must work); no label is built from
unbounded input except the registered model id.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics

from controlplane.core.states import State
from controlplane.service import PoolService

MB = 1024 * 1024


class PoolCollector(Collector):
    """Reads the pool when Prometheus scrapes."""

    def __init__(self, svc: PoolService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        pool = self.svc.pool
        now = pool.clock()
        records = pool.records()
        by_state = GaugeMetricFamily(
            "modelpool_models", "Registered models by state", labels=["state"]
        )
        for st in State:
            by_state.add_metric([st.value], sum(1 for r in records if r.state is st))
        yield by_state
        state = GaugeMetricFamily(
            "modelpool_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        requests = CounterMetricFamily(
            "modelpool_model_requests", "Requests served per model", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "modelpool_model_in_flight_requests", "Requests in flight per model", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "modelpool_model_memory_bytes", "Memory held per loaded model", labels=["model"]
        )
        ttl = GaugeMetricFamily(
            "modelpool_model_ttl_remaining_seconds",
            "Seconds until a loaded model's TTL deadline (absent: never expires)",
            labels=["model"],
        )
        for r in records:
            m = r.entry.model_id
            for st in State:
                state.add_metric([m, st.value], 1.0 if r.state is st else 0.0)
            requests.add_metric([m], r.requests)
            in_flight.add_metric([m], r.total_in_flight)
            loaded = r.state in (State.WARMING, State.HOT, State.COOLING, State.UNLOADING)
            memory.add_metric([m], r.memory() * MB if loaded else 0.0)
            if r.state in (State.HOT, State.COOLING) and r.deadline is not None:
                ttl.add_metric([m], max(0.0, r.deadline - now))
        yield from (state, requests, in_flight, memory, ttl)
        transitions = CounterMetricFamily(
            "modelpool_transitions",
            "Lifecycle transitions by event and reason",
            labels=["event", "reason"],
        )
        for key, count in sorted(pool.counters.items()):
            event, reason = key.split(":", 1)
            transitions.add_metric([event, reason], count)
        yield transitions
        summary = pool.summary()
        yield GaugeMetricFamily(
            "modelpool_ports_available", "Worker ports not in use", value=summary["available_ports"]
        )
        yield GaugeMetricFamily(
            "modelpool_max_models", "max_concurrent_models", value=summary["max_concurrent_models"]
        )
        yield GaugeMetricFamily(
            "modelpool_memory_limit_bytes",
            "memory_limit_mb in bytes (0: no limit)",
            value=summary["memory_limit_mb"] * MB,
        )
        yield GaugeMetricFamily(
            "modelpool_memory_used_bytes",
            "Memory held by loaded models",
            value=summary["total_memory_mb"] * MB,
        )


def install(app: Flask, svc: PoolService) -> CollectorRegistry:
    """Serve ``/metrics`` from a registry of this app's own."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(svc))
    PrometheusMetrics(app, registry=registry, group_by="url_rule", path="/metrics")
    return registry
