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
    reason: str | None = None  # the sentence shown to the user; None when the run completed as it went
    already_complete: bool = False  # a resume found nothing left to train (the checkpoint had completed the run)

    @property
    def completed(self) -> bool:
        """Every planned epoch (or ``max_steps``) ran."""
        return self.kind is OutcomeKind.COMPLETED

    @property
    def ended_early(self) -> bool:
        """The run ended before its planned end, for any reason (early stopping, Ctrl-C, non-finite, pruned)."""
        return not self.completed

    @property
    def stopped_by_early_stopping(self) -> bool:
        """Early stopping ended it (``early_stopping_patience`` epochs without improvement)."""
        return self.kind is OutcomeKind.STOPPED_EARLY

    @property
    def stopped_early(self) -> bool:
        """The previous name of ``ended_early`` (any end before the planned one, Ctrl-C included), kept for
        callers of ``results["stopped_early"]``; read ``stopped_by_early_stopping`` for early stopping itself."""
        return self.ended_early

    def as_result_keys(self) -> dict:
        """The flat keys results have always carried, derived from the one outcome, and ``completed``."""
        return {"outcome": self, "completed": self.completed, "stopped_early": self.ended_early,
                "stop_reason": None if self.completed else self.reason, "already_complete": self.already_complete,
                "interrupted": self.kind is OutcomeKind.INTERRUPTED, "non_finite": self.kind is OutcomeKind.NON_FINITE}


COMPLETED = Outcome(OutcomeKind.COMPLETED)


class StopTraining(Exception):
    """Raised at a step boundary to end training with the results so far; carries the outcome."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome
