"""Calling a user's model: plain nn.Module or Hugging Face, whatever it returns, and getting a batch's loss sums.

``ModelCaller.loss_sums`` is where training and validation get a batch's :class:`TokenSums`. Two paths, chosen
once at start-up by the rule in :mod:`loss_path`:

* ``"linear"``: hidden states from the model's body, then :func:`linear_loss.linear_masked_lm_loss` with the
  output layer's weight (:func:`output_layer_of` says where they are): the full logits never exist.
* ``"chunked"``: the model's own forward, then :func:`loss.masked_lm_loss` over its logits in chunks.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from .linear_loss import linear_lm_sums
from .masked import TokenSums, batch_targets, chunked_lm_sums


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def _forward_parameters(model: nn.Module):
    try:
        return inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return {}


class ModelCaller:
    """Calls ``model`` the way its forward expects and returns the logits tensor.

    Models whose forward names ``attention_mask`` get it (with ``input_ids=``); every other
    model is called positionally, ``model(input_ids)``, since custom modules name that
    argument ``x``, ``idx`` or ``src``. Which part of the output is the logits is :func:`extract_logits`' rule, with
    the vocabulary size (given, else the model's own) to tell a tuple's elements apart.
    """

    def __init__(self, model: nn.Module, vocab_size: int | None = None):
        params = _forward_parameters(model)
        self.vocab_size = vocab_size if vocab_size is not None else vocab_size_of(model)
        self.forward_parameters = params
        self.accepts_attention_mask = "attention_mask" in params
        self.accepts_input_ids = "input_ids" in params
        self.accepts_position_ids = "position_ids" in params
        # Hugging Face models otherwise return a key/value cache nobody reads during training.
        self.extra_kwargs = {"use_cache": False} if "use_cache" in params else {}
        # Set once at start-up (see mask_free_is_exact): right-padded batches then go without a mask, which
        # lets a causal model's attention take its fastest (is_causal / flash) path.
        self.mask_free = False
        # Set once at start-up (loss_path.choose_loss_path): losses from hidden states and the head's weight.
        self.output_layer = None

    def __call__(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        return extract_logits(self.call(model, batch), self.vocab_size)

    def arguments_not_passed(self) -> list[str]:
        """The forward's required parameters that no call here fills: the ids go to the first positional one (or
        ``input_ids=``), and a forward naming ``attention_mask`` also gets it and ``use_cache``."""
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        first = next((name for name, p in self.forward_parameters.items() if p.kind in kinds), None)
        filled = {first} | ({"input_ids", "attention_mask", "use_cache"} if self.accepts_attention_mask else set())
        return [name for name, p in self.forward_parameters.items()
                if p.default is inspect.Parameter.empty and name not in filled
                and p.kind in (*kinds, inspect.Parameter.KEYWORD_ONLY)]

    def call(self, model: nn.Module, batch: Mapping):
        """The model's output for ``batch``, as it returns it."""
        input_ids = batch["input_ids"]
        if self.accepts_attention_mask:
            mask = None if (self.mask_free and batch.get("right_padded")) else batch.get("attention_mask")
            kwargs = dict(attention_mask=mask, **self.extra_kwargs)
            # A user's loader may carry them (packed rows).
            if self.accepts_position_ids and batch.get("position_ids") is not None:
                kwargs["position_ids"] = batch["position_ids"]
            return model(input_ids=input_ids, **kwargs) if self.accepts_input_ids else model(input_ids, **kwargs)
        return model(input_ids)

    @property
    def loss_path(self) -> str:
        return "chunked" if self.output_layer is None else "linear"

    def loss_sums(self, model: nn.Module, batch: Mapping, pad_token_id: int, targets=None) -> TokenSums:
        """Forward ``batch`` and return its masked LM sums (``loss_sum`` carries the graph for backward).
        ``targets``: the batch's :func:`loss.batch_targets` when the caller needs them too (validation's bytes).

        The linear path applies to the very module it was probed on; a wrapper of it (DDP, ``torch.compile``)
        goes through its own forward, since calling the body directly would bypass what the wrapper does.
        """
        targets = targets if targets is not None else batch_targets(batch, pad_token_id)
        if self.output_layer is not None and model is self.output_layer.model:
            return self.linear_sums(batch, pad_token_id, targets=targets)
        return chunked_lm_sums(self(model, batch), targets)

    def linear_sums(self, batch: Mapping, pad_token_id: int, layer=None, targets=None) -> TokenSums:
        layer = layer or self.output_layer
        if layer.body_caller is None:
            hidden = layer.model.forward_hidden(batch["input_ids"])
        else:
            layer.body_caller.mask_free = self.mask_free
            hidden = _first_tensor(layer.body_caller.call(layer.body, batch))
        head = layer.head
        return linear_lm_sums(hidden, head.weight, head.bias,
                              targets if targets is not None else batch_targets(batch, pad_token_id))


