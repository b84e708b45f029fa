"""Start-up probes of the model's behaviour: what a causal LM must do, checked on a few real lines before step 1.

Three probes, each one or two evaluation-mode forwards of two lines of ``PROBE_LENGTH`` tokens made from the user's
own data (real lines joined, so a short-line corpus still reaches positions past 17):

* ``"examples"`` - changing one example of a batch leaves the other's logits unchanged, each way round (a
  sequence-first layer fed batch-first tensors, or a normalisation over the batch, mixes them; a sequence-first
  RNN only one way);
* ``"causal"`` - changing the tokens after position t leaves the logits at positions <= t unchanged, for every t
  in steps of ``CAUSAL_STRIDE`` and the last one (all in one batch of rows, run after ``"examples"`` passed); then
  on two rows as long as the data's longest line (at most ``LONG_PROBE_LENGTH``) that differ in their last token,
  for a mask that fails only from a later position;
* ``"padding"`` - the real positions' logits do not change when the batch is padded further on the right by
  ``EXTRA_PADDING``. Left padding (models that take an ``attention_mask``) is measured and recorded, not refused:
  the package never gives a model left padding (it moves it to the right).

After a failure the first forward is repeated: a model whose evaluation-mode forwards differ by themselves (an
``F.dropout`` left at its default ``training=True``) cannot be judged, so it is warned, not refused, and its probes
are reported as not run.

A failure is refused before any optimizer step, naming the module that explains it where one does
(:mod:`suspects`) and the fix; ``skip_model_checks`` opts out of a probe for a model meant to differ (a
prefix LM). ``results["model_checks"]`` says what ran and what it found.

Tolerance (CLAUDE.md, "Float tolerances"): the compared forwards differ only in batch shape and in values the
compared positions must not depend on, so a correct model differs by float32 re-association alone: at most
``terms * eps`` relative to the logits' magnitude, ``terms`` = the longest sum in the forward (the widest layer or
the probe's positions) times the number of layers whose rounding adds up. A real leak moves logits by percent.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..loss import ModelCaller, eval_mode, hf_causal_lm_class_names, unwrap
from ..reproducibility import one_cpu_thread
from ..warn import caller_stacklevel
from .model_settings import MODEL_CHECKS as PROBES
from .suspects import Suspects, watch

PROBE_LENGTH = 24  # positions probed; > 17 so a mask that fails from a middle position on is reached
# One more forward of two lines this long (at most; never longer than the data's longest line or the model's
# positions) that differ in their last token only: a position up to here that sees the future moves. Catches a mask
# that fails from any position under it (from 40, from 100) at the cost of 2 x 128 tokens (the probes above: 368).
LONG_PROBE_LENGTH = 128
EXTRA_PADDING = 8  # pad positions added on the right (and, where a mask is taken, on the left)
CAUSAL_STRIDE = 8  # cutoffs t = 0, 8, 16, ... and the last position but one
EPS32 = torch.finfo(torch.float32).eps


@dataclass
class ProbeLines:
    """Two real lines of equal length, the tokens that replace them, and the pad id."""

    lines: torch.Tensor  # (2, length) long
    replacements: torch.Tensor  # (2, length): never equal to lines
    pad_token_id: int
    extra_padding: int = EXTRA_PADDING  # pad positions the padding probe adds (fewer for a model of few positions)
    long_rows: torch.Tensor | None = None  # (2, long length): a longer line, then the same with another last token


def probe_lines(batches: list[Mapping], vocab_size: int, pad_token_id: int, length: int, seed: int,
                extra_padding: int = EXTRA_PADDING, long_length: int = 0) -> ProbeLines:
    """Two lines of ``length`` real tokens from ``batches`` (their real positions joined in order and cycled), and
    where ``long_length`` exceeds it the two long rows of the long causal check."""
    pool = torch.cat([batch["input_ids"][row][batch["attention_mask"][row].bool()].cpu()
                      for batch in batches for row in range(batch["input_ids"].shape[0])])
    generator = torch.Generator().manual_seed(seed)
    start = int(torch.randint(len(pool), (1,), generator=generator))
    index = (start + torch.arange(2 * length)) % len(pool)
    lines = pool[index].view(2, length).long()
    # Another id at every position, drawn uniformly among the others (an offset of 1..vocab-1 modulo the vocabulary).
    offsets = torch.randint(1, max(vocab_size, 2), lines.shape, generator=generator)
    long_rows = None
    if long_length > length + 1:
        line = pool[(start + torch.arange(long_length)) % len(pool)].long()
        long_rows = torch.stack([line, line.clone()])
        long_rows[1, -1] = (line[-1] + int(torch.randint(1, max(vocab_size, 2), (1,), generator=generator))) % max(
            vocab_size, 2)
    return ProbeLines(lines, (lines + offsets) % max(vocab_size, 2), pad_token_id, extra_padding, long_rows)


def probe_sizes(limit: int | None, longest: int) -> tuple[int, int]:
    """Positions to probe and pad positions after them: ``PROBE_LENGTH`` and ``EXTRA_PADDING``, fewer when the
    model's positions (declared, or the longest line its first forward took when nothing declares them) leave no
    room; a model of fewer than 16 positions gets about half of them each (8 positions: 4 probed, 4 padding)."""
    room = limit if limit is not None else longest
    padding = min(EXTRA_PADDING, max(1, room // 2))
    return max(2, min(PROBE_LENGTH, room - padding)), padding


# Sizes of the longest line a model takes, as its config or the model itself names them where the fields
# checks.max_positions reads (n_positions, max_position_embeddings) are absent: nanoGPT's block_size, GPT-2's n_ctx,
# Llama-style max_seq_len and others. They only bound the probes' length here (probing fewer positions is harmless);
# the lines of the data are checked against declared positions only.
BLOCK_SIZE_NAMES = ("block_size", "n_ctx", "max_seq_len", "max_seq_length", "max_sequence_length", "context_length")


def declared_block_size(model: nn.Module) -> int | None:
    """The longest line ``model`` says it takes where no position table or declared position count did: a block
    size in ``model.config`` or on the model (:data:`BLOCK_SIZE_NAMES`), else the size of a square causal-mask
    table among its buffers (nanoGPT's ``bias`` of shape (1, 1, T, T): attention slices it to the line's length);
    None when nothing says."""
    inner = unwrap(model)
    for holder in (getattr(inner, "config", None), inner):
        for name in BLOCK_SIZE_NAMES:
            try:
                value = getattr(holder, name, None) if holder is not None else None
            except Exception:  # noqa: BLE001 - a property that fails says nothing about the model's length
                value = None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    tables = [int(buffer.shape[-1]) for buffer in inner.buffers() if _is_causal_mask_table(buffer)]
    return min(tables) if tables else None


def _is_causal_mask_table(buffer: torch.Tensor) -> bool:
    """One square (T, T) table (leading dimensions of size 1) of two values, triangular: a causal mask built for
    lines of up to T tokens (ones below the diagonal, or -inf above it)."""
    if buffer.dim() < 2 or buffer.shape[-1] != buffer.shape[-2] or buffer.shape[-1] < 2 or buffer.is_meta:
        return False
    if buffer.numel() != buffer.shape[-1] ** 2 or buffer.numel() > 1 << 24 or buffer.is_complex():
        return False
    table = buffer.reshape(buffer.shape[-2:])
    above = torch.unique(table[torch.triu(torch.ones_like(table, dtype=torch.bool), diagonal=1)])
    below = torch.unique(table[torch.tril(torch.ones_like(table, dtype=torch.bool), diagonal=-1)])
    # One value strictly above the diagonal, another strictly below (and on it): a 0/1 tril, a bool mask, 0/-inf.
    return len(above) == 1 and len(below) == 1 and not torch.equal(above, below) and len(torch.unique(table)) == 2


def trusted_by_construction(model: nn.Module) -> str | None:
    """Why a model needs no probe: a Hugging Face decoder-only causal LM whose forward is transformers' own, without
    hooks (causal, per-example and right-padding-exact by construction); None for every other model."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or "forward" in vars(inner):
        return None
    owner = next(klass for klass in type(inner).__mro__ if "forward" in vars(klass))
    if type(inner).__name__ not in hf_causal_lm_class_names() or not owner.__module__.startswith("transformers."):
        return None
    if any(getattr(module, kind) for module in inner.modules()
           for kind in ("_forward_pre_hooks", "_forward_hooks")):
        return None
    return (f"{type(inner).__name__} is a Hugging Face causal LM whose forward is transformers' own: causal, "
            "per-example and exact under right padding by construction")


