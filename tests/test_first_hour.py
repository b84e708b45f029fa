"""What a new user meets first: the README's snippet runs as pasted and prints the losses; a model built with
GPT-2's default vocabulary for a small tokenizer is named."""
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from utils.data import prepare_lm_dataset, train_bpe_tokenizer
from utils.tier3_training_utilities import test_fine_tuning

ROOT = Path(__file__).resolve().parent.parent
TEXT = [f"line {i} of a small corpus with words {' '.join(str(j) for j in range(i % 7 + 3))}" for i in range(80)]


def _readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    usage = readme[readme.index("## Usage"):]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_the_readme_snippet_runs_as_pasted_and_prints_every_column(tmp_path):
    # As pasted, in a fresh process whose terminal is narrow (pandas elides columns to fit a terminal).
    done = subprocess.run([sys.executable, "-c", _readme_snippet()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**__import__("os").environ, "COLUMNS": "100",
                                            "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/loss_excl_padding" in done.stdout and "train/loss_excl_padding" in done.stdout
    assert "..." not in done.stdout.split("{'loss'")[0], done.stdout  # no elided columns in the epoch table
    assert "outside the vocabulary" not in done.stderr  # no bos/eos warnings from a mis-built config
    assert "'perplexity'" in done.stdout


def test_metrics_summary_prints_every_column_in_a_narrow_terminal(tmp_path):
    torch.manual_seed(0)
    from models import TinyCausalLM

    data = [torch.randint(1, 40, (int(n),)) for n in torch.randint(4, 12, (24,))]
    result = test_fine_tuning(TinyCausalLM(vocab_size=40), {"vocab_size": 40, "pad_token_id": 0}, data, data[:8],
                              n_epochs=2, batch_size=4, progress=False, save_plots=False, output_dir=str(tmp_path))
    frame = result["metrics_summary"]
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    # pandas' terminal default (max_columns=0: fit the terminal) is what elided the losses.
    with pd.option_context("display.max_columns", 0, "display.width", 80):
        text = repr(frame)
    assert all(column in text for column in frame.columns), text
    assert f"{frame['val/loss_excl_padding'].iloc[-1]:.6f}"[:6] in text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(TEXT, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


def test_a_model_far_larger_than_the_tokenizers_vocabulary_is_named_once(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    data = prepare_lm_dataset(TEXT, tokenizer, max_length=32)
    forgotten = GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2)  # vocab_size forgotten: 50,257
    with pytest.warns(UserWarning, match=r"50,257 outputs but the tokenizer has 300 tokens") as caught:
        for _ in range(2):
            test_fine_tuning(GPT2LMHeadModel(forgotten), forgotten, data, data[:8], n_epochs=1, batch_size=8,
                             tokenizer=tokenizer, max_steps=1, progress=False, save_plots=False,
                             output_dir=str(tmp_path))
    assert sum("outputs but the tokenizer" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("vocab_size", [300, 384])  # exact, and rounded up to a multiple of 128 as HF models do
def test_a_model_with_the_tokenizers_vocabulary_or_a_rounding_pad_is_not_warned(tokenizer, tmp_path, vocab_size):
    from transformers import GPT2Config, GPT2LMHeadModel

    data = prepare_lm_dataset(TEXT, tokenizer, max_length=32)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test_fine_tuning(GPT2LMHeadModel(config), config, data, data[:8], n_epochs=1, batch_size=8, tokenizer=tokenizer,
                         max_steps=1, progress=False, save_plots=False, output_dir=str(tmp_path))
    assert not [w for w in caught if "outputs but the tokenizer" in str(w.message)]
