"""From whatever the user passes to padded batches: examples, collator, batch order.

The collator pads with the same pad id the loss uses and marks excluded targets with -100,
so the collator and :mod:`utils.training.loss` share one definition of "ignored".
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .loss import IGNORE_INDEX

MEGA_BATCH_FACTOR = 50  # batches per length-sorted mega-batch (as in HF's LengthGroupedSampler)


@dataclass
class Example:
    """One sequence; ``attention_mask``/``labels`` are None when the user gave none."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()

    def real_mask(self, pad_token_id: int) -> torch.Tensor:
        """1 where the position is real: the given mask, else ``token != pad`` (no mask given)."""
        if self.attention_mask is not None:
            return self.attention_mask
        return (self.input_ids != pad_token_id).long()

    def target_labels(self, pad_token_id: int) -> torch.Tensor:
        labels = self.input_ids if self.labels is None else self.labels
        return torch.where(self.real_mask(pad_token_id).bool(), labels, IGNORE_INDEX)

    def real_targets(self, pad_token_id: int) -> int:
        return int((self.target_labels(pad_token_id)[1:] != IGNORE_INDEX).sum())


def _as_long_1d(value, what: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]  # a tokenizer's return_tensors="pt" output for one text
    if tensor.dim() != 1:
        raise ValueError(
            f"Example {index}: {what} has shape {tuple(tensor.shape)}; expected a 1-D sequence of token ids. "
            "Pass one sequence per example (a list of lists, or a list of dicts)."
        )
    if tensor.is_floating_point():
        raise TypeError(f"Example {index}: {what} holds floats ({tensor.dtype}); token ids must be integers.")
    return tensor.long()


def _to_example(item, index: int) -> Example:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"Example {index} is a dict without 'input_ids' (keys: {sorted(item)}). Add the token ids under 'input_ids'.")
        ids = _as_long_1d(item["input_ids"], "input_ids", index)
        fields = {}
        for key in ("attention_mask", "labels"):
            if item.get(key) is None:
                continue
            value = _as_long_1d(item[key], key, index)
            if value.shape != ids.shape:
                raise ValueError(
                    f"Example {index}: {key} has shape {tuple(value.shape)} but input_ids has {tuple(ids.shape)}. "
                    f"Give {key} one entry per input token (labels are aligned with input_ids; the loss shifts them)."
                )
            fields[key] = value
        return Example(ids, **fields)
    if isinstance(item, (torch.Tensor, Sequence)) and not isinstance(item, (str, bytes)):
        return Example(_as_long_1d(item, "the sequence", index))
    raise TypeError(
        f"Example {index} is a {type(item).__name__}. Expected a sequence of token ids (list or 1-D tensor) "
        "or a dict with 'input_ids' (and optional 'attention_mask', 'labels'). Tokenize text first."
    )


def _strip_trailing_padding(example: Example, pad_token_id: int) -> Example:
    """Drop right padding a user applied already: it changes no real logit of a causal model, only costs compute."""
    real = example.real_mask(pad_token_id).nonzero()
    end = int(real[-1]) + 1 if real.numel() else 0
    if end == len(example):
        return example
    cut = lambda t: None if t is None else t[:end]  # noqa: E731
    return Example(example.input_ids[:end], cut(example.attention_mask), cut(example.labels))


def to_examples(data, pad_token_id: int, what: str = "training data") -> list[Example]:
    """Examples from a list/Dataset of sequences or dicts; examples with no real target are skipped (warned)."""
    if isinstance(data, Mapping) and "input_ids" in data:  # columns, e.g. a tokenizer's output for many texts
        columns = {key: data[key] for key in ("input_ids", "attention_mask", "labels") if data.get(key) is not None}
        data = [{key: column[i] for key, column in columns.items()} for i in range(len(columns["input_ids"]))]
    try:
        items = [data[i] for i in range(len(data))]
    except TypeError as error:
        raise TypeError(
            f"The {what} is a {type(data).__name__}; expected a list of token sequences, a list of dicts with "
            "'input_ids', a torch Dataset of those, or a DataLoader yielding dict batches."
        ) from error
    if not items:
        raise ValueError(f"The {what} is empty. Pass at least one tokenized sequence.")
    examples = [_strip_trailing_padding(_to_example(item, i), pad_token_id) for i, item in enumerate(items)]
    kept = [ex for ex in examples if ex.real_targets(pad_token_id) > 0]
    if not kept:
        raise ValueError(
            f"No example of the {what} has a real target token (each needs at least 2 non-padding tokens, "
            f"pad_token_id={pad_token_id}). Check the pad id and that the data is not all padding."
        )
    if len(kept) < len(examples):
        warnings.warn(
            f"Skipped {len(examples) - len(kept)} of {len(examples)} examples of the {what}: they have no real "
            "target token (all padding, masked, or a single token).",
            UserWarning,
            stacklevel=3,
        )
    return kept


def split_train_val(examples: list[Example], val_fraction: float, seed: int):
    """Seeded random hold-out; both parts keep the original order (``shuffle=False`` stays meaningful)."""
    if len(examples) < 2:
        raise ValueError("Need at least 2 training examples to hold out a validation set; pass val_data explicitly.")
    n_val = max(1, int(round(len(examples) * val_fraction)))
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = set(perm[:n_val])
    train = [ex for i, ex in enumerate(examples) if i not in val_ids]
    val = [ex for i, ex in enumerate(examples) if i in val_ids]
    return train, val


