"""Calls written for the previous module run unchanged: keywords, positional order, result keys,
printed lines, the pad-id message, wandb.log through a mocked module, both search-space forms (issue 21)."""
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pytest
import torch

import utils.tier3_training_utilities as t3
from models import TinyCausalLM
from utils.tier3_training_utilities import _detect_pad_token_id, test_fine_tuning, test_hyperparameter_search

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


DATA = _data()


def _model():
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=VOCAB)


def _quiet(**kwargs):
    return dict(dict(progress=False, save_plots=False), **kwargs)


def test_previous_positional_order():
    # (model, config, train, val, n_epochs, learning_rate, weight_decay, batch_size, use_wandb, use_amp,
    #  gradient_accumulation_steps, gradient_clip_norm, random_seed, deterministic, use_lr_schedule)
    result = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], 1, 2e-3, 0.0, 8, False, False, 2, 0.5, 7, False, False,
                              **_quiet())
    settings = result["settings"]
    assert ((settings["n_epochs"], settings["learning_rate"], settings["weight_decay"], settings["batch_size"])
            == (1, 2e-3, 0.0, 8))
    assert (settings["gradient_accumulation_steps"], settings["max_grad_norm"], settings["random_seed"]) == (2, 0.5, 7)
    by_keyword = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, learning_rate=2e-3, weight_decay=0.0,
                                  batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.5, random_seed=7,
                                  use_lr_schedule=False, **_quiet())
    assert result["loss_history"] == by_keyword["loss_history"]


def test_previous_result_keys_are_derived_from_the_steps():
    result = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=2, batch_size=4, **_quiet())
    assert result["final_loss"] == result["loss_history"][-1]
    assert result["initial_loss"] == result["loss_history"][0]
    assert result["grad_norm_history"] == result["steps_summary"]["train/grad_norm"].tolist()
    assert len(result["grad_norm_history"]) == result["global_step"]
    assert result["training_time_seconds"] > 0
    assert result["samples_per_second"] == pytest.approx(2 * len(DATA) / result["training_time_seconds"])
    assert result["best_epoch"] in (1, 2) and isinstance(result["metrics_summary"], pd.DataFrame)
    assert result["amp_enabled"] is False and result["final_loss_scale"] is None


def test_use_amp_off_cuda_is_warned_and_ignored():
    with pytest.warns(UserWarning, match="CUDA only"):
        result = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, use_amp=True, **_quiet())
    assert result["amp_enabled"] is False and result["settings"]["use_amp"] is True


def test_gradient_clip_norm_is_max_grad_norm():
    clipped = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, learning_rate=1e-2,
                               gradient_clip_norm=1e-3, **_quiet())
    unclipped = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, learning_rate=1e-2, max_grad_norm=None,
                                 **_quiet())
    assert clipped["settings"]["max_grad_norm"] == 1e-3
    assert clipped["loss_history"][1:] != unclipped["loss_history"][1:]  # clipping changed the updates
    same = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, gradient_clip_norm=1.0, max_grad_norm=1.0,
                            **_quiet())
    assert same["settings"]["max_grad_norm"] == 1.0
    with pytest.raises(ValueError, match="gradient_clip_norm=0.5 and max_grad_norm=2.0"):
        test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], gradient_clip_norm=0.5, max_grad_norm=2.0, **_quiet())


def test_deterministic_is_on_during_the_call_and_restored_after():
    seen = []

    class Recording(TinyCausalLM):
        def forward(self, idx):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().forward(idx)

    assert not torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(0)
    test_fine_tuning(Recording(vocab_size=VOCAB), CONFIG, DATA, DATA[:6], n_epochs=1, deterministic=True, **_quiet())
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()


def test_use_lr_schedule_false_is_a_constant_rate():
    result = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=2, learning_rate=3e-3, use_lr_schedule=False,
                              **_quiet())
    assert set(result["steps_summary"]["train/learning_rate"]) == {3e-3}
    scheduled = test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=2, learning_rate=3e-3, **_quiet())
    assert len(set(scheduled["steps_summary"]["train/learning_rate"])) > 1


def test_effective_batch_size_and_accumulation_are_printed(capsys):
    test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, batch_size=4, gradient_accumulation_steps=3,
                     **_quiet())
    out = capsys.readouterr().out
    assert "Effective batch size: 12" in out and "Gradient accumulation steps: 3" in out


def test_pad_fallback_is_printed_and_warned(capsys):
    with pytest.warns(UserWarning, match="defaulting to 0"):
        assert _detect_pad_token_id(SimpleNamespace(vocab_size=VOCAB)) == 0
    assert "No pad_token_id found in config/tokenizer, defaulting to 0" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test_fine_tuning(_model(), SimpleNamespace(vocab_size=VOCAB), DATA, DATA[:6], n_epochs=1, **_quiet())
    assert "No pad_token_id found in config/tokenizer, defaulting to 0" in capsys.readouterr().out


