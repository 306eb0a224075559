"""What the server tells operators: Prometheus metrics (prometheus-client) and JSON access logs.

GET /metrics answers Prometheus text when asked (`?format=prometheus`, or an Accept header naming
text/plain or openmetrics, as Prometheus sends) and the JSON summary otherwise. Live state (queue depth,
batch sizes, cache, requests by status) is read from the batcher, engine and counters at scrape time;
latencies, time to first token and generated tokens are observed as requests finish. Under
`blip2 serve --workers N` every metric is summed over the workers alive (prometheus-client's
multiprocess mode: each worker copies its live state into its files about once a second), except the
batch occupancy histogram, which is the answering worker's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

access_log = logging.getLogger("blip2.access")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode, read when it is imported

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Routes keep their own label; anything else is "other", so a scanner cannot grow the label set.
ROUTES = {"/", "/healthz", "/metrics", "/v1/models", "/v1/caption", "/v1/answer", "/v1/chat/completions",
          "/v1/match", "/v1/embeddings", "/docs", "/openapi.json"}


def wants_prometheus(query: str, accept: str) -> bool:
    return "format=prometheus" in query or "text/plain" in accept or "openmetrics" in accept


class Telemetry:
    """The server's Prometheus registry (one per app, never the global one) and its access log."""

    def __init__(self, batcher, engine, counters) -> None:
        self.batcher, self.engine, self.counters = batcher, engine, counters
        try:
            import prometheus_client as prom
        except ModuleNotFoundError:
            self.registry = self.shared = None  # JSON metrics and access logs still work
            return
        self.registry = prom.CollectorRegistry()
        self.latency = prom.Histogram("blip2_request_duration_seconds", "Time from request to response end",
                                      ["route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = prom.Histogram("blip2_time_to_first_token_seconds", "Time from submit to the first text "
                                   "the client receives (the whole answer when not streaming)",
                                   buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = prom.Counter("blip2_generated_tokens", "Tokens generated (rate() gives tokens/s)",
                                   registry=self.registry)
        self.registry.register(_LiveState(self))
        self.shared = _SharedLive(prom) if os.environ.get(MULTIPROC_ENV) else None

    # ---- the live state of several workers
    async def publish_live_state(self, every_s: float = 1.0) -> None:
        """Runs with the app under `--workers N`: keeps this worker's share of the live state in the
        multiprocess files (see `_SharedLive`); on the way out the worker's live gauges are dropped."""
        if self.shared is None:
            return
        from prometheus_client import multiprocess

        try:
            while True:
                self.shared.publish(self)
                await asyncio.sleep(every_s)
        finally:
            multiprocess.mark_process_dead(os.getpid())

    # ---- observations
    def request_done(self, method: str, path: str, status: int, seconds: float, client: str) -> None:
        route = path if path in ROUTES else "other"
        if self.registry is not None:
            self.latency.labels(route, str(status or "none")).observe(seconds)
        access_log.info(json.dumps({"ts": round(time.time(), 3), "method": method, "path": route, "status": status,
                                    "ms": round(seconds * 1000, 2), "client": client}))

    def first_token(self, seconds: float) -> None:
        if self.registry is not None:
            self.ttft.observe(seconds)

    def generated(self, results) -> None:
        """Counts the tokens of a batch's GenerateResults (errors and other tasks count nothing)."""
        if self.registry is not None:
            self.tokens.inc(sum(getattr(r, "completion_tokens", 0) for r in results
                                if not isinstance(r, BaseException)))

    def prometheus_text(self) -> tuple[bytes, str]:
        import prometheus_client as prom

        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            # Several workers (`--workers N`): every metric summed over the workers alive, from the files
            # prometheus-client keeps in that folder; the batch occupancy histogram is this worker's.
            from prometheus_client import multiprocess

            if self.shared is not None:
                self.shared.publish(self)
            forget_dead_workers(os.environ[MULTIPROC_ENV])
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(_LiveState(self, occupancy_only=True))
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


def live_metrics(t: Telemetry) -> list[tuple[str, str, str, tuple[str, ...], dict[tuple[str, ...], float]]]:
    """(kind, name, help, label names, {label values: value}) of the live state, read now from the
    batcher's, cache's and guard's own counters; kind is "gauge" or "counter"."""
    batch, cache = t.batcher.snapshot(), t.engine.cache.stats()
    one = lambda kind, name, doc, value: (kind, name, doc, (), {(): value})  # noqa: E731
    out = [one("gauge", "blip2_queue_depth", "Requests waiting for a batch", batch["queued"]),
           one("gauge", "blip2_batch_running", "Requests in the batch now running", batch["running"]),
           one("gauge", "blip2_batch_capacity", "Most requests per batch", batch["max_batch"])]
    if "kv_slots" in batch:  # continuous batching: the KV cache's rows (each one running request)
        out += [one("gauge", "blip2_kv_slots", "Rows of the KV cache (most requests decoding at once)", batch["kv_slots"]),
                one("gauge", "blip2_kv_slots_used", "KV cache rows holding a running request", batch["kv_slots_used"]),
                one("gauge", "blip2_kv_cache_bytes", "Memory of the KV cache", batch["kv_cache_bytes"])]
    out += [one("counter", "blip2_rejected", "Requests refused with 503 (queue full)", batch["rejected"]),
            one("counter", "blip2_timeouts", "Requests abandoned with 504", batch["timeouts"]),
            one("counter", "blip2_busy_seconds", "Seconds the model thread ran batches", batch["busy_seconds"])]
    out += [one("counter", f"blip2_image_cache_{name}", f"Image-feature cache {name} (hit rate: hits / (hits + misses))",
                cache[name]) for name in ("hits", "misses")]
    out += [one("gauge", "blip2_image_cache_entries", "Images whose features are cached", cache["entries"]),
            ("counter", "blip2_responses", "Responses by HTTP status", ("status",),
             {(str(status),): count for status, count in sorted(t.counters.by_status.items())}),
            one("gauge", "blip2_requests_in_flight", "Requests being handled", t.counters.in_flight)]
    return out


class _LiveState:
    """A collector read at scrape time: the live state (`live_metrics`) and the batch occupancy."""

    def __init__(self, telemetry: Telemetry, occupancy_only: bool = False) -> None:
        self.t, self.occupancy_only = telemetry, occupancy_only

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if not self.occupancy_only:
            for kind, name, doc, label_names, values in live_metrics(self.t):
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=label_names)
                for label_values, value in values.items():
                    family.add_metric(list(label_values), value)
                yield family
        yield _occupancy(self.t.batcher.stats.sizes, self.t.batcher.snapshot()["max_batch"])


class _SharedLive:
    """Under `--workers N`: this worker's live state copied into prometheus-client's multiprocess files
    (gauges as "livesum", counters by their increase), so a scrape that any worker answers sums the
    live state of every worker alive. `publish` runs about once a second and before each scrape."""

    def __init__(self, prom) -> None:
        self.prom, self.metrics, self.published = prom, {}, {}
        self.registry = prom.CollectorRegistry()  # holds the metric objects; the values live in the files

    def publish(self, t: Telemetry) -> None:
        for kind, name, doc, label_names, values in live_metrics(t):
            metric = self.metrics.get(name)
            if metric is None:
                if kind == "gauge":
                    metric = self.prom.Gauge(name, doc, label_names, multiprocess_mode="livesum", registry=self.registry)
                else:
                    metric = self.prom.Counter(name, doc, label_names, registry=self.registry)
                self.metrics[name] = metric
            for label_values, value in values.items():
                child = metric.labels(*label_values) if label_names else metric
                if kind == "gauge":
                    child.set(value)
                else:  # the batcher's counters only grow: add what they grew by since the last publish
                    grew = value - self.published.get((name, label_values), 0)
                    if grew > 0:
                        child.inc(grew)
                    self.published[(name, label_values)] = value


def forget_dead_workers(folder: str) -> None:
    """Drops the live gauges of workers that are gone (a crashed worker cannot do it itself; uvicorn
    starts another in its place), so "livesum" counts only the workers alive."""
    from prometheus_client import multiprocess

    pids = {name.rsplit("_", 1)[1].split(".")[0] for name in os.listdir(folder)
            if name.startswith("gauge_live") and name.endswith(".db")}
    for pid in pids:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(int(pid), folder)
        except (PermissionError, ValueError):
            pass  # alive under another user, or not a worker's file


def _occupancy(sizes, capacity: int):
    """The batch sizes seen, as a histogram of occupancy (size / capacity) in tenths."""
    from prometheus_client.core import HistogramMetricFamily

    capacity = max(1, capacity)
    bounds = [round(b / 10, 1) for b in range(1, 11)]
    buckets = [(str(b), sum(n for size, n in sizes.items() if size / capacity <= b + 1e-9)) for b in bounds]
    total = sum(sizes.values())
    buckets.append(("+Inf", total))
    return HistogramMetricFamily("blip2_batch_occupancy", "Batch size over the batch capacity, per batch "
                                 "(continuous batching: per decode step)",
                                 buckets=buckets, sum_value=sum(size / capacity * n for size, n in sizes.items()))
