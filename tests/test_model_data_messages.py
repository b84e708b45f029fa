"""Errors of the model-against-data checks name the actual cause (issue 36): a model built for a smaller
tokenizer, a line longer than positions the config does not declare, a config.vocab_size that is not the model's."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, random_lines, tiny_gpt2
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

QUIET = dict(n_epochs=1, batch_size=4, progress=False, save_plots=False)


def _word_tokenizer(size):
    """A real fast tokenizer of ``size`` tokens built here (words w0..w{size-2}, then the EOS, which is also the
    pad, as GPT-2's 50256)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)} | {"<|endoftext|>": size - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_a_model_built_for_a_smaller_tokenizer_is_named_not_the_pad_id():
    from utils.data import prepare_lm_dataset

    tokenizer = _word_tokenizer(4096)  # pad = eos = 4095
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 4095, (12,), generator=generator)) for _ in range(40)]
    data = prepare_lm_dataset(lines, tokenizer, max_length=64)
    model = tiny_gpt2(vocab_size=2048, n_positions=64)  # the tokenizer has 4096 tokens
    with pytest.raises(ValueError, match=r"model's vocabulary \(2048 ids\) is smaller than the tokenizer's "
                                         r"\(4096 tokens\).*vocab_size=4096") as refused:
        test_fine_tuning(model, model.config, data, data[:8], tokenizer=tokenizer, **QUIET)
    assert not str(refused.value).startswith("pad_token_id")
    # Without the tokenizer the data's ids say it (checked before the pad id).
    with pytest.raises(ValueError, match=r"data's token ids go beyond the model's vocabulary \(2048 ids\)"):
        evaluate_perplexity(model, data, SimpleNamespace(vocab_size=2048, pad_token_id=4095))


def test_a_line_longer_than_undeclared_positions_is_named():
    config = SimpleNamespace(vocab_size=50, pad_token_id=0)  # no max_position_embeddings / n_positions
    lines = random_lines(12, seed=3) + [torch.randint(1, 50, (40,))]
    with pytest.raises(ValueError, match=r"has 40 tokens, more than the model's 32 positions"):
        test_fine_tuning(TinyCausalLM(vocab_size=50, max_len=32), config, lines, lines[:4], **QUIET)


class OddlyNamedPositions(TinyCausalLM):
    """Its position embedding has a name that says nothing: only the first forward can tell."""

    def __init__(self, max_len):
        super().__init__(vocab_size=50, max_len=max_len)
        self.where = self.pos
        del self.pos

    def forward(self, idx):
        seq = idx.shape[1]
        h = self.embed(idx) + self.where(torch.arange(seq, device=idx.device))
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        return self.head(self.blocks(h, mask=causal, is_causal=True))


def test_an_over_long_line_is_caught_by_the_position_table_whatever_its_name():
    # Issue 45: the position table is found by what it does (it is indexed by 0, 1, 2, ...), not by its name.
    config = SimpleNamespace(vocab_size=50, pad_token_id=0)
    lines = random_lines(12, seed=3) + [torch.randint(1, 50, (40,))]
    with pytest.raises(ValueError, match=r"Example 12 of the training data has 40 tokens, more than the model's 32 "
                                         r"positions.*learned position table where has 32 rows"):
        test_fine_tuning(OddlyNamedPositions(max_len=32), config, lines, lines[:4], **QUIET)


def test_a_config_vocab_size_typo_names_both_sizes():
    lines = random_lines(16, seed=4, vocab_size=144)  # ids up to 143 for a model with 144 logits
    with pytest.raises(ValueError, match=r"config.vocab_size=100, but the model's token embedding \(embed\) has "
                                         r"144 rows.*Set config.vocab_size=144"):
        test_fine_tuning(TinyCausalLM(vocab_size=144), SimpleNamespace(vocab_size=100, pad_token_id=0), lines,
                         lines[:4], **QUIET)


def test_a_pad_id_outside_a_matching_vocabulary_keeps_its_own_message():
    lines = random_lines(16, seed=4)
    with pytest.raises(ValueError, match=r"^pad_token_id=60 is outside the vocabulary \[0, 50\)"):
        test_fine_tuning(TinyCausalLM(vocab_size=50), SimpleNamespace(vocab_size=50, pad_token_id=60), lines, lines[:4],
                         **QUIET)