def _mocked_run(wandb_module, **kwargs):
    return test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, batch_size=4, gradient_accumulation_steps=2,
                            use_wandb=True, **_quiet(**kwargs))


def test_patched_module_wandb_receives_config_lines_and_gradient_norms():
    with mock.patch("utils.tier3_training_utilities.wandb") as wandb:
        result = _mocked_run(wandb, log_grad_dist_every=1)
    wandb.log.assert_any_call({"config/effective_batch_size": 8, "config/gradient_accumulation_steps": 2})
    run = wandb.init.return_value
    gradient_logs = [c for c in run.log.call_args_list if any(k.startswith("gradients/") for k in c.args[0])]
    assert len(gradient_logs) == result["global_step"]  # every step with log_grad_dist_every=1
    assert "gradients/head.weight.norm" in gradient_logs[0].args[0]
    wandb.Histogram.assert_not_called()


def test_sys_modules_wandb_mock_gets_histograms_every_n_steps():
    wandb = mock.MagicMock()
    with mock.patch.dict(sys.modules, {"wandb": wandb}):
        result = _mocked_run(wandb, log_grad_dist_every=2, log_grad_histogram=True)
    wandb.log.assert_any_call({"config/effective_batch_size": 8, "config/gradient_accumulation_steps": 2})
    run = wandb.init.return_value
    steps = [c.args[0]["train/global_step"] for c in run.log.call_args_list
             if any(k.startswith("gradients/") for k in c.args[0])]
    assert steps == list(range(2, result["global_step"] + 1, 2))
    assert wandb.Histogram.called


def test_without_wandb_no_gradient_logging_happens():
    with mock.patch("utils.tier3_training_utilities.wandb") as wandb:
        test_fine_tuning(_model(), CONFIG, DATA, DATA[:6], n_epochs=1, log_grad_dist_every=1, **_quiet())
    wandb.init.assert_not_called()
    wandb.log.assert_not_called()


# ---- test_hyperparameter_search, the previous forms ------------------------------------------------
def _factory():
    return _model()


def test_search_previous_positional_form_and_space_names():
    space = {"lr": (1e-4, 1e-2), "batch_size": [4, 8], "warmup": (0, 3), "wd": (1e-4, 1e-2)}
    result = test_hyperparameter_search(_factory, CONFIG, DATA, 2, space, 7, False, save_plots=False, progress=False)
    assert result["n_trials"] == 2 and len(result["all_trials"]) == 2
    assert set(result["best_params"]) == {"lr", "batch_size", "warmup", "wd"}
    assert result["best_value"] == min(t["value"] for t in result["all_trials"])
    assert isinstance(result["trials_df"], pd.DataFrame) and len(result["trials_df"]) == 2
    assert set(result["all_trials"][0]) == {"number", "value", "params"}
    distributions = result["study"].trials[0].distributions
    assert distributions["lr"].log and distributions["wd"].log
    assert type(distributions["warmup"]).__name__ == "IntDistribution"
    assert type(distributions["batch_size"]).__name__ == "CategoricalDistribution"
    # 'warmup' is a number of warmup steps: the first step of trial 0 ran at lr / (warmup + 1).
    # Trial folders are per study (issue 27): outputs/search/<study name>/trial-N.
    steps = f"outputs/search/{result['study'].study_name}/trial-0/metrics_steps.csv"
    first = pd.read_csv(steps)["train/learning_rate"].iloc[0]
    params = result["all_trials"][0]["params"]
    assert first == pytest.approx(params["lr"] / (params["warmup"] + 1))


def test_search_notebook_form_full_names_with_tuples_and_lists():
    space = {"learning_rate": (1e-4, 1e-2), "batch_size": [4, 8], "warmup_ratio": (0.0, 0.2),
             "weight_decay": (0.0, 0.1)}
    result = test_hyperparameter_search(model=_model(), config=CONFIG, train_data=DATA, val_data=DATA[:6], n_trials=2,
                                        search_space=space, save_plots=False, progress=False)
    distributions = result["study"].trials[0].distributions
    assert distributions["learning_rate"].log  # learning rates: log scale
    assert not distributions["weight_decay"].log  # a range from 0 is linear
    assert not distributions["warmup_ratio"].log
    assert result["best_params"].keys() == space.keys()


def test_t3_module_exposes_wandb_for_patching():
    assert t3.wandb.__name__ == "wandb"
