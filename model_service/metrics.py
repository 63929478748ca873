"""A worker's own ``/metrics``: requests, tokens, latency, time to first token, in flight.

Durations of streamed answers are timed here, from the request to the closing of the stream,
because an exporter's request timer stops when the view returns, before the body is sent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _StateCollector(Collector):
    def __init__(self, model: str, ready: Callable[[], bool], in_flight: Callable[[], int]) -> None:
        self.model, self.ready, self.in_flight = model, ready, in_flight

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "modelpool_worker_ready", "1 once the model is loaded", labels=["model"]
        )
        g.add_metric([self.model], 1.0 if self.ready() else 0.0)
        yield g
        f = GaugeMetricFamily(
            "modelpool_worker_in_flight_requests", "Requests being served", labels=["model"]
        )
        f.add_metric([self.model], float(self.in_flight()))
        yield f


class WorkerMetrics:
    """The metric objects of one worker, in a registry of its own."""

    def __init__(self, model: str, ready: Callable[[], bool], in_flight: Callable[[], int]) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(model, ready, in_flight))
        self.requests = Counter(
            "modelpool_worker_requests",
            "Requests answered",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelpool_worker_request_duration_seconds",
            "From the request to the end of its answer (streams included)",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "modelpool_worker_time_to_first_token_seconds",
            "From the request to the first streamed chunk with content",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "modelpool_worker_tokens", "Tokens processed", ["model", "kind"], registry=self.registry
        )

    def finished(
        self, endpoint: str, status: int | str, started: float, usage: dict[str, Any] | None
    ) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()
        self.duration.labels(self.model, endpoint).observe(time.perf_counter() - started)
        if usage:
            for kind in ("prompt", "completion"):
                n = usage.get(f"{kind}_tokens")
                if isinstance(n, int) and n > 0:
                    self.tokens.labels(self.model, kind).inc(n)

    def stream(self, endpoint: str, started: float, chunks: Iterator[bytes]) -> TimedStream:
        return TimedStream(self, endpoint, started, chunks)


#: A non-empty content or text piece in an SSE event, as JSON encoders write it.
_PIECE: Final = re.compile(rb'"(?:content|text)": ?"(?!")')


class TimedStream:
    """Passes SSE chunks through, noting the first token, the usage and when it ends."""

    def __init__(
        self, metrics: WorkerMetrics, endpoint: str, started: float, chunks: Iterator[bytes]
    ) -> None:
        self.metrics, self.endpoint, self.started = metrics, endpoint, started
        self.chunks = chunks
        self.first = False
        self.completed = False
        self.content_chunks = 0
        self.usage: dict[str, Any] | None = None
        self.closed = False

    def __iter__(self) -> TimedStream:
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self.chunks)
        except StopIteration:
            self.completed = True
            raise
        self.note(chunk)
        return chunk

    def note(self, chunk: bytes) -> None:
        """Note the first token and the usage without decoding every event: only events that
        carry ``usage`` (the backend's count, at the end) and those before the first token are
        parsed; later content events are counted by a byte search."""
        for event in chunk.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            if self.first and b'"usage"' not in event:
                self.content_chunks += len(_PIECE.findall(event))
                continue
            try:
                data = json.loads(event[6:])
            except ValueError:
                continue
            if isinstance(data.get("usage"), dict):
                self.usage = data["usage"]
            for choice in data.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or choice.get("text")
                if piece:
                    self.content_chunks += 1
                    if not self.first:
                        self.first = True
                        self.metrics.ttft.labels(self.metrics.model, self.endpoint).observe(
                            time.perf_counter() - self.started
                        )

    def end(self, completed: bool) -> None:
        """The end of a stream relayed without this iterator (see model_service/worker_asgi.py)."""
        self.completed = completed
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.chunks, "close", None)
            if close is not None:
                close()
        finally:
            usage = self.usage or {"completion_tokens": self.content_chunks}
            status = 200 if self.completed else "cancelled"
            self.metrics.finished(self.endpoint, status, self.started, usage)
