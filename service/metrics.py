"""Prometheus metrics with ``prometheus_client``: the ingress's HTTP counters, each model
replica's scheduler metrics, and one ``/metrics`` text for the whole app.

Every process keeps its own registry (the ingress, each model replica). A replica renders
its registry with every heartbeat it sends to the hot-deployment registry actor
(:mod:`service.registry`), so the ingress sees every live replica of every model, not the
one a handle call happens to reach; :func:`exposition` merges them into one Prometheus
text, each replica's samples labelled ``replica``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from editing.engine.scheduler import SchedulerObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class IngressMetrics:
    """What the ingress counts: requests by endpoint and status, their latency, tokens and edits."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("steerserve_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("steerserve_request_seconds", "HTTP request latency by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("steerserve_generated_tokens", "Tokens generated for callers (baselines excluded).",
                                        ["model"], registry=self.registry)
        self.edits = Counter("steerserve_edits_applied", "Feature edits requested, by op.", ["model", "op"],
                             registry=self.registry)
        self.jobs = Gauge("steerserve_jobs", "Jobs by kind and state.", ["kind", "state"], registry=self.registry)

    def count_work(self, model: str, tokens: int, edits) -> None:
        self.generated_tokens.labels(model=model).inc(tokens)
        for edit in edits:
            self.edits.labels(model=model, op=edit.op).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class ReplicaMetrics(SchedulerObserver):
    """One model replica's scheduler: queue, rows, latencies, tokens, cancellations, rejections."""

    def __init__(self, model: str):
        registry = self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model": model}
        self.queue = Gauge("steerserve_queue_depth", "Requests waiting for admission.", ["model"],
                           registry=registry).labels(**labels)
        rows = Gauge("steerserve_running_rows", "Rows in the running batch, by phase (decode or prefill).",
                     ["model", "phase"], registry=registry)
        self.decoding, self.prefilling = rows.labels(phase="decode", **labels), rows.labels(phase="prefill", **labels)
        self.batch_rows = Histogram("steerserve_batch_size", "Rows in the running batch at each scheduler step.",
                                    ["model"], buckets=ROW_BUCKETS, registry=registry).labels(**labels)
        self.ttft = Histogram("steerserve_time_to_first_token_seconds", "From submission to a request's first token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self.itl = Histogram("steerserve_inter_token_latency_seconds", "Between two tokens of one row.", ["model"],
                             buckets=TOKEN_BUCKETS, registry=registry).labels(**labels)
        self.tokens = Counter("steerserve_engine_tokens", "Tokens the engine generated (baseline rows included).",
                              ["model"], registry=registry).labels(**labels)
        outcomes = Counter("steerserve_requests_finished", "Requests the scheduler finished, by outcome.",
                           ["model", "outcome"], registry=registry)
        self.outcomes = {name: outcomes.labels(outcome=name, **labels) for name in ("completed", "cancelled", "failed")}
        self.cancellations = Counter("steerserve_cancellations", "Requests cancelled (client gone) inside the scheduler.",
                                     ["model"], registry=registry).labels(**labels)
        self.rejections = Counter("steerserve_rejections", "Requests refused because the queue was full (503).",
                                  ["model"], registry=registry).labels(**labels)

    # SchedulerObserver (called in the engine's thread)
    def step(self, decoding: int, prefilling: int, waiting: int, tokens: int) -> None:
        self.decoding.set(decoding)
        self.prefilling.set(prefilling)
        self.queue.set(waiting)
        self.batch_rows.observe(decoding + prefilling)
        self.tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, handle) -> None:
        if handle.cancelled:
            self.cancellations.inc()
            self.outcomes["cancelled"].inc()
        else:
            self.outcomes["failed" if handle.error is not None else "completed"].inc()

    def rejected(self) -> None:
        self.rejections.inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class _Merged:
    """A collector yielding already-merged metric families (for one rendering)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


def exposition(own: str, replicas: dict[str, str]) -> str:
    """One Prometheus text: ``own`` (the ingress's) and each replica's text, the replica's
    samples labelled ``replica=<id>``; families of the same name merged."""
    merged: dict[str, Metric] = {}
    sources = [(None, own)] + sorted(replicas.items())
    for replica, text in sources:
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = dict(sample.labels) if replica is None else {**sample.labels, "replica": replica}
                target.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry).decode()
