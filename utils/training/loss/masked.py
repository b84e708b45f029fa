"""The one masked causal-LM loss of the package, and the one rule for which targets count.

Every loss, accuracy and perplexity number (training, validation, search, benchmarks)
comes from :func:`masked_lm_loss`; the collator, the target counter and the loss all take
"which positions are real" from :func:`real_token_mask` and "which targets count" from
:func:`shifted_targets`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class TokenSums:
    """Sums over target positions: add them up anywhere (steps, epochs, processes), divide once.

    Fields are tensors on the device inside a step (``loss_sum`` may carry a gradient) and plain
    floats once read back with :meth:`from_tensor`. ``positions`` counts the shifted target positions,
    real or padding, of the rows that have a real target, so ``positions - real_targets`` is the padding
    that was computed; rows without one (the non-counting repeats that even out processes and
    micro-batches) are neither padding nor sequences.
    """

    loss_sum: torch.Tensor | float = 0.0  # summed per-token cross-entropy over real targets (nats)
    real_targets: torch.Tensor | float = 0.0
    correct: torch.Tensor | float = 0.0  # predictions whose target logit is the row's maximum (ties count)
    positions: torch.Tensor | float = 0.0
    sequences: torch.Tensor | float = 0.0  # rows with at least one real target

    def __add__(self, other: TokenSums) -> TokenSums:
        return TokenSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self, device=None) -> torch.Tensor:
        """The sums as one detached float64 tensor: one device read or one all-reduce for all of them."""
        values = [v.detach().double().reshape(()) if isinstance(v, torch.Tensor)
                  else torch.tensor(float(v), dtype=torch.float64)
                  for v in (getattr(self, f.name) for f in fields(self))]
        device = device or next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
        return torch.stack([v.to(device) for v in values])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> TokenSums:
        return cls(*values.tolist())

    @property
    def loss(self) -> float:
        """Mean cross-entropy per real target; 0 when nothing counted (never a division by zero)."""
        return float(self.loss_sum) / max(float(self.real_targets), 1.0)

    @property
    def accuracy(self) -> float:
        return float(self.correct) / max(float(self.real_targets), 1.0)

    @property
    def padded_positions(self) -> float:
        return float(self.positions) - float(self.real_targets)

    @property
    def pad_fraction(self) -> float:
        return self.padded_positions / max(float(self.positions), 1.0)


def real_token_mask(input_ids: torch.Tensor, attention_mask=None, pad_token_id=None,
                    pad_is_eos: bool = False) -> torch.Tensor:
    """Boolean ``(batch, seq)``: which positions hold real tokens.

    With an attention mask, the mask says so. Without one, only a *trailing* run of pad ids is
    padding: a pad id followed by real tokens is a real token. When the pad id is also the EOS id
    (GPT-2), the first token of that trailing run is the line's real EOS and stays real, as it
    would with a mask. ``[50, 23, 12, 0, 0]`` with pad 0 has 3 real tokens.
    """
    if attention_mask is not None:
        return attention_mask.bool()
    if pad_token_id is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    is_pad = input_ids == pad_token_id
    trailing_pad = is_pad.flip(-1).long().cummin(dim=-1).values.flip(-1).bool()
    if pad_is_eos:
        run_start = trailing_pad & ~torch.cat([trailing_pad.new_zeros(trailing_pad.shape[:-1] + (1,)),
                                               trailing_pad[..., :-1]], -1)
        trailing_pad &= ~run_start
    return ~trailing_pad


def shifted_targets(input_ids, labels=None, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False):
    """Targets for ``logits[:, :-1]``: label ``t+1`` for position ``t``, or IGNORE_INDEX.

    A target counts when its label is not -100, its own position is real and the position that
    predicts it is real (with left padding the first real token is predicted from padding: it
    does not count). Real positions come from :func:`real_token_mask`.
    """
    labels = input_ids if labels is None else labels
    real = real_token_mask(input_ids, attention_mask, pad_token_id, pad_is_eos)
    counted = real[:, 1:] & real[:, :-1]
    return torch.where(counted, labels[:, 1:], IGNORE_INDEX)


def count_real_targets(batch, pad_token_id, pad_is_eos: bool = False) -> torch.Tensor:
    """Real target count of a collated batch, without running the model."""
    targets = shifted_targets(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id,
                              pad_is_eos)
    return (targets != IGNORE_INDEX).sum()


def batch_targets(batch, pad_token_id):
    """:func:`flat_targets` of a collated batch (it carries its mask): computed once per batch where both the loss
    (:meth:`ModelCaller.loss_sums`) and the bytes (:func:`real_target_bytes`) need them."""
    return flat_targets(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"), pad_token_id)


def real_target_bytes(targets, token_bytes: torch.Tensor) -> torch.Tensor:
    """The bytes of text the real targets stand for (``token_bytes[id]`` each; ``targets`` from
    :func:`batch_targets`, the rule that counts them for the loss). Stays on the device."""
    flat = targets[0]
    return torch.where(flat != IGNORE_INDEX, token_bytes[flat.clamp(min=0)], 0).sum()


# Rows of logits per chunk: about this many bytes of float32 per chunk, whatever the vocabulary. 64 MB keeps a
# 50k-vocabulary chunk at ~330 rows (the float32 peak stays a few chunks) while small vocabularies run as one chunk.
CHUNK_BYTES = 64 * 2**20


def rows_per_chunk(vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Rows whose float32 logits take about ``chunk_bytes`` (default :data:`CHUNK_BYTES`); at least one."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * max(int(vocab_size), 1)))


def flat_targets(input_ids, labels=None, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False):
    """``(targets, counted_rows)``: one target per position, flattened (the last position of a row predicts
    nothing and gets IGNORE_INDEX), and which rows have at least one real target."""
    shifted = shifted_targets(input_ids, labels, attention_mask, pad_token_id, pad_is_eos)
    targets = torch.cat([shifted, shifted.new_full((shifted.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    return targets, (shifted != IGNORE_INDEX).any(dim=1)


def sums_from(loss_sum, correct, targets, counted_rows) -> TokenSums:
    """The batch's :class:`TokenSums` from a chunked loss and its flat targets."""
    sequences = counted_rows.sum()
    target_positions_per_row = targets.numel() // max(counted_rows.numel(), 1) - 1  # the last position predicts nothing
    return TokenSums(loss_sum=loss_sum, real_targets=(targets != IGNORE_INDEX).sum(), correct=correct,
                     positions=sequences * target_positions_per_row, sequences=sequences)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the softmax: under bf16/fp16 autocast the log-sum-exp loses precision (float64 stays float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunk_loss_and_correct(chunk_logits: torch.Tensor, targets: torch.Tensor):
    """Summed cross-entropy over the real targets of one chunk of rows, how many are predicted right, and each
    row's log-sum-exp (what backward needs to rebuild the softmax without storing it).

    ``chunk_logits`` is upcast here, one chunk at a time, so no full-size float32 copy ever exists. The loss of a
    row is ``-log_softmax(row)[target]``, summed over real targets only: an excluded target adds exactly
    nothing, and a batch without real targets sums to 0, never NaN. "Correct" is "the target's logit is the
    row's maximum": 8x faster than argmax on CPU (measured); a tie counts.
    """
    logits = chunk_logits.to(loss_dtype(chunk_logits.dtype))
    real = targets != IGNORE_INDEX
    index = targets.clamp(min=0)[:, None]
    # One fused kernel (torch.logsumexp would write a chunk-sized temporary of x - max, then exponentiate it).
    target_log_prob = torch.log_softmax(logits, dim=-1).gather(1, index)[:, 0]
    target_logit = logits.gather(1, index)[:, 0]
    loss_sum = torch.where(real, -target_log_prob, 0.0).sum()
    correct = ((target_logit >= logits.amax(dim=-1)) & real).sum()
    return loss_sum, correct, target_logit - target_log_prob  # log-sum-exp of each row


def chunk_logits_grad(chunk_logits, log_sum_exp, targets, grad_loss, out=None) -> torch.Tensor:
    """d(summed cross-entropy)/d(logits) of one chunk, times ``grad_loss``: ``softmax - one_hot`` on real rows.

    Written into ``out`` when it has the working dtype (no extra chunk-sized tensor). ``out=chunk_logits`` (the
    linear path's recomputed chunk) overwrites the logits and needs the forward's ``log_sum_exp`` of each row;
    otherwise it is unused. Rows of excluded targets are set to exactly zero (even a non-finite logit there
    cannot leak a NaN).
    """
    dtype = loss_dtype(chunk_logits.dtype)
    grad = out if out is not None and out.dtype == dtype else None
    if grad is chunk_logits:
        # In place: exp(logits - log-sum-exp), so the linear path holds one chunk of logits, not two.
        torch.sub(chunk_logits, log_sum_exp[:, None], out=grad).exp_()
    else:
        # One fused kernel that upcasts as it reads. exp(logits - log-sum-exp) took two passes and torch.exp's
        # slower exponential: 3x F.cross_entropy's backward on CPU, and benchmarks/throughput.py trained at
        # 0.93x the tokens/s of 93855a2 (CLAUDE.md "Measured numbers").
        grad = torch.softmax(chunk_logits, dim=-1, dtype=dtype, out=grad)
    real = targets != IGNORE_INDEX
    grad.scatter_add_(1, targets.clamp(min=0)[:, None], -real.to(dtype)[:, None])
    _zero_rows(grad, ~real)
    return grad.mul_(grad_loss.to(dtype))


def _zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> None:
    if grad.device.type == "cpu":
        # Only those rows (a few per chunk): masked_fill_ with a broadcast row mask is a scalar loop over the whole
        # chunk on CPU (3 ms of a 127 ms step of benchmarks/throughput.py). nonzero waits for no device here.
        grad.index_fill_(0, rows.nonzero().squeeze(1), 0.0)
    else:  # nonzero would be a host read of the device
        grad.masked_fill_(rows[:, None], 0.0)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss sum and correct count over row chunks of ``(rows, vocab)`` logits.

    Saves the logits (which exist anyway) and the targets; backward recomputes each chunk's softmax into one
    gradient tensor of the logits' dtype. ``F.cross_entropy`` over the whole batch would keep a
    full float32 log-softmax for backward, and its backward would add a full float32 gradient of it.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        loss_sum = logits.new_zeros((), dtype=loss_dtype(logits.dtype))
        correct = targets.new_zeros(())
        for start in range(0, logits.shape[0], chunk_rows):
            loss, right, _ = chunk_loss_and_correct(logits[start:start + chunk_rows], targets[start:start + chunk_rows])
            loss_sum += loss
            correct += right
        ctx.save_for_backward(logits, targets)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        rows = ctx.chunk_rows
        for start in range(0, logits.shape[0], rows):
            part = slice(start, start + rows)
            chunk = chunk_logits_grad(logits[part], None, targets[part], grad_loss, out=grad[part])
            if chunk.data_ptr() != grad[part].data_ptr():  # computed in float32 for half-precision logits
                grad[part] = chunk
        return grad, None, None


def masked_lm_loss(logits, input_ids, labels=None, attention_mask=None, pad_token_id=None, pad_is_eos: bool = False,
                   chunk_rows: int | None = None) -> TokenSums:
    """Summed cross-entropy, real-target count, correct count and positions of one batch.

    ``logits`` is ``(batch, seq, vocab)`` aligned with ``input_ids``; the shift happens here.
    Computed over chunks of ``chunk_rows`` rows (default: :func:`rows_per_chunk`), each upcast to float32
    on its own. Excluded targets get ``ignore_index``: zero loss and exactly zero gradient. A batch with
    no real target returns zeros, never NaN.
    """
    return chunked_lm_sums(logits, flat_targets(input_ids, labels, attention_mask, pad_token_id, pad_is_eos),
                           chunk_rows)


def chunked_lm_sums(logits, targets, chunk_rows: int | None = None) -> TokenSums:
    """:func:`masked_lm_loss` with its targets already computed (:func:`flat_targets`, a ``(targets,
    counted_rows)`` pair): the one computation both share."""
    flat, counted_rows = targets
    # A view, not a copy: the last position's ignored target replaces slicing (batch, seq - 1, vocab).
    flat_logits = logits.reshape(-1, logits.shape[-1])
    loss_sum, correct = _ChunkedCrossEntropy.apply(flat_logits, flat, chunk_rows or rows_per_chunk(logits.shape[-1]))
    return sums_from(loss_sum, correct, flat, counted_rows)
