"""Input checks that run before the first optimizer step: a clear ValueError beats a device-side assert."""
from __future__ import annotations

import torch

from .data import ExampleBatches, to_device
from .loss import IGNORE_INDEX
from .model_io import ModelCaller, eval_mode, vocab_size_of


def check_pad_token_id(pad_token_id: int, vocab_size: int) -> None:
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(
            f"pad_token_id={pad_token_id} is outside the vocabulary [0, {vocab_size}). Set config.pad_token_id "
            "(or the tokenizer's pad token) to an id the model's embedding has, e.g. the EOS id."
        )


def _check_ids(ids: torch.Tensor, vocab_size: int, where: str, allow_ignore: bool = False) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    if bool(bad.any()):
        value = int(ids[bad][0])
        kind = "negative" if value < 0 else f">= the vocabulary size {vocab_size}"
        extra = " (only -100 is allowed in labels, meaning 'ignore')" if allow_ignore else ""
        raise ValueError(
            f"{where} holds token id {value}, which is {kind}{extra}. Tokenize with the tokenizer that matches "
            f"the model, or set config.vocab_size to the model's real vocabulary size."
        )


def check_batch_ids(batch: dict, vocab_size: int, where: str) -> None:
    _check_ids(torch.as_tensor(batch["input_ids"]), vocab_size, where)
    if batch.get("labels") is not None:
        _check_ids(torch.as_tensor(batch["labels"]), vocab_size, where + " (labels)", allow_ignore=True)


def check_vocabulary(vocab_size: int, pad_token_id: int, sources: dict) -> None:
    """The pad id and every token id of each source (``{"training data": source, ...}``) fit the vocabulary.

    Examples in memory are scanned now, naming the example; a user's DataLoader is not read ahead:
    each of its batches is checked as it is collated (before it reaches the model).
    """
    check_pad_token_id(pad_token_id, vocab_size)
    for what, source in sources.items():
        if isinstance(source, ExampleBatches):
            if source.checked_vocab_size == vocab_size:
                continue
            for i, example in enumerate(source.examples):
                check_batch_ids({"input_ids": example.input_ids, "labels": example.labels}, vocab_size, f"Example {i} of the {what}")
            source.checked_vocab_size = vocab_size
        else:
            source.vocab_size = vocab_size


def max_positions(model, config) -> int | None:
    """The longest sequence the model declares it can take (GPT-2's n_positions, most HF configs' max_position_embeddings)."""
    for source in (config, getattr(model, "config", None)):
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_lengths(limit: int | None, sources: dict) -> None:
    """Every example fits the model's positions; a user's DataLoader is checked batch by batch as it is read."""
    if limit is None:
        return
    for what, source in sources.items():
        if not isinstance(source, ExampleBatches):
            source.max_length = limit
            continue
        if source.checked_max_length == limit:
            continue
        for i, length in enumerate(source.lengths):
            if length > limit:
                raise ValueError(
                    f"Example {i} of the {what} has {length} tokens, more than the model's {limit} positions. Tokenize "
                    f"with a limit (prepare_lm_dataset(..., max_length={limit}) or tokenizer(..., truncation=True, "
                    f"max_length={limit})), or split long texts.")
        source.checked_max_length = limit


def check_logits(logits: torch.Tensor, batch: dict, vocab_size: int) -> None:
    """One forward pass's logits must be (batch, seq, vocab) and agree with the vocabulary."""
    input_ids = batch["input_ids"]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"The model returned logits of shape {tuple(logits.shape)} for input_ids of shape {tuple(input_ids.shape)}; "
            "expected (batch, seq_len, vocab_size) with one row of logits per input position."
        )
    if logits.shape[-1] != vocab_size:
        raise ValueError(
            f"The model's logits have last dimension {logits.shape[-1]} but the vocabulary size is {vocab_size}. "
            "Make the output layer match the tokenizer (resize the embeddings) or fix config.vocab_size."
        )


def check_vocabulary_and_logits(model, config, sources: dict, pad_token_id, device) -> int:
    """Token ids, pad id and one eval-mode forward's logits against the vocabulary; returns its size.

    With the size known (config or output embedding) the ids are checked before any forward, so a bad
    id is named instead of failing inside the embedding; otherwise the logits' width is the size.
    """
    vocab_size = vocab_size_of(model, config)
    if vocab_size is not None:
        check_vocabulary(vocab_size, pad_token_id, sources)
    batch = to_device(next(iter(sources.values())).first_batch(), device)
    with eval_mode(model):  # eval mode draws no random numbers
        logits = ModelCaller(model)(model, batch)
    check_logits(logits, batch, vocab_size if vocab_size is not None else logits.shape[-1])
    if vocab_size is None:
        vocab_size = logits.shape[-1]
        check_vocabulary(vocab_size, pad_token_id, sources)
    return vocab_size
