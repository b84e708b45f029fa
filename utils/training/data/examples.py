"""Rows: one example read from whatever the user passes, cut to its real span (the pad rule applied once).

Batches are made of examples by :mod:`collate`; the checks on ids and lengths are :mod:`example_checks`'.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .example_checks import no_real_target_error, warn_skipped_without_target
from ..loss import IGNORE_INDEX, real_token_mask, shifted_targets
from ..warn import caller_stacklevel


@dataclass
class Example:
    """One sequence, already cut to its real span; ``attention_mask`` marks its real positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # None: every position is real
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.numel()

    def real_targets(self) -> int:
        """Targets that count; the pad rule was applied when the example was cut, so only the mask is read."""
        row = lambda t: None if t is None else t[None]  # noqa: E731
        targets = shifted_targets(self.input_ids[None], row(self.labels), row(self.attention_mask))
        return int((targets != IGNORE_INDEX).sum())

    def truncated(self, length: int) -> "Example":
        cut = lambda t: None if t is None else t[:length]  # noqa: E731
        return Example(self.input_ids[:length], cut(self.attention_mask), cut(self.labels))


def _as_long_1d(value, what: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]  # a tokenizer's return_tensors="pt" output for one text
    if tensor.dim() != 1:
        raise ValueError(
            f"Example {index}: {what} has shape {tuple(tensor.shape)}; expected a 1-D sequence of token ids. "
            "Pass one sequence per example (a list of lists, or a list of dicts)."
        )
    if tensor.numel() == 0:
        raise ValueError(f"Example {index}: {what} is empty. Remove empty examples (e.g. blank lines) before "
                         "passing the data.")
    if tensor.is_floating_point():
        if what == "attention_mask" and bool(((tensor == 0) | (tensor == 1)).all()):
            return tensor.long()  # a mask of 0.0/1.0 says the same as one of 0/1
        kind = "a mask must hold 0 and 1" if what == "attention_mask" else "token ids must be integers"
        raise TypeError(f"Example {index}: {what} holds floats ({tensor.dtype}); {kind}. Convert it with .long().")
    return tensor.long()


def to_example(item, index: int) -> Example:
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"Example {index} is a dict without 'input_ids' (keys: {sorted(item)}). "
                             "Add the token ids under 'input_ids'.")
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


def cut_to_real_span(example: Example, pad_token_id: int, pad_is_eos: bool) -> Example:
    """Apply the real-token rule once and drop padding on either side.

    Exact for a causal model: right padding changes no real logit, and removing left padding
    gives the positions the unpadded text has (the collator re-pads on the right).
    """
    mask = None if example.attention_mask is None else example.attention_mask[None]
    real = real_token_mask(example.input_ids[None], mask, pad_token_id, pad_is_eos)[0]
    where = real.nonzero()
    start, end = (int(where[0]), int(where[-1]) + 1) if where.numel() else (0, 0)
    span = real[start:end]
    cut = lambda t: None if t is None else t[start:end]  # noqa: E731
    return Example(example.input_ids[start:end], None if bool(span.all()) else span.long(), cut(example.labels))


def _columns_to_rows(data: Mapping) -> list[dict]:
    columns = {key: data[key] for key in ("input_ids", "attention_mask", "labels") if data.get(key) is not None}
    rows = len(columns["input_ids"])
    for key, column in columns.items():
        if len(column) != rows:
            raise ValueError(f"The '{key}' column has {len(column)} rows but 'input_ids' has {rows}. Give every column "
                             "one row per example (tokenize all texts in one call).")
    return [{key: column[i] for key, column in columns.items()} for i in range(rows)]


def to_examples(data, pad_token_id: int, what: str = "training data", pad_is_eos: bool = False) -> list[Example]:
    """Examples from a list/Dataset of sequences or dicts; examples with no real target are skipped (warned)."""
    if isinstance(data, Mapping) and "input_ids" in data:  # columns, e.g. a tokenizer's output for many texts
        data = _columns_to_rows(data)
    try:
        items = [data[i] for i in range(len(data))]
    except TypeError as error:
        raise TypeError(
            f"The {what} is a {type(data).__name__}; expected a list of token sequences, a list of dicts with "
            "'input_ids', a torch Dataset of those, or a DataLoader yielding dict batches."
        ) from error
    if not items:
        raise ValueError(f"The {what} is empty. Pass at least one tokenized sequence.")
    parsed = [to_example(item, i) for i, item in enumerate(items)]
    examples = [cut_to_real_span(example, pad_token_id, pad_is_eos) for example in parsed]
    if pad_is_eos:
        warn_if_eos_padding_is_ambiguous(parsed, examples, pad_token_id, what)
    kept = [ex for ex in examples if ex.real_targets() > 0]
    if not kept:
        raise no_real_target_error(what, pad_token_id)
    if len(kept) < len(examples):
        first = next(i for i, ex in enumerate(examples) if ex.real_targets() == 0)
        warn_skipped_without_target(len(examples) - len(kept), len(examples), first, what)
    return kept


def warn_if_eos_padding_is_ambiguous(parsed, cut, pad_token_id: int, what: str) -> None:
    """Padded with the EOS id and no mask: whether a line had its own EOS before the padding cannot be told."""
    padded = sum(1 for before, after in zip(parsed, cut) if before.attention_mask is None and len(after) < len(before))
    if padded:
        warnings.warn(
            f"{padded} examples of the {what} end in a run of the pad id {pad_token_id}, which is also the EOS id, and "
            "carry no attention_mask. The rule applied: the first of each trailing run is the line's real EOS and "
            "counts as a target; right for lines that ended in their EOS, one extra target per line for lines that "
            "did not. Pass attention_mask (e.g. the tokenizer's output) to be exact.",
            UserWarning, stacklevel=caller_stacklevel())


def split_positions(n: int, val_fraction: float, seed: int):
    """Positions of a seeded random hold-out, each part in the original order (``shuffle=False`` stays meaningful)."""
    import numpy as np

    if n < 2:
        raise ValueError("Need at least 2 training examples to hold out a validation set; pass val_data explicitly.")
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} of {n} examples holds out {n_val}, leaving none to "
                         "train on. Lower val_fraction, pass more training data, or pass val_data explicitly.")
    held_out = np.zeros(n, bool)
    held_out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].numpy()] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def synthetic_sequences(vocab_size: int, pad_token_id: int, n: int = 256, min_len: int = 8, max_len: int = 64,
                        seed: int = 0):
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


def pad_id_among_real_tokens(input_ids: torch.Tensor, attention_mask, pad_token_id: int) -> bool:
    """Whether the pad id occurs at a real position (no mask: every position is real), i.e. it is a real token."""
    at_pad = input_ids == pad_token_id
    return bool((at_pad if attention_mask is None else at_pad & attention_mask.bool()).any())
