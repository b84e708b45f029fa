"""Examples to a batch of tensors: the collator that pads them, the start-up probe batch, the copy to the device.

The collator pads with the same pad id the loss uses and marks excluded targets with -100, so the collator
and :mod:`utils.training.loss` share one definition of "ignored".
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..loss import IGNORE_INDEX


@dataclass
class PaddingCollator:
    """List of ``(Example, counts)`` -> dict of ``input_ids``, ``attention_mask``, ``labels`` tensors.

    Pads on the right to the longest example (rounded up to ``pad_to_multiple_of``) with the pad id.
    Which targets count is the loss's rule (it reads the attention mask); the collator only sets
    ``labels`` to -100 on padding and everywhere in an example whose ``counts`` is False (the
    duplicates a distributed sampler adds to even out shards).

    >>> from utils.training.data import Example
    >>> items = [(Example(torch.tensor([5, 6, 7])), True), (Example(torch.tensor([8, 9])), True)]
    >>> PaddingCollator(pad_token_id=0)(items)["labels"]
    tensor([[   5,    6,    7],
            [   8,    9, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items) -> dict[str, torch.Tensor]:
        width = max(len(example) for example, _ in items)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, (example, counts) in enumerate(items):
            n = len(example)
            input_ids[row, :n] = example.input_ids
            attention_mask[row, :n] = 1 if example.attention_mask is None else example.attention_mask
            if counts:
                labels[row, :n] = example.input_ids if example.labels is None else example.labels
        # Known here without a device read: rows are real then padding, unless an example kept a mask of its own.
        right_padded = all(example.attention_mask is None for example, _ in items)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "right_padded": right_padded}


def padded_probe(examples: list, collator: PaddingCollator) -> dict:
    """A batch that surely holds padding, for the start-up probes (mask-free, linear loss): the longest and the
    shortest example; when every example has one length, the second is cut to half of it. A probe without
    padding would pass a mask-free forward that later padded batches break."""
    longest, shortest = max(examples, key=len), min(examples, key=len)
    if len(shortest) == len(longest):
        shortest = shortest.truncated(max(2, len(shortest) // 2))
    if len(shortest) == len(longest):  # two-token examples only: padding cannot be made from them
        shortest = shortest.truncated(1)
    return collator([(longest, True), (shortest, True)])


def to_device(batch: Mapping, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory() if non_blocking else v).to(device, non_blocking=non_blocking)
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
