"""The masked LM loss from hidden states and the output layer, without ever building the full logits.

``linear_masked_lm_loss(hidden, weight, bias, input_ids, ...)`` returns the same :class:`TokenSums` as
``masked_lm_loss(F.linear(hidden, weight, bias), input_ids, ...)`` (to float32 summation order), but computes
each chunk's logits, its loss and accuracy, and drops it; backward recomputes each chunk's logits and turns
them straight into the chunk's share of the gradients of ``hidden``, ``weight`` and ``bias``. Peak memory is a
few chunks of float32 logits (:func:`loss.rows_per_chunk`), not ``(batch, seq, vocab)`` several times over.
Plain PyTorch: the same code on CPU and GPU.

Which models take this path is decided once at start-up (:func:`model_call.output_layer_of` and the exactness
probe in :mod:`model_call`): Hugging Face causal LMs through ``get_output_embeddings()`` and their base model,
and a user's ``nn.Module`` that defines both

* ``forward_hidden(input_ids) -> (batch, seq, d_model)`` hidden states, and
* ``output_head``: the ``nn.Linear`` such that ``forward(input_ids) == output_head(forward_hidden(input_ids))``.

Anything else keeps its own forward and the chunked loss over its logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masked import TokenSums, chunk_logits_grad, chunk_loss_and_correct, flat_targets, rows_per_chunk, sums_from


def _autocast_state(device_type: str):
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, (torch.get_autocast_dtype(device_type) if enabled else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss sum and correct count of ``F.linear(hidden, weight, bias)`` against ``targets``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        # Under autocast the chunk's logits come out in the autocast dtype, as the model's own head would give them;
        # the loss upcasts each chunk. Backward re-enters the same autocast state to recompute identical logits.
        ctx.device_type = hidden.device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        loss_sum = correct = None
        log_sum_exp = []
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = F.linear(hidden[start:start + chunk_rows], weight, bias)
            loss, right, lse = chunk_loss_and_correct(logits, targets[start:start + chunk_rows])
            loss_sum = loss if loss_sum is None else loss_sum + loss
            correct = right if correct is None else correct + right
            log_sum_exp.append(lse)
        if loss_sum is None:  # no rows at all
            loss_sum, correct = hidden.new_zeros((), dtype=torch.float32), targets.new_zeros(())
        ctx.save_for_backward(hidden, weight, bias, targets,
                              torch.cat(log_sum_exp) if log_sum_exp else loss_sum.new_zeros(0))
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, bias, targets, log_sum_exp = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        enabled, dtype = ctx.autocast
        rows = ctx.chunk_rows
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], rows):
                chunk = hidden[start:start + rows]
                logits = F.linear(chunk, weight, bias)
                # d loss / d logits, in the logits' own dtype: what the model's head would receive in backward.
                grad = chunk_logits_grad(logits, log_sum_exp[start:start + rows], targets[start:start + rows],
                                         grad_loss, out=logits).to(logits.dtype)
                if needs_hidden:
                    grad_hidden[start:start + rows] = grad @ weight.to(grad.dtype)
                if needs_weight and grad.dtype == grad_weight.dtype == chunk.dtype:
                    grad_weight.addmm_(grad.t(), chunk)  # float32 without autocast: no weight-sized temporary
                elif needs_weight:
                    grad_weight += grad.t() @ chunk.to(grad.dtype)
                if needs_bias:
                    grad_bias += grad.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def linear_masked_lm_loss(hidden, weight, bias, input_ids, labels=None, attention_mask=None, pad_token_id=None,
                          chunk_rows: int | None = None) -> TokenSums:
    """:func:`loss.masked_lm_loss` of ``F.linear(hidden, weight, bias)``, never holding those logits whole.

    ``hidden`` is ``(batch, seq, d_model)`` aligned with ``input_ids``; ``weight`` is ``(vocab, d_model)``.
    Chunks hold ``chunk_rows`` rows (default: :func:`loss.rows_per_chunk` of the vocabulary). Batches reach it
    collated, with their attention mask, so the pad == EOS rule of unmasked lines has already been applied.
    """
    return linear_lm_sums(hidden, weight, bias, flat_targets(input_ids, labels, attention_mask, pad_token_id),
                          chunk_rows)


def linear_lm_sums(hidden, weight, bias, targets, chunk_rows: int | None = None) -> TokenSums:
    """:func:`linear_masked_lm_loss` with its targets already computed (a ``(targets, counted_rows)`` pair of
    :func:`loss.flat_targets`)."""
    flat, counted_rows = targets
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    loss_sum, correct = _LinearCrossEntropy.apply(flat_hidden, weight, bias, flat,
                                                  chunk_rows or rows_per_chunk(weight.shape[0]))
    return sums_from(loss_sum, correct, flat, counted_rows)
