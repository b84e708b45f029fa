"""Start-up probes of the model's behaviour (issue 45): a model that sees the future, mixes the examples of a batch
or depends on its padding is refused before the first optimizer step, naming the cause; correct models never are."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, random_lines, tiny_gpt2
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.model.probes import PROBE_LENGTH, ModelProbes, probe_lines, probe_model

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=128)
QUIET = dict(n_epochs=1, batch_size=4, progress=False, save_plots=False)


class StepCounter(nn.Module):
    """Wraps a model and counts its training forwards: a refusal "before the first step" means zero."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.training_forwards = lm, 0

    def forward(self, idx):
        self.training_forwards += self.training
        return self.lm(idx)


class NoCausalMask(TinyCausalLM):
    """The most common bug: a stack of nn.TransformerEncoderLayers called without a mask."""

    def forward(self, idx):
        h = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.blocks(h))


class SequenceFirst(nn.Module):
    """Layers built with batch_first=False (torch's default) fed (batch, seq, d) tensors: examples attend to each
    other's tokens."""

    def __init__(self, vocab_size=VOCAB, d_model=32):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab_size, d_model), nn.Embedding(128, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 2 * d_model, dropout=0.0, bias=False)  # batch_first=False
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):
        h = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.blocks(h))  # no mask: the "sequence" is the batch


class MeanOverSequence(TinyCausalLM):
    """Causally masked attention, then the hidden states centred by their mean over the (padded) sequence."""

    def forward(self, idx):
        h = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        causal = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(h - h.mean(dim=1, keepdim=True))


class ScaledByLength(TinyCausalLM):
    """Causal, but its embeddings are scaled by the padded length: the real positions' logits depend on how much
    padding follows them (and the same text scores differently in every batch)."""

    def forward(self, idx):
        h = (self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))) * 8 / math.sqrt(idx.shape[1])
        causal = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        return self.head(self.blocks(h, mask=causal, is_causal=True))


class FutureFrom17(TinyCausalLM):
    """A mask that is causal for the first 17 rows only: positions from 17 on see every token."""

    causal_rows = 17

    def forward(self, idx):
        seq = idx.shape[1]
        h = self.embed(idx) + self.pos(torch.arange(seq, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        mask[self.causal_rows:] = 0.0
        return self.head(self.blocks(h, mask=mask))


class BatchCentred(TinyCausalLM):
    """A hand-written normalisation over the batch dimension."""

    def forward(self, idx):
        logits = super().forward(idx)
        return logits - logits.mean(dim=0, keepdim=True)


def _refused(model, match, lines=None):
    counted = StepCounter(model)
    lines = lines if lines is not None else random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=match) as refused:
        test_fine_tuning(counted, CONFIG, lines, lines[:4], **QUIET)
    assert counted.training_forwards == 0, "refused only after a training forward"
    return str(refused.value)


def test_a_model_without_a_causal_mask_is_refused_naming_the_layer_and_the_fix():
    # Lines of 4-11 tokens: the probe joins them into lines of 24, past position 17.
    message = _refused(NoCausalMask(vocab_size=VOCAB), r"sees the future: the logits at position 0 ")
    assert "blocks (TransformerEncoder) ran without a causal mask" in message
    assert "is_causal=True" in message and "skip_model_checks=('causal',)" in message


def test_sequence_first_layers_fed_batch_first_are_refused_naming_the_layer():
    message = _refused(SequenceFirst(), r"mixes the examples of a batch")
    assert "blocks (TransformerEncoder)" in message and "batch_first=True" in message


def test_a_normalisation_over_the_batch_is_refused_naming_that_cause():
    message = _refused(BatchCentred(vocab_size=VOCAB), r"mixes the examples of a batch")
    assert "normalisation over the batch dimension" in message


def test_a_model_that_sees_the_future_from_position_17_on_is_caught_at_17():
    message = _refused(FutureFrom17(vocab_size=VOCAB), r"logits at position 17 \(counting from 0\) changed")
    assert "Positions before 17 do not" in message
    assert "mask given to lm.blocks (TransformerEncoder) lets row 17 attend to later columns" in message


def test_a_normalisation_over_the_sequence_is_named_not_the_mask():
    message = _refused(MeanOverSequence(vocab_size=VOCAB), r"sees the future")
    assert "every attention layer had a causal mask" in message and "over the sequence dimension" in message


def test_a_model_whose_logits_depend_on_the_padded_length_is_refused_with_the_size():
    message = _refused(ScaledByLength(vocab_size=VOCAB), r"depend on the padding after them: with 8 more pad "
                                                         r"positions on the right .* changed by up to \d")
    assert "division by seq_len" in message


def test_each_probe_can_be_skipped_and_the_results_say_what_ran():
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    results = test_fine_tuning(NoCausalMask(vocab_size=VOCAB), CONFIG, lines, lines[:4],
                               skip_model_checks=("causal", "padding"), **QUIET)
    checks = results["model_checks"]
    assert checks["causal"] == {"ran": False, "why": "skip_model_checks"} == checks["padding"]
    assert checks["examples"]["ran"] and checks["examples"]["passed"]
    # Without a causal mask every position also sees the padding after it: the padding probe says so.
    with pytest.raises(ValueError, match="depend on the padding"):
        test_fine_tuning(NoCausalMask(vocab_size=VOCAB), CONFIG, lines, lines[:4], skip_model_checks=("causal",),
                         save_plots=False, n_epochs=1, progress=False, output_dir="other")
    assert test_fine_tuning(NoCausalMask(vocab_size=VOCAB), CONFIG, lines, lines[:4], skip_model_checks=True,
                            **QUIET)["model_checks"]["padding"]["ran"] is False
    with pytest.raises(ValueError, match=r"skip_model_checks='causl'.*\('examples', 'causal', 'padding'\)"):
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, lines, lines[:4], skip_model_checks="causl", **QUIET)


