"""Start-up checks of the model against the data: a clear ValueError beats a device-side assert.

The checks on examples and batches (ids, lengths) are :mod:`example_checks`'; here they are applied to every
source before the first optimizer step, together with one forward pass's logits.
"""
from __future__ import annotations

import torch

from .collate import to_device
from .example_checks import check_pad_token_id
from .model_call import ModelCaller, eval_mode, vocab_size_of


def check_vocabulary(vocab_size: int, pad_token_id: int, sources: dict) -> None:
    """The pad id and every token id of each source fit the vocabulary.

    Examples in memory are scanned now, naming the example; a user's DataLoader is not read ahead:
    each of its batches is checked as it is collated (before it reaches the model).
    """
    check_pad_token_id(pad_token_id, vocab_size)
    for source in sources:
        source.check_ids(vocab_size)


def max_positions(model, config) -> int | None:
    """The longest sequence the model declares it can take (GPT-2's n_positions, most HF configs' max_position_embeddings)."""
    for source in (config, getattr(model, "config", None)):
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


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


def check_model_against_data(model, config, sources: list, pad_token_id, device) -> int:
    """Lengths, token ids, pad id and one eval-mode forward's logits against the model; returns the vocabulary size.

    With the size known (config or output embedding) the ids are checked before any forward, so a bad
    id is named instead of failing inside the embedding; otherwise the logits' width is the size.
    """
    limit = max_positions(model, config)
    for source in sources:
        source.check_lengths(limit)
    vocab_size = vocab_size_of(model, config)
    if vocab_size is not None:
        check_vocabulary(vocab_size, pad_token_id, sources)
    batch = to_device(sources[0].first_batch(), device)
    with eval_mode(model):  # eval mode draws no random numbers
        logits = ModelCaller(model)(model, batch)
    check_logits(logits, batch, vocab_size if vocab_size is not None else logits.shape[-1])
    if vocab_size is None:
        vocab_size = logits.shape[-1]
        check_vocabulary(vocab_size, pad_token_id, sources)
    return vocab_size
