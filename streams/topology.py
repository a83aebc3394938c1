"""The signal-deriving processors, declared once: the live engine, audit replay and what-if
all run the same topology, so a replay cannot drift from what the engine derives."""

from __future__ import annotations

from dataclasses import dataclass

from loopservice.domain.policy import Policy
from loopservice.streams.pattern_processors import (
    CasePatternProcessor,
    FollowupProcessor,
    TopicSurgeProcessor,
)
from loopservice.streams.processor import Processor
from loopservice.streams.processors import CaseStateProcessor, HandoffProcessor, SlaProcessor
from loopservice.streams.rules import RulesBook


@dataclass(frozen=True)
class Topology:
    """The processors of one engine, with typed handles on those the read side queries."""

    cases: CaseStateProcessor
    sla: SlaProcessor
    handoffs: HandoffProcessor
    patterns: tuple[Processor, ...]

    @property
    def processors(self) -> list[Processor]:
        """In engine order: case state, SLA, handoffs, patterns, surges, follow-ups."""
        return [self.cases, self.sla, self.handoffs, *self.patterns]


def build_topology(rules: RulesBook[Policy]) -> Topology:
    """Fresh processors sharing `rules`, into which `policy.published` events are folded."""
    return Topology(
        cases=CaseStateProcessor(),
        sla=SlaProcessor(rules),
        handoffs=HandoffProcessor(rules),
        patterns=(CasePatternProcessor(), TopicSurgeProcessor(), FollowupProcessor()),
    )


def derive_processors(rules: RulesBook[Policy]) -> list[Processor]:
    return build_topology(rules).processors
