"""Bad input gets a clear error before training; failures during training keep what was measured (issue 9)."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

VOCAB, PAD = 50, 0
GOOD = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]


def _model(vocab=VOCAB):
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=vocab)


class _NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def forward(self, idx):
        return {"hidden_states": idx.float()}


def _call(model=None, config=None, train=GOOD, val=GOOD, **kwargs):
    kwargs = dict(dict(n_epochs=1, progress=False, save_plots=False), **kwargs)
    return test_fine_tuning(model if model is not None else _model(),
                            config or SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), train, val, **kwargs)


CASES = {
    "token id >= vocab": (dict(train=[[1, 2, 3], [4, 99, 5]]), ValueError,
                          "Example 1 of the training data holds token id 99"),
    "negative token id": (dict(val=[[1, -3, 4]]), ValueError, "negative"),
    "negative label other than -100": (dict(train=[{"input_ids": [1, 2, 3], "labels": [1, -5, 3]}]), ValueError,
                                       "only -100"),
    "pad id outside vocab": (dict(config=SimpleNamespace(vocab_size=VOCAB, pad_token_id=VOCAB)), ValueError,
                             "pad_token_id=50"),
    "empty training data": (dict(train=[]), ValueError, "empty"),
    "empty validation data": (dict(val=[]), ValueError, "validation data is empty"),
    "all examples without real tokens": (dict(train=[[0, 0, 0], [7]]), ValueError, "No example of the training data"),
    "batch_size < 1": (dict(batch_size=0), ValueError, "batch_size"),
    "batch_size not an int": (dict(batch_size="4"), TypeError, "batch_size"),
    "n_epochs < 1": (dict(n_epochs=0), ValueError, "n_epochs"),
    "learning_rate < 0": (dict(learning_rate=-1e-3), ValueError, "learning_rate"),
    "gradient_accumulation_steps < 1": (dict(gradient_accumulation_steps=0), ValueError, "gradient_accumulation_steps"),
    "unknown lr_schedule": (dict(lr_schedule="exponential"), ValueError, "lr_schedule"),
    "unknown keyword": (dict(epochs=3), TypeError, "unknown keyword"),
    "logits dim differs from vocab": (dict(model=_model(vocab=40), train=[[1, 2, 3]]), ValueError, "last dimension 40"),
    "output without logits": (dict(model=_NoLogits()), TypeError, "no logits"),
    "labels shaped unlike input_ids": (dict(train=[{"input_ids": [1, 2, 3], "labels": [1, 2]}]), ValueError,
                                       "labels has shape"),
    "mask shaped unlike input_ids": (dict(train=[{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}]), ValueError,
                                     "attention_mask has shape"),
    "untokenized text": (dict(train=["some raw text"]), TypeError, "Tokenize"),
    "data of a wrong type": (dict(train=42), TypeError, "expected a list"),
    "float token ids": (dict(train=[[1.0, 2.5, 3.0]]), TypeError, "integers"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_raises_a_clear_error(case):
    kwargs, error, words = CASES[case]
    with pytest.raises(error, match=words):
        _call(**kwargs)


def test_evaluate_perplexity_checks_ids_too():
    with pytest.raises(ValueError, match="token id 77"):
        evaluate_perplexity(_model(), [[1, 2, 77]], SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD))


class _Failing(nn.Module):
    """Wraps a model; at the n-th forward of the chosen mode it returns NaN logits or raises ``exception``. Eval-mode
    forwards count from the first training forward on (the start-up checks and probes run before it)."""

    def __init__(self, n, training=True, exception=None):
        super().__init__()
        self.inner, self.n, self.on_training, self.exception, self.calls = _model(), n, training, exception, 0
        self.trained = False

    def forward(self, idx):
        logits = self.inner(idx)
        self.trained = self.trained or self.training
        if self.training == self.on_training and self.trained:
            self.calls += 1
            if self.calls >= self.n:
                if self.exception is not None:
                    raise self.exception
                return logits * float("nan")
        return logits


SEQUENCES = [list(range(1, 3 + i % 20)) for i in range(40)]


def test_non_finite_loss_stops_with_the_step_and_keeps_results(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = _call(_Failing(n=6), train=SEQUENCES, val=SEQUENCES[:8], batch_size=4, n_epochs=2, log_every=1,
                   use_wandb=True, save_plots=True)
    assert result["stopped_early"] and not result["interrupted"]
    assert "optimizer step 6" in result["stop_reason"] and "learning_rate" in result["stop_reason"]
    assert len(result["loss_history"]) == 5 and all(math.isfinite(v) for v in result["loss_history"])
    import wandb

    assert wandb.run is None  # the W&B run was closed


def test_interrupt_during_validation_returns_partial_results():
    result = _call(_Failing(n=2, training=False, exception=KeyboardInterrupt()), train=SEQUENCES, val=SEQUENCES[:8],
                   batch_size=8, n_epochs=3, group_by_length="lines")
    # Eval-mode forwards after the first training step: 1 the first validation, 2 (raises) the second validation.
    assert result["interrupted"] and len(result["metrics_summary"]) == 1
    assert result["global_step"] == 2 * 5 == len(result["loss_history"])  # 40 examples / batch 8


def test_out_of_memory_names_the_fix():
    with pytest.raises(torch.OutOfMemoryError, match="smaller batch_size"):
        _call(_Failing(n=2, exception=torch.OutOfMemoryError("CUDA out of memory")), train=SEQUENCES, batch_size=4)


@pytest.mark.parametrize("how", ["fsdp=True", "torchrun"])
def test_a_search_refuses_fsdp_and_torchrun_before_any_trial(tmp_path, monkeypatch, how):
    from utils.tier3_training_utilities import test_hyperparameter_search

    kwargs = {"fsdp": True} if how == "fsdp=True" else {}
    if how == "torchrun":  # what torchrun sets in each of its processes
        monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    storage = tmp_path / "study.db"
    built = []
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
    with pytest.raises(ValueError, match="does not run under torchrun or with fsdp=True"):
        test_hyperparameter_search(lambda: built.append(1) or _model(), config, GOOD, GOOD, n_trials=2,
                                   storage=f"sqlite:///{storage}", output_dir=str(tmp_path), progress=False, **kwargs)
    assert not built and not storage.exists()  # refused before a model, a study or a trial
