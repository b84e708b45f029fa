"""One validation pass: token-weighted sums over every real target of a source, in eval mode."""
from __future__ import annotations

import contextlib

from .distributed import DistContext, all_reduce_sum, is_sharded
from .data import to_device
from .loss import ModelCaller, TokenSums, eval_mode, unwrap
from .metrics import safe_exp


def evaluate(model, source, pad_token_id: int, *, batch_size: int, device, caller: ModelCaller | None = None,
             ctx: DistContext | None = None, autocast=contextlib.nullcontext) -> dict:
    """Loss, perplexity, accuracy and token counts over all real targets of ``source`` (every process's shard).

    The sums stay on the device until the end: one all-reduce and one host read per pass.
    """
    model = unwrap(model)  # DDP's forward would sync buffers; shards here may differ in batch count
    ctx = ctx or DistContext()
    caller = caller or ModelCaller(model)
    totals = TokenSums()
    with eval_mode(model):
        for planned in source.eval_plan(batch_size, world_size=ctx.world_size, rank=ctx.rank):
            batch = to_device(source.collate(planned), device)
            with autocast():
                totals += caller.loss_sums(model, batch, pad_token_id)
    totals = TokenSums.from_tensor(all_reduce_sum(totals.as_tensor(device), ctx))  # the pass's one host read
    if is_sharded(model):  # no backward follows to reshard the root: free its gathered weights now
        model.reshard()
    return {"loss": totals.loss, "perplexity": safe_exp(totals.loss), "accuracy": totals.accuracy,
            "real_tokens": int(totals.real_targets), "padded_tokens": int(totals.padded_positions)}