def test_a_correct_plain_model_passes_every_probe_and_hf_gpt2_is_trusted():
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    checks = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, lines, lines[:4], **QUIET)["model_checks"]
    assert all(checks[name]["ran"] and checks[name]["passed"] for name in ("examples", "causal", "padding"))
    assert checks["causal"]["positions_probed"] == PROBE_LENGTH == 24
    assert checks["causal"]["first_position_seeing_future"] is None
    model = tiny_gpt2(vocab_size=VOCAB)
    checks = test_fine_tuning(model, model.config, lines, lines[:4], **QUIET)["model_checks"]
    assert not checks["causal"]["ran"] and "transformers' own" in checks["causal"]["why"]


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _readme_model(seed):  # the README's GPT-2 shape (2 blocks, 4 heads), narrower
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1))


def _plain(seed, **sizes):
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=VOCAB, **sizes)


CORRECT_MODELS = {
    "HF GPT-2": lambda seed: tiny_gpt2(vocab_size=VOCAB, seed=seed),
    "Llama (rotary)": _llama,
    "README's GPT-2": _readme_model,
    "TinyCausalLM": _plain,
    "dropout 0.3, 2 layers (eval mode)": lambda seed: _plain(seed, dropout=0.3, n_layers=2),
}


@pytest.mark.parametrize("name", list(CORRECT_MODELS))
def test_no_false_alarm_over_200_seeds(name):
    """Each seed: fresh weights every 20 seeds, new probe lines and replacement tokens every seed (every 4th with
    the long causal check over 64 positions); the probes run directly (HF models are trusted by construction in a
    run, so the probes would otherwise not run on them)."""
    for seed in range(200):
        if seed % 20 == 0:
            model = CORRECT_MODELS[name](seed)
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 24, (6,), generator=generator)
        batch = {"input_ids": torch.randint(1, VOCAB, (6, 24), generator=generator),
                 "attention_mask": (torch.arange(24) < lengths[:, None]).long()}
        long_length = 64 if seed % 4 == 0 else 0  # the long causal check on every 4th seed (50 of 200)
        probes = ModelProbes(model, probe_lines([batch], VOCAB, 0, PROBE_LENGTH, seed, long_length=long_length))
        refusal = probes.run()
        assert refusal is None, f"{name}, seed {seed}: {refusal}"
        assert all(probes.report[probe]["passed"] for probe in ("examples", "causal", "padding"))
        assert probes.report["causal"].get("long_positions_probed", 0) == long_length