class ModelProbes:
    """Runs the probes on one model; ``report`` collects what each found, ``refusal`` the first failure's message."""

    def __init__(self, model: nn.Module, lines: ProbeLines, skip: tuple = (), vocab_size: int | None = None):
        self.model, self.lines, self.skip = model, lines, tuple(skip)
        self.caller = ModelCaller(model, vocab_size)
        self.report: dict = {}
        self.suspects = Suspects()
        self.upcast = False  # half-precision weights cast to float32 for the probes (float32_weights)
        self.terms = _rounding_terms(model, lines.lines.shape[1] + lines.extra_padding)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        device = base_device(self.model)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "right_padded": True}
        return self.caller(self.model, batch).float().cpu()

    def tolerance(self, logits: torch.Tensor, positions: int | None = None) -> float:
        """Rounding allowed in ``logits`` (lines of the probe length, or of ``positions`` tokens)."""
        terms = self.terms if positions is None else _rounding_terms(self.model, positions)
        eps = torch.finfo(next(self.model.parameters()).dtype).eps  # half-precision weights round more
        return terms * max(eps, EPS32) * max(float(logits.abs().max()), EPS32)

    def run(self) -> str | None:
        """Every probe not skipped; the refusal message of the first that failed (examples, causal, padding)."""
        lines = self.lines.lines
        with eval_mode(self.model), full_float32_matmuls(), one_cpu_thread(base_device(self.model)), \
                float32_weights(self.model) as upcast:
            self.upcast = upcast
            with watch(unwrap(self.model), tuple(lines.shape)) as self.suspects:
                base = self.forward(lines)
            tolerance = self.tolerance(base)
            failures = []
            for name, probe in (("examples", self.examples), ("causal", self.causal), ("padding", self.padding)):
                if name in self.skip:
                    self.report[name] = {"ran": False, "why": "skip_model_checks"}
                    continue
                message = probe(base, tolerance)
                if message:
                    failures.append(message)
                    break  # the later probes batch rows together or read positions: not meaningful after a failure
            if failures:
                # Only after a failure (free for a model that passes): is the model random in evaluation mode?
                randomness = float((self.forward(lines) - base).abs().max())
                if randomness > tolerance:
                    self.report = {name: {"ran": False, "why": RANDOM_IN_EVAL, "max_difference": randomness}
                                   for name in PROBES}
                    warnings.warn(random_message(randomness, tolerance), UserWarning, stacklevel=caller_stacklevel())
                    return None
        return failures[0] if failures else None

    def _record(self, name: str, difference: float, tolerance: float, **found) -> bool:
        passed = difference <= tolerance
        self.report[name] = {"ran": True, "passed": passed, "max_difference": difference, "tolerance": tolerance,
                             **found}
        if self.upcast:
            self.report[name]["weights"] = "float32 during the probes (half precision restored exactly after)"
        return passed

    # -- the probes ------------------------------------------------------------------------------------------
    def examples(self, base: torch.Tensor, tolerance: float) -> str | None:
        # Each way round: a sequence-first layer that is causal along what it takes for the sequence (a masked
        # encoder, an LSTM, a cumulative sum over dim 0) lets example 2 read example 1 but never the reverse; a
        # reversed one the other way. Missed here, either would fail the causal probe under the wrong cause.
        difference = 0.0
        for changed_row, kept_row in ((0, 1), (1, 0)):
            changed = self.lines.lines.clone()
            changed[changed_row] = self.lines.replacements[changed_row]
            difference = max(difference, float((self.forward(changed)[kept_row] - base[kept_row]).abs().max()))
        if self._record("examples", difference, tolerance):
            return None
        return examples_message(difference, tolerance, self.suspects)

    def causal(self, base: torch.Tensor, tolerance: float) -> str | None:
        line, replacement = self.lines.lines[0], self.lines.replacements[0]
        length = len(line)
        cutoffs = sorted(set(range(0, length - 1, CAUSAL_STRIDE)) | {length - 2})
        rows = line.repeat(len(cutoffs), 1)
        for row, cutoff in enumerate(cutoffs):
            rows[row, cutoff + 1:] = replacement[cutoff + 1:]
        logits = self.forward(rows)
        first, worst = None, 0.0
        for row, cutoff in enumerate(cutoffs):
            moved = (logits[row, :cutoff + 1] - base[0, :cutoff + 1]).abs().amax(dim=-1)
            worst = max(worst, float(moved.max()))
            bad = torch.nonzero(moved > tolerance).flatten()
            if len(bad) and (first is None or int(bad[0]) < first[0]):
                first = (int(bad[0]), cutoff)
        found = {"first_position_seeing_future": None if first is None else first[0], "positions_probed": length}
        if self._record("causal", worst, tolerance, **found):
            return self.causal_far() if self.lines.long_rows is not None else None
        # Only after a failure: the failing row alone. Unchanged alone, it moved with the other rows of its batch
        # (a model that couples examples only in batches over 2): that is the cause to name, not the future.
        row = cutoffs.index(first[1])
        alone = self.forward(rows[row:row + 1])[0, :first[1] + 1]
        if float((alone - base[0, :first[1] + 1]).abs().max()) <= tolerance:
            self.report["causal"]["mixes_examples_of_a_batch_of"] = len(cutoffs)
            return examples_message(worst, tolerance, self.suspects, rows=len(cutoffs))
        return causal_message(first, worst, tolerance, self.suspects)

    def causal_far(self) -> str | None:
        """The long check: two rows that differ in their last token only, one forward (the rows are independent:
        the examples probe passed); a position before the last that moved sees the future. Watched again, so a
        mask that leaks only at this length is the one named."""
        rows = self.lines.long_rows
        length = rows.shape[1]
        with watch(unwrap(self.model), tuple(rows.shape)) as suspects:
            logits = self.forward(rows)
        tolerance = self.tolerance(logits, positions=length)
        moved = (logits[1, :length - 1] - logits[0, :length - 1]).abs().amax(dim=-1)
        worst = float(moved.max())
        bad = torch.nonzero(moved > tolerance).flatten()
        report = self.report["causal"]
        report.update(long_positions_probed=length, long_max_difference=worst, long_tolerance=tolerance)
        if not len(bad):
            return None
        report.update(passed=False, first_position_seeing_future=int(bad[0]), max_difference=worst,
                      tolerance=tolerance)
        return causal_message((int(bad[0]), length - 2), worst, tolerance, suspects)

    def padding(self, base: torch.Tensor, tolerance: float) -> str | None:
        lines, pad, extra = self.lines.lines, self.lines.pad_token_id, self.lines.extra_padding
        length = lines.shape[1]
        pads = torch.full((2, extra), pad, dtype=lines.dtype)
        real, none = torch.ones_like(lines), torch.zeros_like(pads)
        right = self.forward(torch.cat([lines, pads], 1), torch.cat([real, none], 1))[:, :length]
        difference = float((right - base).abs().max())
        found = {"extra_pad_positions": extra}
        if self.caller.accepts_attention_mask:
            left = self.forward(torch.cat([pads, lines], 1), torch.cat([none, real], 1))[:, extra:]
            left_difference = float((left - base).abs().max())
            found["left_max_difference"] = left_difference
            found["left"] = ("unchanged" if left_difference <= tolerance else
                             "changed (recorded, not refused: the package pads on the right only)")
        if self._record("padding", difference, tolerance, **found):
            return None
        return padding_message(difference, tolerance, extra)


