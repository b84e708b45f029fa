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


# -- the endings a run reports, each with its cause and the way out ------------------------------------
def nothing_to_train(max_steps: int | None, n_epochs: int, global_step: int) -> Outcome:
    limit = f"max_steps={max_steps}" if max_steps is not None else f"n_epochs={n_epochs}"
    return Outcome(OutcomeKind.COMPLETED, (
        f"Nothing to train: the checkpoint already completed this run ({limit}, optimizer step {global_step}); the "
        "results are the checkpoint's. Raise max_steps or n_epochs to train further."), already_complete=True)


def non_finite_step(step: int, loss_sum: float, grad_norm: float, learning_rate: float, *, weight_decay: float,
                    max_grad_norm) -> Outcome:
    return Outcome(OutcomeKind.NON_FINITE, (
        f"Training stopped before optimizer step {step}: its loss ({loss_sum:g} summed) or gradient norm "
        f"({grad_norm:g}) is not finite, so the update was not applied; the model holds the weights of step "
        f"{step - 1}. Likely causes: a learning_rate too high (now {learning_rate:g}), weight_decay="
        f"{weight_decay:g}, clipping off (max_grad_norm={max_grad_norm}), or fp16 overflow (use precision='bf16')."))


def non_finite_validation(when: str, loss: float, best_epoch: int | None, best_val_loss: float) -> Outcome:
    best = (f"the best so far is epoch {best_epoch} ({best_val_loss:.4f})" if best_epoch
            else "no epoch had a finite validation loss")
    return Outcome(OutcomeKind.NON_FINITE, (
        f"Training stopped: the validation loss (excl. padding) at {when} is not finite ({loss}); {best}. The "
        "model's weights are finite but produce non-finite logits: lower learning_rate or use precision='fp32'."))


def early_stopped(state, patience: int | None, finished: bool) -> Outcome | None:
    """Early stopping once ``patience`` validations in a row did not improve on the best (``state``: TrainState),
    unless the run ends here anyway."""
    if not patience or state.epochs_without_improvement < patience or finished:
        return None
    return Outcome(OutcomeKind.STOPPED_EARLY,
                   f"early stopping: validation loss (excl. padding) did not improve for {patience} epoch(s); "
                   f"best {state.best_val_loss:.4f} at epoch {state.best_epoch}")


def out_of_memory_message(global_step: int, batch_size: int, accumulation: int) -> str:
    return (f"Out of GPU memory at optimizer step {global_step} with batch_size={batch_size}. Use a smaller "
            "batch_size and raise gradient_accumulation_steps to keep the effective batch (e.g. batch_size="
            f"{max(1, batch_size // 2)}, gradient_accumulation_steps={accumulation * 2}), or precision='bf16'.")
