"""One row -> one :class:`Example`, and every check on rows and batches, each naming the row and the fix.

A row is what one example of the user's data is: a token sequence (a list, a tuple, a 1-D tensor, a tokenizer's
``return_tensors="pt"`` output for one text), a dict with ``input_ids`` (and optional ``attention_mask``,
``labels``), or one row of a collated batch (:func:`batch_rows`). :func:`read_example` parses it
(:func:`to_example`) and applies the pad rule once (:func:`cut_to_real_span`); every source reads its rows through
it: tables per batch, streams as they are read, a user's DataLoader for its probe batch. A DataLoader's batches are
used as given, so the same rule is applied to the batch (:func:`batch_with_pad_rule`). Which rows a source keeps,
holds out or gives a process is :mod:`subsets`'; how examples become a padded batch, :mod:`collate`'.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..loss import IGNORE_INDEX, real_token_mask, shifted_targets
from ..warn import caller_stacklevel

ROW_KEYS = ("input_ids", "attention_mask", "labels")  # what a row may carry; anything else is not read


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


# -- reading a row ------------------------------------------------------------------------------------------------
def read_example(row, index: int, pad_token_id: int, pad_is_eos: bool) -> Example:
    """Row ``index`` as an example: parsed and checked (:func:`to_example`), cut to its real span."""
    return cut_to_real_span(to_example(row, index), pad_token_id, pad_is_eos)


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
    """Row ``index`` parsed as it is given (no pad rule yet); a row of the wrong kind or shape is refused."""
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


def batch_with_pad_rule(batch: dict, pad_token_id: int, pad_is_eos: bool) -> dict:
    """A user's collated batch (a DataLoader's, used as given) with the pad rule applied as its attention mask,
    left-padded rows moved to the right (exact for a causal model, and the only form in which a model without
    ``attention_mask``/``position_ids`` arguments sees the positions of the unpadded text) and ``right_padded``."""
    batch["attention_mask"] = real_token_mask(batch["input_ids"], batch.get("attention_mask"), pad_token_id,
                                              pad_is_eos).long()
    batch = _left_padding_moved_right(batch, pad_token_id)
    mask = batch["attention_mask"]
    batch["right_padded"] = bool((mask[:, 1:] <= mask[:, :-1]).all())  # on the CPU, before the device copy
    return batch


def _left_padding_moved_right(batch: dict, pad_token_id: int) -> dict:
    mask = batch["attention_mask"]
    leading = (mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # padding before each row's first real token
    if not bool(leading.any()):
        return batch
    source = torch.arange(mask.shape[1]) + leading
    inside = source < mask.shape[1]
    source = source.clamp(max=mask.shape[1] - 1)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
    for key, fill in fills.items():
        if batch.get(key) is not None:
            batch[key] = torch.where(inside, batch[key].gather(1, source), fill)
    return batch


def batch_rows(batch: Mapping) -> list[dict]:
    """The rows of a collated batch (or of columns: a tokenizer's output for many texts), as dicts."""
    columns = {key: batch[key] for key in ROW_KEYS if batch.get(key) is not None}
    return [{key: column[r] for key, column in columns.items()} for r in range(len(batch["input_ids"]))]


def rows_of_columns(data: Mapping) -> list[dict]:
    """Columns (a tokenizer's output for many texts) as rows; every column needs one entry per row."""
    columns = {key: data[key] for key in ROW_KEYS if data.get(key) is not None}
    rows = len(columns["input_ids"])
    for key, column in columns.items():
        if len(column) != rows:
            raise ValueError(f"The '{key}' column has {len(column)} rows but 'input_ids' has {rows}. Give every column "
                             "one row per example (tokenize all texts in one call).")
    return batch_rows(columns)


def item_rows(item) -> list:
    """The rows one item of a stream holds: the item itself, or each row of a collated batch (a DataLoader's)."""
    ids = item.get("input_ids") if isinstance(item, Mapping) else None
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return batch_rows(item)
    return [item]


def pad_id_among_real_tokens(input_ids: torch.Tensor, attention_mask, pad_token_id: int) -> bool:
    """Whether the pad id occurs at a real position (no mask: every position is real), i.e. it is a real token."""
    at_pad = input_ids == pad_token_id
    return bool((at_pad if attention_mask is None else at_pad & attention_mask.bool()).any())


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


# -- the checks on rows and batches: ids, lengths, shapes -----------------------------------------------------------
def length_fix(limit: int) -> str:
    return (f"Tokenize with a limit (prepare_lm_dataset(..., max_length={limit}) or tokenizer(..., truncation=True, "
            f"max_length={limit})), or split long texts")


def check_length(length: int, limit: int | None, where: str, extra_fix: str = "") -> None:
    """One rule for every source: a sequence longer than the model's positions is refused before it runs."""
    if limit is not None and length > limit:
        raise ValueError(f"{where} has {length} tokens, more than the model's {limit} positions. {length_fix(limit)}"
                         f"{extra_fix}.")


def check_pad_token_id(pad_token_id: int, vocab_size: int) -> None:
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(
            f"pad_token_id={pad_token_id} is outside the vocabulary [0, {vocab_size}). Set config.pad_token_id "
            "(or the tokenizer's pad token) to an id the model's embedding has, e.g. the EOS id."
        )


def first_id_outside(ids: torch.Tensor, vocab_size: int, allow_ignore: bool = False) -> int | None:
    """The first id outside ``[0, vocab_size)`` (``-100`` allowed in labels), or None."""
    bad = (ids < 0) | (ids >= vocab_size)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    return int(ids[bad][0]) if bool(bad.any()) else None


def ids_error(value: int, vocab_size: int, where: str, labels: bool = False, extra_fix: str = "") -> ValueError:
    kind = "negative" if value < 0 else f">= the vocabulary size {vocab_size}"
    allowed = " (only -100 is allowed in labels, meaning 'ignore')" if labels else ""
    return ValueError(f"{where}{' (labels)' if labels else ''} holds token id {value}, which is {kind}{allowed}. "
                      "Tokenize with the tokenizer that matches the model, or set config.vocab_size to the model's "
                      f"real vocabulary size{extra_fix}.")


def check_batch_ids(batch: Mapping, vocab_size: int, where: str, extra_fix: str = "") -> None:
    """``input_ids`` (and ``labels``, where -100 means ignore) of an example or a batch fit the vocabulary."""
    for key, labels in (("input_ids", False), ("labels", True)):
        if batch.get(key) is not None:
            value = first_id_outside(torch.as_tensor(batch[key]), vocab_size, allow_ignore=labels)
            if value is not None:
                raise ids_error(value, vocab_size, where, labels, extra_fix)


def check_loader_batch(batch, what: str) -> None:
    """A DataLoader must yield dict batches; the same message for a map-style and an iterable loader."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"The DataLoader given as {what} yields {type(batch).__name__} batches; it must yield dicts "
                        "with 'input_ids' (and optional 'attention_mask', 'labels'), e.g. collate_fn=lambda rows: "
                        "{'input_ids': ...}. Pass a list of sequences instead to let the package pad them.")


def check_batch_shapes(batch: Mapping, what: str) -> None:
    shape = tuple(batch["input_ids"].shape)
    for key in ("attention_mask", "labels"):
        if batch.get(key) is not None and tuple(batch[key].shape) != shape:
            raise ValueError(f"A batch of the {what} has {key} of shape {tuple(batch[key].shape)} but input_ids of "
                             f"shape {shape}. Give {key} one entry per input token.")
