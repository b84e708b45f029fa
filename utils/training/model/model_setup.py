"""How a run calls and wraps its model: mask-free calls, the loss path, precision, FSDP sharding, DDP and
``torch.compile``. Decided once, before the optimizer is built (FSDP shards the parameters in place first)."""
from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
from torch import nn

from ..distributed import DistContext, check_precision, set_gradient_sync, shard_model, wrap_model
from ..loss import LossPathChoice, ModelCaller, choose_loss_path, chunked, mask_free_is_exact
from ..data import DataSettings
from ..precision import NumericsSettings, Precision


@dataclass
class ModelSetup:
    caller: ModelCaller  # calls the model (and, on the linear path, its body and head)
    loss_path: LossPathChoice
    precision: str | None  # the autocast dtype's name; None: float32
    amp: Precision  # autocast, GradScaler and the guarded update on this device's type
    train_model: nn.Module  # what training calls: the model, or its DDP / torch.compile wrapper
    sharded: bool  # FSDP2 (``fsdp=True``)

    def gradient_sync(self, model: nn.Module, ctx: DistContext, last_micro_batch: bool):
        """Gradients are reduced across processes on a step's last micro-batch only (accumulation)."""
        if self.sharded:
            set_gradient_sync(model, last_micro_batch)
            return contextlib.nullcontext()
        return self.train_model.no_sync() if ctx.enabled and not last_micro_batch else contextlib.nullcontext()


def set_up_model(model: nn.Module, numerics: NumericsSettings, probe: dict, sizes: tuple[int, int | None], *,
                 data: DataSettings, sharded: bool, ctx: DistContext, device: torch.device) -> ModelSetup:
    """``probe``: one collated batch with padding, on ``device`` (both start-up probes run on it); ``sizes``: the
    pad id and the vocabulary (which tells a tuple output's logits apart); ``data``: the micro-batches' sizes (the
    loss path's memory rule); ``sharded``: FSDP2 (``fsdp=True``)."""
    pad_token_id, vocab_size = sizes
    caller = ModelCaller(model, vocab_size)
    # Only on CUDA, where it unlocks the flash kernel; on CPU it was not measured to help.
    caller.mask_free = device.type == "cuda" and mask_free_is_exact(model, caller, probe)
    # Losses from hidden states and the head's weight (no full logits) only where that is the model's own loss
    # by construction and saves memory; the bound on a micro-batch's positions is for the memory rule.
    positions = max(data.batch_size, probe["input_ids"].shape[0]) * probe["input_ids"].shape[1]
    loss_path = choose_loss_path(model, caller, probe, pad_token_id, requested=numerics.loss_path,
                                 micro_batch_positions=max(positions, data.max_tokens_per_batch or 0))
    precision = numerics.autocast_dtype(device)
    if sharded:  # in place, before the optimizer sees its (DTensor) parameters
        precision = check_precision(device, precision, numerics.requested_precision)
        shard_model(model, device, precision)
        # The linear path calls the body and reads the head's weight outside the root's forward, where FSDP
        # has not gathered the root's shards: the chunked loss over the model's own logits.
        caller.output_layer = None
        loss_path = chunked("FSDP: the head's weight is sharded outside the root's forward")
    # Autocast and GradScaler on this device's type (CPU autocast too, when asked for): one code path. Sharded:
    # FSDP's MixedPrecisionPolicy casts instead of autocast.
    amp = Precision(precision, device.type, use_autocast=not sharded)
    train_model = model if sharded else wrap_model(torch.compile(model) if numerics.compile else model, ctx, device)
    if train_model is not model and loss_path.path == "linear":
        caller.output_layer = None  # one path for training and validation: the wrapper's own forward
        loss_path = chunked("a DDP or torch.compile wrapper goes through its own forward")
    return ModelSetup(caller, loss_path, precision, amp, train_model, sharded)
