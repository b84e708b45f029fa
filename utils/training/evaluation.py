"""One validation pass: token-weighted sums over every real target of a source, in eval mode."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .distributed import DistContext, all_reduce_sum, is_sharded
from .data import to_device
from .loss import ModelCaller, TokenSums, batch_targets, bits_per_byte, eval_mode, real_target_bytes, unwrap
from .metrics import safe_exp


@dataclass(frozen=True)
class EvalCall:
    """How each validation batch is computed and counted: the model call (None: a plain ``ModelCaller``), the
    autocast context, and ``token_bytes`` (bytes per token id, a tensor on the device) for bits per byte."""

    caller: ModelCaller | None = None
    autocast: object = contextlib.nullcontext
    token_bytes: torch.Tensor | None = None


def evaluate(model, source, pad_token_id: int, *, batch_size: int, device, ctx: DistContext | None = None,
             call: EvalCall = EvalCall()) -> dict:
    """Loss, perplexity, accuracy and token counts over all real targets of ``source`` (every process's shard);
    with ``call.token_bytes`` also the bytes those targets stand for and bits per byte, from the same loss sums
    (``bits_per_byte`` None without it).

    The sums stay on the device until the end: one all-reduce and one host read per pass.
    """
    model = unwrap(model)  # DDP's forward would sync buffers; shards here may differ in batch count
    ctx = ctx or DistContext()
    caller, autocast, token_bytes = call.caller or ModelCaller(model), call.autocast, call.token_bytes
    totals, target_bytes = TokenSums(), torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model):
        for planned in source.eval_plan(batch_size, world_size=ctx.world_size, rank=ctx.rank):
            batch = to_device(source.collate(planned), device)
            targets = batch_targets(batch, pad_token_id)  # once, for the loss and the bytes
            with autocast():
                totals += caller.loss_sums(model, batch, pad_token_id, targets)
            if token_bytes is not None:
                target_bytes += real_target_bytes(targets, token_bytes)
    summed = all_reduce_sum(torch.cat([totals.as_tensor(device), target_bytes.reshape(1)]), ctx)
    summed = summed.cpu()  # the pass's one host read
    totals, target_bytes = TokenSums.from_tensor(summed[:-1]), float(summed[-1])
    if is_sharded(model):  # no backward follows to reshard the root: free its gathered weights now
        model.reshard()
    return {"loss": totals.loss, "perplexity": safe_exp(totals.loss), "accuracy": totals.accuracy,
            "real_tokens": int(totals.real_targets), "padded_tokens": int(totals.padded_positions),
            "bits_per_byte": None if token_bytes is None else bits_per_byte(totals.loss_sum, target_bytes),
            "target_bytes": None if token_bytes is None else int(target_bytes)}
