"""Start-up messages about the model itself (issue 45): its output read by one rule, arguments its forward needs,
weights without values or in a precision the run cannot train, and its sizes read from its modules by what they do."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, random_lines, tiny_gpt2
from utils.tier3_training_utilities import test_fine_tuning

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=128)
QUIET = dict(n_epochs=1, batch_size=4, progress=False, save_plots=False)
LINES = random_lines(16, seed=2, low=4, high=12, vocab_size=VOCAB)


class HiddenAndLogits(TinyCausalLM):
    """Returns (hidden, logits) and its hidden width equals the vocabulary: the first element is not the logits."""

    def __init__(self):
        super().__init__(vocab_size=32, d_model=32)

    def forward(self, idx):
        h = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        causal = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        hidden = self.blocks(h, mask=causal, is_causal=True)
        return hidden, self.head(hidden)


def test_an_ambiguous_tuple_is_refused_with_how_to_disambiguate():
    lines = random_lines(16, seed=2, low=4, high=12, vocab_size=32)
    config = SimpleNamespace(vocab_size=32, pad_token_id=0)
    with pytest.raises(ValueError, match=r"tuple of 2 elements, and 2 of them have the vocabulary's size \(32\)"
                                         r".*a dict / ModelOutput with a 'logits' entry"):
        test_fine_tuning(HiddenAndLogits(), config, lines, lines[:4], **QUIET)


class LogitsAndHidden(HiddenAndLogits):
    """(logits, wide hidden): only one element is as wide as the vocabulary."""

    def __init__(self):
        super().__init__()
        self.widen = nn.Linear(32, 48)

    def forward(self, idx):
        hidden, logits = super().forward(idx)
        return self.widen(hidden), logits  # the logits second, and the hidden states of another width


def test_a_tuple_whose_only_vocabulary_wide_element_is_second_trains_on_it():
    lines = random_lines(16, seed=2, low=4, high=12, vocab_size=32)
    results = test_fine_tuning(LogitsAndHidden(), SimpleNamespace(vocab_size=32, pad_token_id=0), lines, lines[:4],
                               **QUIET)
    assert results["completed"] and results["final_val_loss"] < 2 * torch.log(torch.tensor(32.0))


class NeedsLabels(TinyCausalLM):
    def forward(self, input_ids, labels):  # noqa: ARG002 - the user's signature
        return super().forward(input_ids)


def test_a_forward_that_requires_labels_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"NeedsLabels.forward requires labels, which the package does not pass.*"
                                         r"Give labels a default \(e.g. labels=None\)"):
        test_fine_tuning(NeedsLabels(vocab_size=VOCAB), CONFIG, LINES, LINES[:4], **QUIET)


def test_a_model_on_the_meta_device_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = TinyCausalLM(vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"on the 'meta' device.*to_empty\(device='cpu'\).*load_state_dict"):
        test_fine_tuning(model, CONFIG, LINES, LINES[:4], **QUIET)


def test_uninitialised_parameters_are_refused():
    model = TinyCausalLM(vocab_size=VOCAB)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))  # what torch.empty (or to_empty) may leave
    with pytest.raises(ValueError, match=r"parameter head.weight holds NaN or inf before training"):
        test_fine_tuning(model, CONFIG, LINES, LINES[:4], **QUIET)


def test_bfloat16_weights_under_fp16_are_refused_at_start_up():
    model = TinyCausalLM(vocab_size=VOCAB).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights are bfloat16, but precision='fp16'.*model.float\(\)"):
        test_fine_tuning(model, CONFIG, LINES, LINES[:4], precision="fp16", **QUIET)


class Tok(nn.Module):
    """Built for 256 tokens; its embedding is named ``tok`` and its positions ``where`` (no name says what)."""

    def __init__(self, vocab_size=256, positions=64):
        super().__init__()
        self.tok, self.where = nn.Embedding(vocab_size, 32), nn.Embedding(positions, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(32, vocab_size)

    def forward(self, idx):
        h = self.tok(idx) + self.where(torch.arange(idx.shape[1], device=idx.device))
        causal = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        return self.out(self.blocks(h, mask=causal, is_causal=True))


def test_a_model_built_for_256_tokens_with_1024_token_data_names_the_embedding_and_both_sizes():
    lines = random_lines(16, seed=5, low=4, high=12, vocab_size=1024)
    config = SimpleNamespace(vocab_size=1024, pad_token_id=0, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"token embedding tok \(the nn.Embedding the input ids index\) has 256 rows.*"
                                         r"config.vocab_size=1024.*vocab_size=1024"):
        test_fine_tuning(Tok(), config, lines, lines[:4], **QUIET)


def test_a_position_table_with_any_name_bounds_the_lines():
    lines = random_lines(12, seed=3, vocab_size=VOCAB) + [torch.randint(1, VOCAB, (40,))]
    with pytest.raises(ValueError, match=r"has 40 tokens, more than the model's 32 positions.*position table where has "
                                         r"32 rows"):
        test_fine_tuning(Tok(vocab_size=VOCAB, positions=32), SimpleNamespace(vocab_size=VOCAB, pad_token_id=0), lines,
                         lines[:4], **QUIET)


def test_hf_gpt2_sizes_are_still_read_from_its_config():
    model = tiny_gpt2(vocab_size=VOCAB, n_positions=16)
    lines = random_lines(12, seed=3, high=12, vocab_size=VOCAB) + [torch.randint(1, VOCAB, (20,))]
    with pytest.raises(ValueError, match=r"has 20 tokens, more than the model's 16 positions"):
        test_fine_tuning(model, model.config, lines, lines[:4], **QUIET)


class LogitsThenHidden(HiddenAndLogits):
    def forward(self, idx):
        hidden, logits = super().forward(idx)
        return logits, torch.cat([hidden, hidden], dim=-1)[..., :40]  # another width: unambiguous


def test_without_a_declared_vocabulary_the_token_embedding_tells_a_tuples_logits_apart():
    lines = random_lines(16, seed=2, low=4, high=12, vocab_size=32)
    results = test_fine_tuning(LogitsThenHidden(), {"pad_token_id": 0}, lines, lines[:4], **QUIET)
    assert results["completed"]
