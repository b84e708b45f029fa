"""Start-up checks of the model against the data: a clear ValueError beats a device-side assert.

The checks on examples and batches (ids, lengths) are the data seam's (``data/rows.py``); here they are applied to every
source before the first optimizer step, together with one forward pass's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import check_pad_token_id, to_device
from ..loss import ModelCaller, eval_mode, unwrap, vocab_size_of
from ..reproducibility import one_cpu_thread
from .embeddings import EmbeddingRoles, embedding_roles


def check_vocabulary(vocab_size: int, pad_token_id: int, sources: dict) -> None:
    """Every token id of each source and the pad id fit the vocabulary (the data first: ids beyond it mean a
    model built for another tokenizer, which is the cause to name, more often than a wrong pad id).

    Examples in memory are scanned now, naming the example; a user's DataLoader is not read ahead:
    each of its batches is checked as it is collated (before it reaches the model).
    """
    for source in sources:
        source.check_ids(vocab_size)
    check_pad_token_id(pad_token_id, vocab_size)


def max_positions(model, config) -> int | None:
    """The longest sequence the model declares it can take: GPT-2's n_positions or most HF configs'
    max_position_embeddings (a learned position table is read by what it does: :mod:`embeddings`)."""
    for source in (config, getattr(model, "config", None)):
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def tokenizer_size(tokenizer, config) -> int | None:
    """``len(tokenizer)`` (added tokens included) of the tokenizer argument, else ``config.tokenizer``."""
    tokenizer = tokenizer if tokenizer is not None else getattr(config, "tokenizer", None)
    try:
        return int(len(tokenizer)) if tokenizer is not None else None
    except TypeError:  # an object without a length
        return None


def check_logits(logits: torch.Tensor, batch: dict, vocab_size: int) -> None:
    """One forward pass's logits must be (batch, seq, vocab) and agree with the vocabulary."""
    input_ids = batch["input_ids"]
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"The model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{tuple(input_ids.shape)}; "
            "expected (batch, seq_len, vocab_size) with one row of logits per input position."
        )
    if logits.shape[-1] != vocab_size:
        raise ValueError(
            f"The model's logits have last dimension {logits.shape[-1]} but the vocabulary size is {vocab_size}. "
            "Make the output layer match the tokenizer (resize the embeddings) or fix config.vocab_size."
        )


def check_forward_arguments(caller: ModelCaller, model) -> None:
    """A forward that requires an argument no call passes (``forward(input_ids, labels)``) is named before it runs."""
    missing = caller.arguments_not_passed()
    if missing:
        names = ", ".join(missing)
        raise ValueError(
            f"{type(unwrap(model)).__name__}.forward requires {names}, which the package does not pass: it calls "
            f"model(input_ids) (with attention_mask= when the forward names it) and computes the loss itself from the "
            f"logits. Give {names} a default (e.g. {missing[0]}=None) and return the logits when it is not given.")


def _forward(caller: ModelCaller, model, batch: dict) -> torch.Tensor:
    """One eval-mode forward (eval mode draws no random numbers). An embedding's IndexError is named: an id or
    a position beyond its rows (a line longer than the model's positions when the config does not declare them)."""
    try:
        with eval_mode(model):
            return caller(model, batch)
    except IndexError as error:
        ids = batch["input_ids"]
        raise ValueError(
            f"The model's first forward pass failed inside an embedding ({error}) on a batch of {ids.shape[1]} "
            f"positions with token ids up to {int(ids.max())}: a line is longer than the model's positions, or an id "
            "is beyond its vocabulary. Set config.max_position_embeddings (and config.vocab_size) to the model's sizes "
            "so that lines and ids are checked by name before training, or tokenize with a max_length.") from error


def model_vocabulary_rows(model, roles: EmbeddingRoles) -> tuple[int, str] | None:
    """The model's own vocabulary size from its layers, and which layer said it: the output embedding's rows, else
    the input embedding's, else the rows of the ``nn.Embedding`` the input ids index (found by a forward)."""
    inner = unwrap(model)
    for getter, what in (("get_output_embeddings", "output layer"), ("get_input_embeddings", "token embedding")):
        layer = getattr(inner, getter, None)
        layer = layer() if callable(layer) else None
        if getattr(layer, "weight", None) is not None:
            return int(layer.weight.shape[0]), what
    if roles.token is not None:
        return roles.token[1], f"token embedding ({roles.token[0]})"
    return None


def _token_rows_cause(error: ValueError, token: tuple[str, int], vocab_size: int | None, tokens: int | None) -> str:
    name, rows = token
    sizes = ", ".join(part for part in (f"config.vocab_size={vocab_size}" if vocab_size is not None else "",
                                        f"the tokenizer has {tokens} tokens" if tokens is not None else "") if part)
    return (f"The model's token embedding {name} (the nn.Embedding the input ids index) has {rows} rows, but the data "
            f"holds larger token ids{f' ({sizes})' if sizes else ''}: the model was built for a smaller vocabulary "
            f"than the data's. Build it with vocab_size={tokens or vocab_size or 'len(tokenizer)'} (its embedding and "
            f"its output layer), or tokenize with the model's own tokenizer. The check said: {error}")


