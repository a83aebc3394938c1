"""The signal-deriving processors, declared once: the live engine, audit replay and what-if
all run the same topology, so a replay cannot drift from what the engine derives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal
from loopservice.streams.health_processor import HealthProcessor, SignalTap
from loopservice.streams.pattern_processors import (
    BreachClusterProcessor,
    CasePatternProcessor,
    FollowupProcessor,
    TopicSurgeProcessor,
)
from loopservice.streams.processor import Processor
from loopservice.streams.processors import (
    CachedRules,
    CaseStateProcessor,
    HandoffProcessor,
    SlaProcessor,
)
from loopservice.streams.rules import RulesBook


@dataclass(frozen=True)
class Topology:
    """The processors of one engine, with typed handles on those the read side queries.

    `by_account` processors keep state per account only, so under Kafka they run per account
    in the partition the account's key maps to; `tenant_wide` ones count across a tenant's
    accounts and need their input re-keyed by tenant there. `breach_clusters` counts the SLA
    processor's breaches across a tenant's accounts: the embedded engine taps them from the SLA
    processor, the Kafka engine reads them from the signals topic (`streams.kafka_clusters`).
    """

    cases: CaseStateProcessor
    sla: SlaProcessor
    handoffs: HandoffProcessor
    patterns: tuple[Processor, ...]
    health: HealthProcessor
    tenant_wide: tuple[Processor, ...] = ()
    breach_clusters: BreachClusterProcessor | None = None

    @property
    def by_account(self) -> list[Processor]:
        """In engine order: case state, SLA, handoffs, case patterns, follow-ups, health.

        The SLA processor is tapped so that the breaches it derives reach the health model
        in the same step (see `streams.health_processor`)."""
        return self._by_account(self.health.observe)

    def _by_account(self, listener: Callable[[list[Signal]], None]) -> list[Processor]:
        sla = SignalTap(self.sla, listener)
        return [self.cases, sla, self.handoffs, *self.patterns, self.health]

    @property
    def processors(self) -> list[Processor]:
        """Everything the embedded engine drives: `by_account`, then `tenant_wide`, then the
        breach clusters, to which the SLA tap hands its signals too."""
        clusters = self.breach_clusters
        if clusters is None:
            return [*self.by_account, *self.tenant_wide]

        def listener(signals: list[Signal]) -> None:
            self.health.observe(signals)
            clusters.observe(signals)

        return [*self._by_account(listener), *self.tenant_wide, clusters]


def build_topology(
    rules: RulesBook[Policy], *, sla_cache: dict[int, CachedRules] | None = None
) -> Topology:
    """Fresh processors sharing `rules`, into which `policy.published` events are folded.

    `sla_cache` lets many topologies (one per account under Kafka) share one memo per policy.
    """
    return Topology(
        cases=CaseStateProcessor(),
        sla=SlaProcessor(rules, cache=sla_cache),
        handoffs=HandoffProcessor(rules),
        patterns=(CasePatternProcessor(), FollowupProcessor()),
        health=HealthProcessor(rules),
        tenant_wide=(TopicSurgeProcessor(),),
        breach_clusters=BreachClusterProcessor(rules),
    )


def derive_processors(rules: RulesBook[Policy]) -> list[Processor]:
    return build_topology(rules).processors
