"""Prometheus metrics of one ``veil serve`` app (prometheus-client, a registry per app).

    veil_requests_total{route,method,status}       counter
    veil_request_seconds{route}                    histogram, until the last byte (a preview stream's whole life)
    veil_batch_rows / veil_batch_jobs              histograms: candidates and requests per ONNX Runtime batch
    veil_batch_seconds                             histogram: one batch's walk down the grid
    veil_queue_depth                               gauge: requests waiting for the worker
    veil_overloaded_total                          counter: requests shed with 503
    veil_releases_total{outcome}                   counter: released | refused (this replica)

``MetricsMiddleware`` is plain ASGI, so it also times streamed responses to their end; the route label is
the matched route's template (``/v1/sessions/{session}``), never the raw path, which holds capabilities.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics", "MetricsMiddleware", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("veil_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram("veil_request_seconds", "request latency to the last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("veil_batch_rows", "candidates per ONNX Runtime batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_jobs = Histogram("veil_batch_jobs", "requests per ONNX Runtime batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("veil_batch_seconds", "one batch", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("veil_queue_depth", "requests waiting for the worker", registry=r)
        self.overloaded = Counter("veil_overloaded", "requests shed with 503", registry=r)
        self.releases = Counter("veil_releases", "accepted releases by outcome", ["outcome"], registry=r)

    def observe_batch(self, rows: int, jobs: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_jobs.observe(jobs)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
