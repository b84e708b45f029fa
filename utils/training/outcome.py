"""How a training run ended: one typed value instead of flags and message texts.

``test_fine_tuning`` returns it as ``results["outcome"]`` (with the previous flat keys derived from
it), and the search reads ``outcome.kind`` to tell a pruned or non-finite trial from a finished one.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class OutcomeKind(str, enum.Enum):
    COMPLETED = "completed"  # every planned epoch ran
    STOPPED_EARLY = "stopped_early"  # early stopping (validation did not improve)
    INTERRUPTED = "interrupted"  # Ctrl-C (KeyboardInterrupt)
    NON_FINITE = "non_finite"  # a non-finite loss or gradient; the last finite weights are kept
    PRUNED = "pruned"  # a search trial stopped by its pruner


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    reason: str | None = None  # the sentence shown to the user; None when the run completed

    @property
    def stopped_early(self) -> bool:
        return self.kind is not OutcomeKind.COMPLETED

    def as_result_keys(self) -> dict:
        """The flat keys results have always carried, derived from the one outcome."""
        return {"outcome": self, "stopped_early": self.stopped_early, "stop_reason": self.reason,
                "interrupted": self.kind is OutcomeKind.INTERRUPTED, "non_finite": self.kind is OutcomeKind.NON_FINITE}


COMPLETED = Outcome(OutcomeKind.COMPLETED)


class StopTraining(Exception):
    """Raised at a step boundary to end training with the results so far; carries the outcome."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome
