"""The signal-deriving processors, declared once: the live engine, audit replay and what-if
all run the same topology, so a replay cannot drift from what the engine derives."""

from __future__ import annotations

from loopservice.domain.policy import Policy
from loopservice.streams.pattern_processors import (
    CasePatternProcessor,
    FollowupProcessor,
    TopicSurgeProcessor,
)
from loopservice.streams.processor import Processor
from loopservice.streams.processors import CaseStateProcessor, HandoffProcessor, SlaProcessor
from loopservice.streams.rules import RulesBook


def derive_processors(rules: RulesBook[Policy]) -> list[Processor]:
    """Fresh processors, in engine order: case state, SLA, handoffs, patterns, surges,
    follow-ups. They share `rules`, into which `policy.published` events are folded."""
    return [
        CaseStateProcessor(),
        SlaProcessor(rules),
        HandoffProcessor(rules),
        CasePatternProcessor(),
        TopicSurgeProcessor(),
        FollowupProcessor(),
    ]