class OutputLayer:
    """Where a model's logits come from: ``head(body(batch))``, ``head`` an ``nn.Linear``."""

    def __init__(self, model: nn.Module, head: nn.Linear, body: nn.Module | None = None):
        self.model, self.head, self.body = model, head, body
        # Hugging Face bodies take the same keywords as their model (mask, position ids, use_cache).
        self.body_caller = None if body is None else ModelCaller(body)


def output_layer_of(model: nn.Module) -> OutputLayer | None:
    """The model's output layer and body, when it says where they are; None otherwise (its own forward is used)."""
    head = getattr(model, "output_head", None)
    if callable(getattr(model, "forward_hidden", None)) and isinstance(head, nn.Linear):
        return OutputLayer(model, head)
    config = getattr(model, "config", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not callable(get_output):
        return None
    head = get_output()
    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    # An exact nn.Linear: a subclass may quantize or adapt.
    if type(head) is not nn.Linear or not isinstance(body, nn.Module) or body is model:
        return None
    return OutputLayer(model, head, body)


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    return output[0]


def hf_causal_lm_class_names() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return set()
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def mask_free_is_exact(model: nn.Module, caller: ModelCaller, padded_batch: Mapping) -> bool:
    """Whether right-padded batches may go to ``model`` without an attention mask.

    Two conditions, both required: the model is a Hugging Face decoder-only causal LM (its class is in
    transformers' causal-LM mapping and its config is not encoder-decoder), and on one right-padded batch
    its logits at every real position are the same with and without the mask. A model that needs the mask
    (not causal, or using it otherwise) keeps getting it.
    """
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if (not caller.accepts_attention_mask or config is None or getattr(config, "is_encoder_decoder", False)
            or type(inner).__name__ not in hf_causal_lm_class_names()):
        return False
    real = padded_batch["attention_mask"].bool()
    if bool(real.all()):
        return False  # nothing to compare on: keep the mask
    with eval_mode(inner):
        with_mask = caller(inner, dict(padded_batch, right_padded=False))
        without_mask = caller(inner, dict(padded_batch, attention_mask=None, right_padded=False))
    return torch.allclose(with_mask[real].float(), without_mask[real].float(), rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` and no gradients for the block, then every submodule's previous mode again
    (a user may keep some submodules in eval mode while the model trains, or the other way round)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def extract_logits(output, vocab_size: int | None = None) -> torch.Tensor:
    """The logits in a model's output: the tensor itself; a ``logits`` key or attribute (dict, ModelOutput); in a
    bare tuple the one (batch, seq, vocab) element - the only 3-D one when the vocabulary is unknown. A tuple with
    two such elements (``(hidden, logits)`` with a hidden width equal to the vocabulary) is refused: which one is
    the logits is not guessed."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and output.get("logits") is not None:
        return output["logits"]
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        sequences = [(i, x) for i, x in enumerate(output) if isinstance(x, torch.Tensor) and x.dim() == 3]
        matching = [(i, x) for i, x in sequences if vocab_size is None or x.shape[-1] == vocab_size]
        if len(matching) == 1:
            return matching[0][1]
        if len(matching) > 1:
            shapes = ", ".join(f"[{i}] {tuple(x.shape)}" for i, x in matching)
            known = (f"the vocabulary's size ({vocab_size})" if vocab_size is not None else
                     "a (batch, seq, width) shape, and the vocabulary size is not known")
            raise ValueError(
                f"The model returned a tuple of {len(output)} elements, and {len(matching)} of them have {known}: "
                f"{shapes}. Which one is the logits is not guessed (the first of (hidden, logits) would train on the "
                "hidden states). Return the logits alone, or a dict / ModelOutput with a 'logits' entry (e.g. "
                "return {'logits': logits, 'hidden_states': hidden}).")
        if isinstance(output[0], torch.Tensor):
            return output[0]  # checked against the vocabulary at start-up (check_logits names the widths)
    raise TypeError(
        f"The model returned {type(output).__name__}, which holds no logits. Return a logits tensor "
        "of shape (batch, seq_len, vocab_size), a tuple whose only (batch, seq_len, vocab_size) item is that "
        "tensor, or a dict/ModelOutput with a 'logits' entry."
    )


def vocab_size_of(model: nn.Module, config=None) -> int | None:
    """``config.vocab_size``, else the rows of the model's output embedding, else None."""
    size = getattr(config, "vocab_size", None) if config is not None else None
    if size is not None:
        return int(size)
    inner = unwrap(model)
    get_output = getattr(inner, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    inner_config = getattr(inner, "config", None)
    if inner_config is not None and getattr(inner_config, "vocab_size", None) is not None:
        return int(inner_config.vocab_size)
    return None