@contextlib.contextmanager
def float32_weights(model: nn.Module):
    """Half-precision weights and buffers in float32 for the block, then each back to its own dtype (exact: every
    bfloat16/float16 value is a float32). Without it the float32 bound scaled by bfloat16's eps (2^-7) exceeded the
    logits themselves and no leak was seen (a model without a causal mask in bfloat16 passed every probe). Costs a
    float32 copy of the weights (less than training's weights, gradients and AdamW state); where that does not fit
    (GPU out of memory) the probes run in the weights' own dtype, with its looser tolerance. Yields whether it cast."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in tensors]
    cast = 0
    try:
        for tensor in tensors:
            tensor.data = tensor.data.float()
            cast += 1
    except torch.OutOfMemoryError:
        pass
    upcast = bool(tensors) and cast == len(tensors)
    if not upcast:
        _restore(tensors[:cast], dtypes)
    try:
        yield upcast
    finally:
        if upcast:
            _restore(tensors, dtypes)


def _restore(tensors: list, dtypes: list) -> None:
    for tensor, dtype in zip(tensors, dtypes):
        tensor.data = tensor.data.to(dtype)


def base_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def full_float32_matmuls():
    """TF32 off for the probes (its 10-bit mantissa would make the float32 bound meaningless on a GPU)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _rounding_terms(model: nn.Module, positions: int) -> int:
    """``terms`` of the tolerance: the longest sum (the widest dimension of a weight matrix other than the
    vocabulary, or the positions an attention row sums over) times the layers whose rounding errors add up
    (the weight matrices, each one matmul deep)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vocab_rows = max((p.shape[0] for p in matrices), default=0)
    widest = max([positions] + [d for p in matrices for d in p.shape[-2:] if d != vocab_rows])
    return widest * max(1, len(matrices))


# -- messages ------------------------------------------------------------------------------------------------
def _names(labels: list[str]) -> str:
    return ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")


def _sizes(difference: float, tolerance: float) -> str:
    return f"by up to {difference:.3g} (float32 rounding allows {tolerance:.2g})"


def examples_message(difference: float, tolerance: float, suspects: Suspects, rows: int = 2) -> str:
    changed = ("changing one example of a 2-example batch changed the other's logits" if rows == 2 else
               f"in a batch of {rows} examples one example's logits differed from the same line run alone (a batch of "
               "2 showed nothing)")
    head = (f"The model mixes the examples of a batch: {changed} {_sizes(difference, tolerance)}, so every example's "
            "loss depends on what else is in its batch and the numbers change with the batch size. ")
    if suspects.sequence_first:
        cause = (f"{_names(suspects.sequence_first)} {'is' if len(suspects.sequence_first) == 1 else 'are'} "
                 "sequence-first (batch_first=False, torch's default) but received (batch, seq, ...) tensors, so "
                 "it treats the batch as the sequence: build it with batch_first=True (or transpose its input).")
    elif suspects.batch_norms:
        cause = (f"{_names(suspects.batch_norms)} normalise over the batch (no running statistics): normalise over "
                 "the features instead (nn.LayerNorm(d_model)).")
    else:
        cause = ("Likely causes: a sequence-first layer (nn.TransformerEncoderLayer, nn.MultiheadAttention, nn.LSTM "
                 "with batch_first=False, their default) fed (batch, seq) tensors - pass batch_first=True; or a "
                 "normalisation over the batch dimension (a mean or norm over dim 0) - normalise over the features.")
    return head + cause + " A model meant to couple its examples: skip_model_checks=('examples',)."


def causal_message(first: tuple[int, int] | None, difference: float, tolerance: float, suspects: Suspects) -> str:
    position, cutoff = first if first is not None else (0, 0)
    head = (f"The model sees the future: the logits at position {position} (counting from 0) changed "
            f"{_sizes(difference, tolerance)} when only the tokens after position {cutoff} changed, so a position "
            "can read the token it is asked to predict (the training loss falls towards 0 and the model is useless "
            "for generation). ")
    if position > 0:
        head += f"Positions before {position} do not: the model sees ahead from position {position} on. "
    if suspects.leaky_masks:
        module, row = suspects.leaky_masks[0]
        cause = (f"The attention mask given to {module} lets row {row} attend to later columns: build it with "
                 "nn.Transformer.generate_square_subsequent_mask(seq_len) (and pass is_causal=True).")
    elif suspects.unmasked_attention:
        cause = (f"{_names(suspects.unmasked_attention)} ran without a causal mask: pass "
                 "mask=nn.Transformer.generate_square_subsequent_mask(seq_len) and is_causal=True (with "
                 "F.scaled_dot_product_attention: is_causal=True).")
    elif suspects.sequence_norms or suspects.masked_attention:
        norms = (f"{_names(suspects.sequence_norms)} normalise over the sequence" if suspects.sequence_norms else
                 "every attention layer had a causal mask, so likely a normalisation, mean or pooling over the "
                 "sequence dimension (dim 1)")
        cause = (f"{norms}: it mixes later positions into earlier ones. Normalise over the features "
                 "(nn.LayerNorm(d_model)), or over the positions up to each one only.")
    else:
        cause = ("Likely causes: attention without a causal mask (pass mask=nn.Transformer."
                 "generate_square_subsequent_mask(seq_len) and is_causal=True; F.scaled_dot_product_attention("
                 "..., is_causal=True)), or a normalisation or mean over the sequence dimension.")
    return (head + cause + " A model meant to see ahead (a prefix LM, a bidirectional encoder): "
            "skip_model_checks=('causal',).")


RANDOM_IN_EVAL = "the model draws random numbers in evaluation mode: its forwards cannot be compared"


def random_message(difference: float, tolerance: float) -> str:
    return (f"The model draws random numbers in evaluation mode: two identical evaluation-mode forwards differed "
            f"{_sizes(difference, tolerance)}, so the start-up probes (causal, examples, padding) cannot judge it and "
            "did not run (results['model_checks'] says so), and its validation losses are noisy. The usual cause: "
            "F.dropout(x, p) defaults to training=True, also in evaluation mode: pass training=self.training, or use "
            "an nn.Dropout module (model.eval() switches it off).")


def padding_message(difference: float, tolerance: float, extra_padding: int) -> str:
    return (f"The model's predictions depend on the padding after them: with {extra_padding} more pad positions on "
            f"the right the logits at the real positions changed {_sizes(difference, tolerance)}, so the same text "
            "scores differently in every batch. Likely causes: a normalisation or scale over the padded length (a "
            "mean or sum over the sequence dimension, a division by seq_len), or an attention mask applied the wrong "
            "way round (1 = real token, 0 = padding). A model meant to differ: skip_model_checks=('padding',).")


def probe_model(model: nn.Module, source, *, vocab_size: int, pad_token_id: int, limit: int | None, skip,
                seed: int) -> dict:
    """The probes on ``model`` over lines of ``source`` (the training data's ``BatchSource``, or a list of collated
    batches): ``results["model_checks"]``; raises ``ValueError`` with the cause and the fix when one fails."""
    skip = PROBES if skip is True else tuple(skip or ())
    trusted = trusted_by_construction(model)
    if trusted:
        return {name: {"ran": False, "why": trusted} for name in PROBES}
    if set(skip) >= set(PROBES):
        return {name: {"ran": False, "why": "skip_model_checks"} for name in PROBES}
    batches = source if isinstance(source, list) else [source.first_batch(), source.padded_batch()]
    longest = max(int(batch["input_ids"].shape[1]) for batch in batches)
    # A block size the model or its config names is a declaration, not checked positions: it bounds the probes,
    # but it may say more than the model takes (a mask table longer than its position table).
    block = declared_block_size(model) if limit is None else None
    bound = limit if limit is not None else block
    # The long check stays within lines the model already took (the start-up forward ran the longest one).
    long_length = min(LONG_PROBE_LENGTH, longest, bound or longest)
    probes, refusal = None, None
    if limit is None and base_device(model).type == "cpu":
        # No checked positions (rotary or hand-made positions): the full probe length is tried (within a declared
        # block size), and where the model fails on it (a table of fixed size, a declaration longer than the model
        # takes) lines no longer than the data's are used. Only on a CPU, where such a failure is an ordinary
        # exception and the process goes on; on a GPU an index out of range is a device-side assert that leaves the
        # CUDA context unusable for the rest of the process, so there the probes stay within the declared block size
        # or, where none is declared, the lengths the start-up forward already ran (the data's longest line, below).
        length, extra_padding = probe_sizes(block, longest) if block else (PROBE_LENGTH, EXTRA_PADDING)
        try:
            probes = ModelProbes(model, probe_lines(batches, vocab_size, pad_token_id, length, seed, extra_padding,
                                                    long_length), skip, vocab_size)
            refusal = probes.run()
        except (IndexError, RuntimeError, AssertionError):  # an index, a shape or `assert seq <= block_size`
            probes, bound = None, None
    if probes is None:
        length, extra_padding = probe_sizes(bound, longest)
        lines = probe_lines(batches, vocab_size, pad_token_id, length, seed, extra_padding, long_length)
        probes = ModelProbes(model, lines, skip, vocab_size)
        refusal = probes.run()
    if refusal:
        raise ValueError(refusal)
    for name in PROBES:
        probes.report.setdefault(name, {"ran": False, "why": "an earlier probe failed"})
    norms = [f"{name} ({type(module).__name__})" for name, module in unwrap(model).named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    if norms and probes.report["causal"].get("ran"):
        # The probes run in evaluation mode, where BatchNorm uses its running statistics; training uses the batch's.
        probes.report["causal"]["batch_norm_while_training"] = norms
        warnings.warn(batch_norm_message(norms), UserWarning, stacklevel=caller_stacklevel())
    return probes.report


def batch_norm_message(norms: list[str]) -> str:
    return (f"{_names(norms)} normalise with the batch's statistics while training (their running statistics only "
            "in evaluation mode, where the probes passed): over every example and every position of the batch, so "
            "in training each position's output depends on the later tokens and the other examples, and a causal LM "
            "can read a little of the future. Normalise over the features instead (nn.LayerNorm(d_model)); "
            "skip_model_checks=('causal',) silences this for a model meant to keep it.")

