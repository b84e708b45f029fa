"""The one masked causal-LM loss of the package.

Every loss, accuracy and perplexity number (training, validation, search, benchmarks)
comes from :func:`masked_lm_loss`, so there is exactly one definition of which
target positions count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossStats:
    """Sums over real (non-padding) target tokens; divide late, never by zero."""

    loss_sum: torch.Tensor  # differentiable sum of per-token cross-entropy
    real_targets: torch.Tensor  # number of target positions that count
    correct: torch.Tensor  # argmax predictions equal to the target
    target_positions: int  # all shifted positions of the batch, real or not (padding = this - real)

    def device_sums(self) -> torch.Tensor:
        """``[loss_sum, real_targets, correct]`` as one float64 tensor, detached, for accumulation on the device."""
        return torch.stack([self.loss_sum.detach().double(), self.real_targets.double(), self.correct.double()])


def shifted_targets(input_ids, labels=None, attention_mask=None, pad_token_id=None):
    """Targets for ``logits[:, :-1]``: label ``t+1`` for position ``t``, or IGNORE_INDEX.

    A target is excluded when its label is -100, when its attention_mask is 0, or, for
    batches without an attention mask, when its token equals ``pad_token_id``. The mask
    takes precedence so that a real EOS sharing the pad id (GPT-2) is still learned.
    """
    labels = input_ids if labels is None else labels
    targets = labels[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    elif pad_token_id is not None:
        targets[input_ids[:, 1:] == pad_token_id] = IGNORE_INDEX
    return targets


def count_real_targets(batch, pad_token_id) -> torch.Tensor:
    """Real target count of a collated batch, without running the model."""
    targets = shifted_targets(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)
    return (targets != IGNORE_INDEX).sum()


def masked_lm_loss(logits, input_ids, labels=None, attention_mask=None, pad_token_id=None) -> LossStats:
    """Summed cross-entropy, real-target count and correct count of one batch.

    ``logits`` is ``(batch, seq, vocab)`` aligned with ``input_ids``; the shift happens here.
    Excluded targets get ``ignore_index``: zero loss and exactly zero gradient. A batch with
    no real target returns zeros, never NaN (``reduction="sum"``).
    """
    shifted = shifted_targets(input_ids, labels, attention_mask, pad_token_id)
    # The last position predicts nothing: give it an ignored target instead of slicing the logits,
    # which would copy a (batch, seq, vocab) tensor every step.
    targets = torch.cat([shifted, shifted.new_full((shifted.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    # fp32 for the softmax: under bf16/fp16 autocast the log-sum-exp loses precision.
    loss_sum = F.cross_entropy(flat_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    real = targets != IGNORE_INDEX
    with torch.no_grad():
        correct = ((flat_logits.argmax(dim=-1) == targets) & real).sum()
    return LossStats(loss_sum=loss_sum, real_targets=real.sum(), correct=correct, target_positions=shifted.numel())
