"""The registry of sweeper rules: the one place a new rule is added (its own module holds the rest)."""

from __future__ import annotations

from shared.sweeper.rules import ingesting, lease_overrun, progress_missed, running
from shared.sweeper.rules.base import Rule

# Order breaks ties between equally severe findings of one job: the first rule's kind is kept.
RULES: tuple[Rule, ...] = (
    running.RULE,
    ingesting.RULE,
    lease_overrun.RULE,
    progress_missed.RULE,
)


def rule_for_kind(kind: str | None) -> Rule | None:
    return next((r for r in RULES if kind in r.kinds), None)
