"""The one masked causal-LM loss of the package, and the one rule for which targets count.

Every loss, accuracy and perplexity number (training, validation, search, benchmarks)
comes from :func:`masked_lm_loss`; the collator, the target counter and the loss all take
"which positions are real" from :func:`real_token_mask` and "which targets count" from
:func:`shifted_targets`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class TokenSums:
    """Sums over target positions: add them up anywhere (steps, epochs, processes), divide once.

    Fields are tensors on the device inside a step (``loss_sum`` may carry a gradient) and plain
    floats once read back with :meth:`from_tensor`. ``positions`` counts the shifted target positions,
    real or padding, of the rows that have a real target, so ``positions - real_targets`` is the padding
    that was computed; rows without one (the non-counting repeats that even out processes and
    micro-batches) are neither padding nor sequences.
    """

    loss_sum: torch.Tensor | float = 0.0  # summed per-token cross-entropy over real targets (nats)
    real_targets: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0  # predictions whose target logit is the row's maximum (ties count)
    positions: torch.Tensor | float = 0.0
    sequences: torch.Tensor | float = 0.0  # rows with at least one real target

    def __add__(self, other: TokenSums) -> TokenSums:
        return TokenSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self, device=None) -> torch.Tensor:
        """The sums as one detached float64 tensor: one device read or one all-reduce for all of them."""
        values = [v.detach().double().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
                  for v in (getattr(self, f.name) for f in fields(self))]
        device = device or next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
        return torch.stack([v.to(device) for v in values])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> TokenSums:
        return cls(*values.tolist())

    @property
    def loss(self) -> float:
        """Mean cross-entropy per real target; 0 when nothing counted (never a division by zero)."""
        return float(self.loss_sum) / max(float(self.real_targets), 1.0)

    @property
    def accuracy(self) -> float:
        return float(self.correct) / max(float(self.real_targets), 1.0)

    @property
    def padded_positions(self) -> float:
        return float(self.positions) - float(self.real_targets)

    @property
    def pad_fraction(self) -> float:
        return self.padded_positions / max(float(self.positions), 1.0)


def real_token_mask(input_ids: torch.Tensor, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False) -> torch.Tensor:
    """Boolean ``(batch, seq)``: which positions hold real tokens.

    With an attention mask, the mask says so. Without one, only a *trailing* run of pad ids is
    padding: a pad id followed by real tokens is a real token. When the pad id is also the EOS id
    (GPT-2), the first token of that trailing run is the line's real EOS and stays real, as it
    would with a mask. ``[50, 23, 12, 0, 0]`` with pad 0 has 3 real tokens.
    """
    if attention_mask is not None:
        return attention_mask.bool()
    if pad_token_id is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    is_pad = input_ids == pad_token_id
    trailing_pad = is_pad.flip(-1).long().cummin(dim=-1).values.flip(-1).bool()
    if pad_is_eos:
        run_start = trailing_pad & ~torch.cat([trailing_pad.new_zeros(trailing_pad.shape[:-1] + (1,)), trailing_pad[..., :-1]], -1)
        trailing_pad &= ~run_start
    return ~trailing_pad


def shifted_targets(input_ids, labels=None, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False):
    """Targets for ``logits[:, :-1]``: label ``t+1`` for position ``t``, or IGNORE_INDEX.

    A target counts when its label is not -100, its own position is real and the position that
    predicts it is real (with left padding the first real token is predicted from padding: it
    does not count). Real positions come from :func:`real_token_mask`.
    """
    labels = input_ids if labels is None else labels
    real = real_token_mask(input_ids, attention_mask, pad_token_id, pad_is_eos)
    counted = real[:, 1:] & real[:, :-1]
    return torch.where(counted, labels[:, 1:], IGNORE_INDEX)


def count_real_targets(batch, pad_token_id, pad_is_eos: bool = False) -> torch.Tensor:
    """Real target count of a collated batch, without running the model."""
    targets = shifted_targets(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id, pad_is_eos)
    return (targets != IGNORE_INDEX).sum()


def masked_lm_loss(logits, input_ids, labels=None, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False) -> TokenSums:
    """Summed cross-entropy, real-target count, correct count and positions of one batch.

    ``logits`` is ``(batch, seq, vocab)`` aligned with ``input_ids``; the shift happens here.
    Excluded targets get ``ignore_index``: zero loss and exactly zero gradient. A batch with
    no real target returns zeros, never NaN (``reduction="sum"``).
    """
    shifted = shifted_targets(input_ids, labels, attention_mask, pad_token_id, pad_is_eos)
    # The last position predicts nothing: give it an ignored target instead of slicing the logits,
    # which would copy a (batch, seq, vocab) tensor every step.
    targets = torch.cat([shifted, shifted.new_full((shifted.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    # fp32 for the softmax: under bf16/fp16 autocast the log-sum-exp loses precision (float64 stays float64).
    exact_logits = flat_logits.float() if flat_logits.dtype in (torch.float16, torch.bfloat16) else flat_logits
    loss_sum = F.cross_entropy(exact_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    real = targets != IGNORE_INDEX
    counted_rows = (shifted != IGNORE_INDEX).any(dim=1)
    with torch.no_grad():
        # "The target's logit is the row's maximum": 8x faster than argmax on CPU (measured); a tie counts as correct.
        target_logit = flat_logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
        correct = ((target_logit >= flat_logits.amax(dim=-1)) & real).sum()
    return TokenSums(loss_sum=loss_sum, real_targets=real.sum(), correct=correct,
                     positions=counted_rows.sum() * shifted.shape[1], sequences=counted_rows.sum())
