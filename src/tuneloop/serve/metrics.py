"""Prometheus metrics of the server, per model and tenant (rates such as tokens/s are computed
by Prometheus from the counters: `rate(tuneloop_completion_tokens_total[1m])`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric


class Metrics:
    """One metrics registry per application (tests start several apps in one process)."""

    def __init__(self, router):
        self.registry = CollectorRegistry()
        self.router = router
        # Registered first, so the engine gauges are fresh when they are collected after it.
        self.registry.register(_OnCollect(self._refresh))
        labels = ["model", "tenant"]
        self.requests = Counter("tuneloop_requests", "Inference requests by outcome",
                                [*labels, "status"], registry=self.registry)
        self.latency = Histogram("tuneloop_request_latency_seconds", "Time to the last token",
                                 labels, registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.first_token = Histogram("tuneloop_time_to_first_token_seconds", "Time to the first token",
                                     labels, registry=self.registry,
                                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.prompt_tokens = Counter("tuneloop_prompt_tokens", "Prompt tokens processed", labels,
                                     registry=self.registry)
        self.completion_tokens = Counter("tuneloop_completion_tokens", "Tokens generated", labels,
                                         registry=self.registry)
        self.queue = Gauge("tuneloop_queue_depth", "Requests waiting for a batch slot", ["engine"],
                      registry=self.registry)
        self.running = Gauge("tuneloop_running_sequences", "Sequences being decoded", ["engine"],
                        registry=self.registry)
        self.adapters = Gauge("tuneloop_resident_adapters", "Adapters loaded on an engine", ["engine"],
                         registry=self.registry)

    def _refresh(self) -> None:
        for key, engine in list(self.router.engines.items()):
            status = engine.status()
            self.queue.labels(key).set(status["queued"])
            self.running.labels(key).set(status["running"])
            self.adapters.labels(key).set(len(status["adapters"]))


class _OnCollect:
    """A collector with no metrics of its own that refreshes the gauges before a scrape."""

    def __init__(self, fn):
        self.fn = fn

    def collect(self):
        self.fn()
        return []


class OneTenant:
    """A view of a metrics registry with only one tenant's series (and those of no tenant,
    such as the engines' queue depth): what a tenant's key may read."""

    def __init__(self, registry: CollectorRegistry, tenant: str):
        self.registry, self.tenant = registry, tenant

    def collect(self):
        for family in self.registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples
                            if s.labels.get("tenant", self.tenant) == self.tenant]
            yield kept
