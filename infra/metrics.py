"""Prometheus metrics: one `Metrics` object per app, each with its own `CollectorRegistry`.

Nothing registers on prometheus-client's global registry, so tests and several apps in one
process never clash. Other components add their metrics to `metrics.registry`.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from loopservice.domain.events import EVENT_TYPES, Event
from loopservice.domain.signals import Signal

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

        self.sla_signals = Counter(
            "loop_sla_signals",
            "SLA warnings, breaches and retractions derived, by signal type, clock and priority.",
            ["type", "metric", "priority"],
            registry=self.registry,
        )
        self.signals = Counter(
            "loop_signals",
            "Signals derived by the processors, by signal type.",
            ["type"],
            registry=self.registry,
        )
        self.fold_repeats = Counter(
            "loop_fold_repeats",
            "Records the Kafka fold dropped because their event_id was already folded into the "
            "account (a repeated submission), by event type; a record read again after a crash "
            "counts again.",
            ["type"],
            registry=self.registry,
        )
        self.open_clocks = Gauge(
            "loop_sla_open_clocks",
            "SLA clocks currently running or paused.",
            registry=self.registry,
        )
        self.engine_position = Gauge(
            "loop_engine_position",
            "The next interactions-log position the engine will read.",
            registry=self.registry,
        )

    def count_signals(self, signals: Sequence[Signal]) -> None:
        """An engine sink: counts each derived signal once it is on the signal log."""
        for s in signals:
            self.signals.labels(s.type).inc()
            metric = getattr(s, "metric", None)
            if metric is not None:
                self.sla_signals.labels(s.type, metric, str(getattr(s, "priority", ""))).inc()

    def count_repeat(self, event: Event) -> None:
        """A fold's `on_repeat`: counts a repeated submission it dropped."""
        self.fold_repeats.labels(type_label(event.type)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
