"""Every check on the data itself, in one place: each names the example (or the batch and row) and the fix.

Examples in memory or on disk are checked before the first step (:mod:`example_tables`); a stream cannot be
read ahead, so each of its rows is checked as it is read (:class:`RowChecks`), and ``bad_examples`` says what
a row that fails does: ``"error"`` (the default) stops the run naming the row, ``"skip"`` goes past it,
``"truncate"`` cuts a too-long row to the model's positions (a row with ids outside the vocabulary is
skipped). Rows gone past are counted and reported in ``results["bad_examples"]``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ..loss import IGNORE_INDEX
from ..warn import caller_stacklevel
from .data_settings import BAD_EXAMPLES


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


def no_real_target_error(what: str, pad_token_id: int) -> ValueError:
    return ValueError(f"No example of the {what} has a real target token (each needs at least 2 non-padding tokens, "
                      f"pad_token_id={pad_token_id}). Check the pad id and that the data is not all padding.")


def warn_skipped_without_target(skipped: int, total: int, first: int, what: str) -> None:
    warnings.warn(f"Skipped {skipped} of {total} examples of the {what} (the first: example {first}): they have no "
                  "real target token (all padding, masked, or a single token).",
                  UserWarning, stacklevel=caller_stacklevel())


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


class RowChecks:
    """The checks of a stream's rows as they are read, and what ``bad_examples`` does with a row that fails.

    ``counts`` says how many rows the run went past (or cut) and why; a checkpoint carries them.
    """

    def __init__(self, what: str, bad_examples: str = "error"):
        if bad_examples not in BAD_EXAMPLES:
            raise ValueError(f"Unknown bad_examples {bad_examples!r}; "
                             f"choose one of {', '.join(map(repr, BAD_EXAMPLES))}.")
        self.what, self.policy = what, bad_examples
        self.vocab_size = self.max_length = None  # set by the start-up checks
        self.counts = {"too_long": 0, "ids_outside_vocabulary": 0, "no_real_target": 0, "truncated": 0}

    def fix(self) -> str:
        return (", or pass bad_examples='skip' (go past such rows, counted in results['bad_examples']) or "
                "bad_examples='truncate' (cut too-long rows to the model's positions)")

    def check(self, example, where: str):
        """The example to use, a shorter one (``"truncate"``), or None to go past it; raises under ``"error"``."""
        if self.vocab_size is not None:
            for key, labels in (("input_ids", False), ("labels", True)):
                tensor = getattr(example, key)
                value = None if tensor is None else first_id_outside(tensor, self.vocab_size, labels)
                if value is not None:
                    if self.policy == "error":
                        raise ids_error(value, self.vocab_size, where, labels, self.fix())
                    self.counts["ids_outside_vocabulary"] += 1
                    return None
        if self.max_length is not None and len(example) > self.max_length:
            if self.policy == "error":
                check_length(len(example), self.max_length, where, self.fix())
            if self.policy == "skip":
                self.counts["too_long"] += 1
                return None
            self.counts["truncated"] += 1
            example = example.truncated(self.max_length)
        if example.real_targets() == 0:  # dropped as the in-memory path drops them (there with a warning)
            self.counts["no_real_target"] += 1
            return None
        return example
