"""Prometheus metrics: one `Metrics` object per app, each with its own `CollectorRegistry`.

Nothing registers on prometheus-client's global registry, so tests and several apps in one
process never clash. Other components add their metrics to `metrics.registry`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from loopservice.domain.events import EVENT_TYPES

_KNOWN_TYPES = frozenset(EVENT_TYPES)


def type_label(event_type: object) -> str:
    """Bounded label values: anything outside the vocabulary counts as `unknown`."""
    return event_type if isinstance(event_type, str) and event_type in _KNOWN_TYPES else "unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.events_ingested = Counter(
            "loop_ingest_events",
            "Events submitted for ingestion, by event type and result "
            "(accepted, duplicate, rejected, not_appended).",
            ["type", "result"],
            registry=self.registry,
        )
        self.ingest_requests = Counter(
            "loop_ingest_requests",
            "Ingest requests by transport and HTTP status.",
            ["transport", "status"],
            registry=self.registry,
        )
        self.ingest_latency = Histogram(
            "loop_ingest_latency_seconds",
            "Time from receiving an ingest request to its durable append (or refusal).",
            ["transport"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.ingest_batch_size = Histogram(
            "loop_ingest_batch_events",
            "Events per ingest request.",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000),
            registry=self.registry,
        )
        self.log_head = Gauge(
            "loop_log_head_position",
            "Last position written to the interactions log, as last seen by this process.",
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