def test_probe_model_reports_the_left_padding_difference_without_refusing():
    model = tiny_gpt2(vocab_size=VOCAB)
    model.forward = model.forward  # an instance attribute: no longer trusted by construction, so probed
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    report = probe_model(model, [batch], vocab_size=VOCAB, pad_token_id=0, limit=64, skip=(), seed=0)
    # GPT-2 numbers positions from the left edge: left padding moves them (the package never left-pads).
    assert report["padding"]["passed"] and report["padding"]["left_max_difference"] > report["padding"]["tolerance"]


class RotaryLike(TinyCausalLM):
    """No position table and no declared positions (positions enter as a sinusoid of the index): nothing bounds the
    probe's length but the model itself."""

    def forward(self, idx):
        seq = idx.shape[1]
        where = torch.arange(seq, device=idx.device, dtype=torch.float32)[:, None]
        h = self.embed(idx) + torch.sin(where / 10.0 ** (torch.arange(32, device=idx.device) / 16))
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        mask[17:] = 0.0  # causal for the first 17 rows only
        return self.head(self.blocks(h, mask=mask))


def test_short_lines_and_no_declared_positions_still_probe_past_position_17():
    lines = random_lines(16, seed=1, low=4, high=10, vocab_size=VOCAB)  # every line shorter than 10 tokens
    with pytest.raises(ValueError, match=r"logits at position 17"):
        test_fine_tuning(RotaryLike(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=0), lines,
                         lines[:4], **QUIET)


class LSTMLM(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)
        self.rnn = nn.LSTM(16, 16, batch_first=batch_first)

    def forward(self, idx):
        return self.head(self.rnn(self.embed(idx))[0])


def test_an_lstm_fed_batch_first_tensors_without_batch_first_is_named_and_a_correct_one_passes():
    message = _refused(LSTMLM(batch_first=False), r"mixes the examples of a batch")
    assert "lm.rnn (LSTM) is sequence-first (batch_first=False" in message
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    checks = test_fine_tuning(LSTMLM(batch_first=True), CONFIG, lines, lines[:4], **QUIET)["model_checks"]
    assert all(checks[name]["passed"] for name in ("examples", "causal", "padding"))


# -- review of issue 45: a cause named right, a correct model never refused -----------------------------------
class FunctionalDropout(TinyCausalLM):
    """Causal, but F.dropout's default training=True keeps it on in evaluation mode: its forwards are random."""

    def forward(self, idx):
        return nn.functional.dropout(super().forward(idx), 0.1)


def test_a_model_random_in_evaluation_mode_is_not_refused_as_mixing_examples_but_warned():
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    with pytest.warns(UserWarning, match=r"random numbers in evaluation mode.*training=self.training"):
        results = test_fine_tuning(FunctionalDropout(vocab_size=VOCAB), CONFIG, lines, lines[:4], **QUIET)
    assert all(not check["ran"] and "random" in check["why"] for check in results["model_checks"].values())


def test_a_model_with_only_8_learned_positions_is_probed_within_them():
    lines = random_lines(16, seed=1, low=3, high=9, vocab_size=VOCAB)  # lines fit the model's 8 positions
    checks = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB, max_len=8), SimpleNamespace(vocab_size=VOCAB,
                              pad_token_id=0), lines, lines[:4], **QUIET)["model_checks"]
    assert all(checks[name]["ran"] and checks[name]["passed"] for name in ("examples", "causal", "padding"))
    assert checks["causal"]["positions_probed"] + checks["padding"]["extra_pad_positions"] <= 8


def test_a_model_in_bfloat16_is_probed_in_float32_and_its_weights_come_back_bit_identical():
    # In bfloat16 the float32 bound scaled by bfloat16's eps exceeded the logits: no causal mask passed every probe.
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="sees the future"):
        test_fine_tuning(NoCausalMask(vocab_size=VOCAB).to(torch.bfloat16), CONFIG, lines, lines[:4],
                         precision="bf16", **QUIET)
    model = TinyCausalLM(vocab_size=VOCAB).to(torch.bfloat16)
    model.pos.float()  # mixed dtypes: each tensor returns to its own
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    report = probe_model(model, [batch], vocab_size=VOCAB, pad_token_id=0, limit=64, skip=(), seed=0)
    assert all(report[name]["passed"] and "float32" in report[name]["weights"] for name in ("causal", "padding"))
    after = model.state_dict()
    assert all(after[name].dtype == value.dtype and torch.equal(after[name], value) for name, value in before.items())
    assert model.pos.weight.dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16


