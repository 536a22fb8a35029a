"""A small Prometheus text-format registry: counters and histograms with labels.

Each process (the ingress, each model replica) keeps its own; ``GET /metrics`` renders the
ingress's and appends the model replicas' (batch sizes are counted where batches form).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                       for k, v in sorted(labels.items()))
    return "{" + escaped + "}"


class Registry:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[tuple, list]] = defaultdict(dict)
        self._help: dict[str, tuple[str, str]] = {}
        self._buckets: dict[str, tuple] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets: tuple) -> None:
        self._help[name] = ("histogram", help)
        self._buckets[name] = buckets

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._counters[name][key] = self._counters[name].get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self._buckets[name]
        with self._lock:
            state = self._histograms[name].setdefault(key, [[0] * len(buckets), 0.0, 0])
            index = bisect.bisect_left(buckets, value)
            if index < len(buckets):
                state[0][index] += 1
            state[1] += value
            state[2] += 1

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help) in sorted(self._help.items()):
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, value in sorted(self._counters[name].items()):
                        lines.append(f"{name}{_labels(dict(key))} {value:g}")
                    continue
                buckets = self._buckets[name]
                for key, (counts, total, count) in sorted(self._histograms[name].items()):
                    labels, running = dict(key), 0
                    for bound, bucket_count in zip(buckets, counts):
                        running += bucket_count
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {running}")
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {count}")
                    lines.append(f"{name}_sum{_labels(labels)} {total:g}")
                    lines.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"


def ingress_registry() -> Registry:
    registry = Registry()
    registry.counter("steerserve_requests_total", "HTTP requests by endpoint and status.")
    registry.histogram("steerserve_request_seconds", "HTTP request latency by endpoint.", LATENCY_BUCKETS)
    registry.counter("steerserve_generated_tokens_total", "Tokens generated for callers (baselines excluded).")
    registry.counter("steerserve_edits_applied_total", "Feature edits requested, by op.")
    return registry


def model_registry() -> Registry:
    registry = Registry()
    registry.histogram("steerserve_batch_size", "Requests in each engine batch, by model.", BATCH_BUCKETS)
    registry.counter("steerserve_batches_total", "Engine batches run, by model.")
    return registry