def _vocabulary_cause(error: ValueError, model, config, vocab_size: int, tokenizer, data_ids: bool,
                      roles: EmbeddingRoles) -> str:
    """The sentence that names why an id is outside the vocabulary, before the check's own message."""
    declared = getattr(config, "vocab_size", None) if config is not None else None
    rows = model_vocabulary_rows(model, roles) if declared is not None else None
    if rows is not None and rows[0] != declared:
        return (f"config.vocab_size={declared}, but the model's {rows[1]} has {rows[0]} rows (so {rows[0]} logits per "
                f"position): config.vocab_size looks wrong. Set config.vocab_size={rows[0]} (or build the model for "
                f"the tokenizer). The check said: {error}")
    tokens = tokenizer_size(tokenizer, config)
    if tokens is not None and tokens > vocab_size:
        return (f"The model's vocabulary ({vocab_size} ids) is smaller than the tokenizer's ({tokens} tokens): the "
                f"model was built for a smaller tokenizer. Build it with vocab_size={tokens} (e.g. GPT2Config("
                "vocab_size=len(tokenizer))), or call model.resize_token_embeddings(len(tokenizer)) for a pretrained "
                f"one. The check said: {error}")
    if data_ids:
        return (f"The data's token ids go beyond the model's vocabulary ({vocab_size} ids): the data was tokenized "
                f"with a larger tokenizer than the model was built for. Build the model with vocab_size >= "
                f"len(tokenizer) (or resize its embeddings), or tokenize with the model's own tokenizer. The check "
                f"said: {error}")
    return str(error)


@dataclass
class ModelSizes:
    vocab_size: int
    positions: int | None  # declared, or a learned position table's rows; None: not known


def check_model_against_data(model, config, sources: list, pad_token_id, device, tokenizer=None) -> ModelSizes:
    """Lengths, token ids, pad id and one eval-mode forward's logits against the model; returns its sizes.

    The sizes come from the config, else from the model's layers by what they do (:mod:`embeddings`: the
    ``nn.Embedding`` the ids index, a learned position table), so the lines and ids are checked before the
    forward and a bad one is named with the module, not found inside an embedding. The forward takes the longest
    line (``padded_batch``); an embedding's IndexError there is still explained.
    """
    vocab_size = vocab_size_of(model, config)
    caller = ModelCaller(model, vocab_size)
    check_forward_arguments(caller, model)
    limit = max_positions(model, config)
    roles = embedding_roles(model, caller, declared_positions=limit)
    if caller.vocab_size is None and roles.token is not None:
        caller.vocab_size = roles.token[1]  # tells a tuple's logits apart when nothing declares the vocabulary
    if limit is None and roles.positions is not None:
        limit = roles.positions[1]
    for source in sources:
        try:
            source.check_lengths(limit)
        except ValueError as error:
            if limit is None or roles.positions is None or max_positions(model, config) is not None:
                raise
            raise ValueError(f"{error} (The model's positions: its learned position table {roles.positions[0]} has "
                             f"{limit} rows.)") from error
    batch = to_device(sources[0].padded_batch(), device)
    if vocab_size is not None:
        for data_ids, check in ((True, lambda: [source.check_ids(vocab_size) for source in sources]),
                                (False, lambda: check_pad_token_id(pad_token_id, vocab_size))):
            try:
                check()
            except ValueError as error:
                raise ValueError(_vocabulary_cause(error, model, config, vocab_size, tokenizer, data_ids,
                                                   roles)) from error
    if roles.token is not None and (vocab_size is None or roles.token[1] < vocab_size):
        try:
            for source in sources:
                source.check_ids(roles.token[1])
        except ValueError as error:
            raise ValueError(_token_rows_cause(error, roles.token, vocab_size,
                                               tokenizer_size(tokenizer, config))) from error
    logits = _forward(caller, model, batch)
    check_logits(logits, batch, vocab_size if vocab_size is not None else logits.shape[-1])
    if vocab_size is None:
        vocab_size = logits.shape[-1]
        check_vocabulary(vocab_size, pad_token_id, sources)
    return ModelSizes(vocab_size, limit)


def check_parameter_values(model) -> None:
    """Parameters without values (the ``meta`` device, lazy modules) or with NaN/inf are refused, with what to do."""
    for name, parameter in model.named_parameters():
        if isinstance(parameter, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"The model's parameter {name} is not initialised yet (a lazy module, e.g. nn.LazyLinear):"
                             " run one forward on a batch of input ids before training, so that it takes its shape.")
        if parameter.is_meta:
            raise ValueError(
                f"The model's parameters are on the 'meta' device ({name} first): they have shapes but no values (a "
                "model built under torch.device('meta'), or init_empty_weights()). Give them values first: "
                "model.to_empty(device='cpu') followed by an initialisation (model.apply(model._init_weights) for a "
                "Hugging Face model, reset_parameters() of each layer for your own), or load weights "
                "(model.load_state_dict(state_dict, assign=True)).")
    floating = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    with one_cpu_thread(floating[0][1].device if floating else torch.device("cpu")):  # small reductions, one thread
        # A sum is finite when every value is (and reads each value once, allocating nothing); one host read for
        # all of them. A non-finite sum can also be an overflow of huge values: those are confirmed one by one.
        sums = torch.stack([p.detach().sum(dtype=torch.float32) for _, p in floating]) if floating else None
        suspect = [] if sums is None else torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
    for index in suspect:
        name, parameter = floating[index]
        if not bool(torch.isfinite(parameter).all()):
            raise ValueError(
                f"The model's parameter {name} holds NaN or inf before training: its values were never initialised "
                "(torch.empty, to_empty()) or a load went wrong. Initialise it (reset_parameters(), or "
                "model.apply(model._init_weights) for a Hugging Face model) or load trained weights.")