class MixesBatchesOver2(TinyCausalLM):
    """Causal, but couples the examples of batches over 2 (the causal probe's 4 rows, not the examples probe's 2)."""

    def forward(self, idx):
        logits = super().forward(idx)
        return logits + logits.mean(dim=0, keepdim=True) if idx.shape[0] > 2 else logits


def test_a_model_mixing_only_larger_batches_is_named_as_mixing_examples_not_as_seeing_the_future():
    message = _refused(MixesBatchesOver2(vocab_size=VOCAB), r"mixes the examples of a batch: in a batch of 4 examples")
    assert "sees the future" not in message and "skip_model_checks=('examples',)" in message


class RotaryBlock16(RotaryLike):
    """Correct (causal), no position table, and nanoGPT's guard on its block size of 16."""

    def forward(self, idx):
        assert idx.shape[1] <= 16, f"Cannot forward sequence of length {idx.shape[1]}, block size is only 16"
        seq = idx.shape[1]
        where = torch.arange(seq, device=idx.device, dtype=torch.float32)[:, None]
        h = self.embed(idx) + torch.sin(where / 10.0 ** (torch.arange(32, device=idx.device) / 16))
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        return self.head(self.blocks(h, mask=causal, is_causal=True))


def test_a_model_asserting_its_block_size_is_probed_within_the_data_lengths():
    lines = random_lines(16, seed=1, low=4, high=17, vocab_size=VOCAB)  # up to the model's 16 positions
    checks = test_fine_tuning(RotaryBlock16(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=0),
                              lines, lines[:4], **QUIET)["model_checks"]
    assert all(checks[name]["ran"] and checks[name]["passed"] for name in ("examples", "causal", "padding"))


class BatchNormConvLM(nn.Module):
    """A causal convolution with nn.BatchNorm1d over (batch, channels, seq): exact in evaluation mode (running
    statistics), but while training it normalises over every example and position, the later ones included."""

    def __init__(self, d_model=16, kernel=3):
        super().__init__()
        self.kernel, self.embed, self.head = kernel, nn.Embedding(VOCAB, d_model), nn.Linear(d_model, VOCAB)
        self.conv, self.norm = nn.Conv1d(d_model, d_model, kernel), nn.BatchNorm1d(d_model)

    def forward(self, idx):
        h = nn.functional.pad(self.embed(idx).transpose(1, 2), (self.kernel - 1, 0))
        return self.head(torch.relu(self.norm(self.conv(h))).transpose(1, 2))


def test_batch_norm_with_running_statistics_passes_the_probes_but_is_warned_about_training_mode():
    lines = random_lines(16, seed=1, low=4, high=12, vocab_size=VOCAB)
    with pytest.warns(UserWarning, match=r"norm \(BatchNorm1d\) normalise with the batch's statistics while training"):
        checks = test_fine_tuning(BatchNormConvLM(), CONFIG, lines, lines[:4], **QUIET)["model_checks"]
    assert checks["causal"]["passed"] and checks["causal"]["batch_norm_while_training"] == ["norm (BatchNorm1d)"]


# -- the full-length try only where nothing says the model's length (on a GPU a forward past a table's end is a
# device-side assert that poisons the CUDA context: it must not be caught, it must not happen) -------------------
class RecordsLengths(RotaryLike):
    """Correct (causal), no position table, no declared positions; records every line length it is called with."""

    def __init__(self):
        super().__init__(vocab_size=VOCAB)
        self.lengths = []

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        seq = idx.shape[1]
        where = torch.arange(seq, device=idx.device, dtype=torch.float32)[:, None]
        h = self.embed(idx) + torch.sin(where / 10.0 ** (torch.arange(32, device=idx.device) / 16))
        return self.head(self.blocks(h, mask=self.causal_mask(seq), is_causal=True))

    def causal_mask(self, seq):
        return nn.Transformer.generate_square_subsequent_mask(seq)


