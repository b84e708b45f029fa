"""Which of a model's modules explain a failed start-up probe: watched during the probe's first forward.

The probes (:mod:`probes`) see behaviour only: "example 0 changed with example 1", "position 17 sees the
future". To name the cause they watch torch's own layers once, by what those layers are and what they are given,
never by the user's names for them:

* a sequence-first layer (``batch_first=False``: ``nn.MultiheadAttention``, ``nn.Transformer*Layer``,
  ``nn.RNN``/``LSTM``/``GRU``) handed a tensor whose first dimensions are the probe's (batch, seq);
* attention run without a causal mask (no ``attn_mask``/``mask``/``src_mask`` and no ``is_causal=True``), or with
  a mask whose row r lets r attend to a later column (the first such row is named);
* a normalisation over the sequence (``nn.InstanceNorm*``, ``nn.GroupNorm`` on (batch, channels, seq)) or over
  the batch (a ``BatchNorm`` without running statistics, which in evaluation mode still uses the batch's).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder)
_MASK_KEYWORDS = ("attn_mask", "src_mask", "mask", "tgt_mask")
_SEQUENCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


@dataclass
class Suspects:
    """What the watched forward saw: names of modules by the fault each one shows."""

    sequence_first: list[str] = field(default_factory=list)  # batch_first=False fed (batch, seq, ...)
    unmasked_attention: list[str] = field(default_factory=list)  # no causal mask, no is_causal
    leaky_masks: list[tuple[str, int]] = field(default_factory=list)  # (module, first row that sees a later column)
    masked_attention: list[str] = field(default_factory=list)  # given a causal mask or is_causal=True
    sequence_norms: list[str] = field(default_factory=list)
    batch_norms: list[str] = field(default_factory=list)


def _label(name: str, module: nn.Module) -> str:
    return f"{name or 'the model'} ({type(module).__name__})"


def _is_batch_first(module: nn.Module) -> bool:
    if isinstance(module, nn.RNNBase):
        return module.batch_first
    # An encoder, its layers and their attention: the first nn.MultiheadAttention inside says.
    attention = next((m for m in module.modules() if isinstance(m, nn.MultiheadAttention)), None)
    return attention is None or attention.batch_first


def _first_leaky_row(mask) -> int | None:
    """The first row of a 2-D attention mask that allows a later column (True = blocked in torch's bool masks,
    -inf = blocked in float masks); None when the mask is causal or not a square 2-D mask."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return None
    allowed = ~mask if mask.dtype == torch.bool else torch.isfinite(mask)
    future = torch.triu(allowed, diagonal=1).any(dim=1)
    rows = torch.nonzero(future).flatten()
    return int(rows[0]) if len(rows) else None


def _mask_argument(module: nn.Module, args: tuple, kwargs: dict):
    for key in _MASK_KEYWORDS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    # Where each layer takes its mask positionally: MHA(query, key, value, key_padding_mask, need_weights,
    # attn_mask), DecoderLayer(tgt, memory, tgt_mask), EncoderLayer(src, src_mask), Encoder(src, mask).
    index = {nn.MultiheadAttention: 5, nn.TransformerDecoderLayer: 2}.get(type(module), 1)
    return args[index] if len(args) > index else None


@contextlib.contextmanager
def watch(model: nn.Module, batch_shape: tuple[int, int]):
    """Yield a :class:`Suspects` filled during the forwards run inside the block (hooks removed after)."""
    found, handles = Suspects(), []
    seen: set[int] = set()

    def note(target: list, item) -> None:
        if item not in target:
            target.append(item)

    def pre_hook(name):
        def hook(module, args, kwargs):
            if id(module) in seen:
                return
            seen.add(id(module))
            first = args[0] if args else next(iter(kwargs.values()), None)
            shape = tuple(first.shape[:2]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None
            if isinstance(module, (*_ATTENTION, nn.RNNBase)) and shape == batch_shape and not _is_batch_first(module):
                note(found.sequence_first, _label(name, module))
            if isinstance(module, _ATTENTION):
                mask, causal = _mask_argument(module, args, kwargs), bool(kwargs.get("is_causal"))
                leaky = _first_leaky_row(mask)
                if leaky is not None:
                    note(found.leaky_masks, (_label(name, module), leaky))
                elif mask is None and not causal:
                    note(found.unmasked_attention, _label(name, module))
                else:
                    note(found.masked_attention, _label(name, module))
            if isinstance(module, _SEQUENCE_NORMS):
                note(found.sequence_norms, _label(name, module))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
                note(found.batch_norms, _label(name, module))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (*_ATTENTION, nn.RNNBase, *_SEQUENCE_NORMS, nn.modules.batchnorm._BatchNorm)):
            handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
    # A layer inside an unmasked encoder is unmasked because of it: name the outermost one only.
    found.unmasked_attention = [label for label in found.unmasked_attention
                                if not any(label != outer and label.startswith(outer.split(" (")[0] + ".")
                                           for outer in found.unmasked_attention)]
