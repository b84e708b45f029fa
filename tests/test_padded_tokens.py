"""padded_tokens depend on the batching, and say so (issue 36): evaluate_perplexity names its batch size; its
count and metrics_summary's val/padded_tokens each equal an independent count for their own batch size."""
from types import SimpleNamespace

import torch

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

CONFIG = SimpleNamespace(vocab_size=50, pad_token_id=0)


def _padding_of_sorted_batches(lines, batch_size):
    """Validation batches: lines sorted by length (longest first), padded to each batch's longest."""
    lengths = sorted((len(line) for line in lines), reverse=True)
    return sum(max(chunk) * len(chunk) - sum(chunk)
               for chunk in (lengths[k:k + batch_size] for k in range(0, len(lengths), batch_size)))


def test_padded_tokens_follow_the_batch_size_and_say_which():
    torch.manual_seed(0)
    model, val = TinyCausalLM(vocab_size=50), random_lines(40, seed=7, low=3, high=40)
    at = {size: evaluate_perplexity(model, val, CONFIG, batch_size=size) for size in (8, 16)}
    for size, result in at.items():
        assert result["padded_tokens_at_batch_size"] == size
        assert result["padded_tokens"] == _padding_of_sorted_batches(val, size)
    assert at[8]["padded_tokens"] != at[16]["padded_tokens"] and at[8]["tokens"] == at[16]["tokens"]
    # float32 sums of ~800 target losses in another order: far below 1e-5 relative; the batching does not change
    # the loss
    assert abs(at[8]["loss"] - at[16]["loss"]) <= 1e-5 * at[8]["loss"]
    trained = test_fine_tuning(TinyCausalLM(vocab_size=50), CONFIG, random_lines(16, seed=1), val, n_epochs=1,
                               batch_size=16, progress=False, save_plots=False)
    assert int(trained["metrics_summary"]["val/padded_tokens"].iloc[0]) == _padding_of_sorted_batches(val, 16)