class BlockSizeInConfig(RecordsLengths):
    """nanoGPT keeps its GPTConfig on the model: ``block_size`` says how long a line it takes."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(block_size=16, vocab_size=VOCAB)


class CausalMaskTable(RecordsLengths):
    """nanoGPT's slow attention path: a (1, 1, 16, 16) tril buffer, sliced to the line's length."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))

    def causal_mask(self, seq):
        return torch.zeros(seq, seq).masked_fill(self.bias[0, 0, :seq, :seq] == 0, float("-inf"))


@pytest.mark.parametrize("model_class", [BlockSizeInConfig, CausalMaskTable])
def test_a_model_that_names_its_block_size_is_never_probed_beyond_it(model_class):
    lines = random_lines(16, seed=1, low=4, high=17, vocab_size=VOCAB)  # up to the model's 16 positions
    model = model_class()
    checks = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=0), lines, lines[:4],
                              **QUIET)["model_checks"]
    assert all(checks[name]["ran"] and checks[name]["passed"] for name in ("examples", "causal", "padding"))
    assert max(model.lengths) <= 16, sorted(set(model.lengths))  # no forward past the block, caught or not


class MaskTableLongerThanPositions(RecordsLengths):
    """A causal-mask table of 64 (so a declared block size of 64) but a position table of 16 positions held as a
    plain parameter (the start-up checks find no positions): the declaration says more than the model takes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))
        self.where = nn.Parameter(torch.zeros(16, 32))

    def forward(self, idx):
        self.lengths.append(idx.shape[1])
        seq = idx.shape[1]
        h = self.embed(idx) + self.where[:seq]  # a shape error past 16 positions
        mask = torch.zeros(seq, seq).masked_fill(self.bias[0, 0, :seq, :seq] == 0, float("-inf"))
        return self.head(self.blocks(h, mask=mask, is_causal=True))


def test_a_declared_block_size_longer_than_the_model_takes_falls_back_to_the_data_lengths_on_a_cpu():
    # Before the fallback: the declared 64 was trusted and the probes' 32 positions raised a bare RuntimeError from
    # the model, so a model that trains on these lines could not start (it did before block sizes were read).
    lines = random_lines(16, seed=1, low=4, high=13, vocab_size=VOCAB)  # within the model's 16 positions
    model = MaskTableLongerThanPositions()
    checks = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=0), lines, lines[:4],
                              **QUIET)["model_checks"]
    assert all(checks[name]["ran"] and checks[name]["passed"] for name in ("examples", "causal", "padding"))
    assert max(model.lengths) <= 64, sorted(set(model.lengths))  # never past the declared block


def test_a_block_size_is_read_from_a_config_or_a_causal_mask_table_and_nothing_else():
    from utils.training.model.probes import declared_block_size, probe_sizes

    assert declared_block_size(RecordsLengths()) is None  # nothing says: a CPU tries the full length, a GPU may not
    assert declared_block_size(CausalMaskTable()) == 16 == declared_block_size(BlockSizeInConfig())
    square = RecordsLengths()
    square.register_buffer("rotation", torch.linalg.qr(torch.randn(8, 8))[0])  # square, not a mask table
    assert declared_block_size(square) is None
    assert probe_sizes(None, 12) == (6, 6)  # the data's longest line (12) bounds lines and padding together


class FutureFrom40(FutureFrom17):
    """A mask causal for the first 40 rows only: beyond the 24 positions of the strided causal probe."""

    causal_rows = 40


def test_a_model_that_sees_the_future_only_from_position_40_is_caught_by_the_long_check():
    lines = random_lines(16, seed=1, low=30, high=64, vocab_size=VOCAB)  # lines up to 63 tokens: trained there
    message = _refused(FutureFrom40(vocab_size=VOCAB), r"logits at position 40 \(counting from 0\) changed", lines)
    assert "mask given to lm.blocks (TransformerEncoder) lets row 40 attend to later columns" in message
    # A correct model on the same lines passes the long check too, and says how far it looked.
    checks = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, lines, lines[:4], **QUIET)["model_checks"]
    assert checks["causal"]["passed"] and checks["causal"]["long_positions_probed"] == max(len(line) for line in lines)
    assert checks["causal"]["long_max_difference"] <= checks["causal"]["long_tolerance"]