def synthetic_sequences(vocab_size: int, pad_token_id: int, n: int = 256, min_len: int = 8, max_len: int = 64, seed: int = 0):
    """Learnable variable-length sequences (arithmetic progressions mod vocab) that never use the pad id."""
    g = torch.Generator().manual_seed(seed)
    usable = vocab_size - 1
    sequences = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start, step = (int(v) for v in torch.randint(0, usable, (2,), generator=g))
        values = (start + step % 7 * torch.arange(length) + torch.arange(length)) % usable
        sequences.append(values + (values >= pad_token_id).long())  # skip the pad id
    return sequences


@dataclass
class PaddingCollator:
    """List of ``(Example, counts)`` -> dict of ``input_ids``, ``attention_mask``, ``labels`` tensors.

    Pads on the right to the longest example (rounded up to ``pad_to_multiple_of``) with the pad id.
    ``labels`` are -100 wherever the attention mask is 0, and everywhere in an example whose
    ``counts`` is False (the duplicates a distributed sampler adds to even out shards).

    >>> PaddingCollator(pad_token_id=0)([(Example(torch.tensor([5, 6, 7])), True), (Example(torch.tensor([8, 9])), True)])["labels"]
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
            attention_mask[row, :n] = example.real_mask(self.pad_token_id)
            if counts:
                labels[row, :n] = example.target_labels(self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _length_grouped(order: list[int], lengths: list[int], step_size: int, generator, shuffle_batches: bool) -> list[int]:
    """Mega-batches of many optimizer steps, sorted by length inside, so each step holds similar lengths.

    Grouping works on whole optimizer steps (``batch_size * accumulation * processes`` examples), so
    how a step is split into micro-batches and processes does not change which examples it holds.
    """
    mega = step_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + step_size] for i in range(0, len(chunk), step_size)]
    # Only the very last step can be short; it stays last so shards stay aligned to steps.
    full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < step_size else (batches, [])
    if shuffle_batches:
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in full + tail for i in batch]


def epoch_order(lengths, step_size, *, shuffle, group_by_length, seed, epoch) -> list[int]:
    """Global example order of one epoch: a pure function of the settings, so a resume can replay it."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    if group_by_length:
        order = _length_grouped(order, lengths, step_size, generator, shuffle_batches=shuffle)
    return order


def shard_batches(order: list[int], batch_size: int, world_size: int = 1, rank: int = 0):
    """This rank's batches of ``(example index, counts)``, sharded exactly as DistributedSampler does.

    Rank ``r`` takes global positions ``r, r+W, ...``; the sampler repeats the first positions to
    even out shards, and those repeats are marked ``counts=False`` so no example counts twice.
    """
    positions = list(DistributedSampler(order, num_replicas=world_size, rank=rank, shuffle=False))
    slots = [(order[p], rank + k * world_size < len(order)) for k, p in enumerate(positions)]
    return [slots[i:i + batch_size] for i in range(0, len(slots), batch_size)]


class ExampleBatches:
    """Examples held in memory: planned (shuffled, grouped, sharded) batches, collated on the fly."""

    plannable = True

    def __init__(self, examples: list[Example], collator: PaddingCollator):
        self.examples = examples
        self.collator = collator
        self.lengths = [len(ex) for ex in examples]

    def plan(self, batch_size, *, shuffle, group_by_length, seed, epoch, accumulation=1, world_size=1, rank=0):
        """This rank's micro-batches of one epoch, in order; consecutive ``accumulation`` of them form a step."""
        order = epoch_order(self.lengths, batch_size * accumulation * world_size, shuffle=shuffle,
                            group_by_length=group_by_length, seed=seed, epoch=epoch)
        return shard_batches(order, batch_size, world_size, rank)

    def eval_plan(self, batch_size, world_size=1, rank=0):
        """Validation order does not change token-weighted sums, so sort by length: least padding."""
        order = sorted(range(len(self.examples)), key=lambda i: -self.lengths[i])
        return shard_batches(order, batch_size, world_size, rank)

    def collate(self, planned_batch):
        return self.collator([(self.examples[i], counts) for i, counts in planned_batch])


class LoaderBatches:
    """A user's DataLoader of dict batches, used as given (its own order and padding)."""

    plannable = False

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def plan(self, batch_size, **_):
        return list(self.loader)

    eval_plan = plan

    @staticmethod
    def collate(batch):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("A DataLoader passed as data must yield dict batches with 'input_ids' (and optional "
                            "'attention_mask', 'labels'). Pass a list of sequences instead to let the package pad them.")
        return dict(batch)


def batch_source(data, pad_token_id: int, pad_to_multiple_of: int | None = None, what: str = "training data"):
    if isinstance(data, DataLoader):
        return LoaderBatches(data)
    return ExampleBatches(to_examples(data, pad_token_id, what), PaddingCollator(pad_token_id, pad_to_multiple_of))


def to_device(batch: Mapping, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory() if non_blocking else v).to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
