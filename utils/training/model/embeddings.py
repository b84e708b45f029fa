"""The model's vocabulary and position sizes read from its ``nn.Embedding`` layers by what they do, not their names.

One tiny forward (two rows of four token-0 ids) with a pre-hook on every ``nn.Embedding``: the one whose input is
the input ids is the token embedding (its rows are the vocabulary the model can read); one whose input counts
0, 1, 2, ... along the sequence is a learned position table (its rows are the longest line the model can take).
A model that calls ``self.tok(idx)`` or ``self.where(torch.arange(seq))`` is read the same as GPT-2's ``wte``/``wpe``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..loss import ModelCaller, eval_mode, unwrap
from ..reproducibility import one_cpu_thread

DISCOVERY_SHAPE = (2, 4)  # rows x positions of the discovery forward: cheap, and long enough to see 0, 1, 2, 3


@dataclass
class EmbeddingRoles:
    token: tuple[str, int] | None = None  # (module name, rows) of the embedding the input ids index
    positions: tuple[str, int] | None = None  # (module name, rows) of a learned position table


def _is_ids(x: torch.Tensor, ids: torch.Tensor) -> bool:
    return x is ids or (x.numel() == ids.numel() and torch.equal(x.reshape(ids.shape), ids))


def _counts_positions(x: torch.Tensor, length: int) -> bool:
    if x.dim() == 0 or x.shape[-1] != length:
        return False
    return bool(torch.equal(x.reshape(-1, length), torch.arange(length, device=x.device).expand(x.numel() // length,
                                                                                                 length)))


def _declared_input_embedding(inner: nn.Module) -> tuple[str, int] | None:
    """A Hugging Face model says which layer embeds its ids (``get_input_embeddings``)."""
    try:
        layer = inner.get_input_embeddings() if callable(getattr(inner, "get_input_embeddings", None)) else None
    except NotImplementedError:
        return None
    name = next((name for name, module in inner.named_modules() if module is layer), None)
    return (name, layer.num_embeddings) if isinstance(layer, nn.Embedding) and name is not None else None


def embedding_roles(model: nn.Module, caller: ModelCaller, declared_positions: int | None = None) -> EmbeddingRoles:
    """Which ``nn.Embedding`` the input ids index and which one counts positions, from one tiny forward; empty
    roles when the model cannot run on it (the start-up forward over real lines then speaks). A model that declares
    both (a Hugging Face input embedding and the config's positions) needs no forward."""
    inner = unwrap(model)
    declared = _declared_input_embedding(inner)
    if declared is not None and declared_positions is not None:
        return EmbeddingRoles(token=declared)
    device = next(inner.parameters()).device
    ids = torch.zeros(DISCOVERY_SHAPE, dtype=torch.long, device=device)
    roles, handles = EmbeddingRoles(), []

    def hook(name):
        def pre_hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.is_floating_point():
                return
            if roles.token is None and _is_ids(x, ids):
                roles.token = (name, module.num_embeddings)
            elif roles.positions is None and _counts_positions(x, ids.shape[1]):
                roles.positions = (name, module.num_embeddings)
        return pre_hook

    for name, module in inner.named_modules():
        if isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with eval_mode(inner), one_cpu_thread(device):
            caller(inner, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "right_padded": True})
    except Exception:  # noqa: BLE001 - any failure here is the real forward's to report, with its message
        pass
    finally:
        for handle in handles:
            handle.remove()
    return roles
