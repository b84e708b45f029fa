"""test_hyperparameter_search: objective = test_fine_tuning's val loss, failures recorded, storages shared
and resumed, pruning mid-epoch, bad spaces refused before any trial (issue 18)."""
import math
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from models import TinyCausalLM
from search_worker import CONFIG, data
from utils.tier3_training_utilities import test_fine_tuning, test_hyperparameter_search

WORKER = Path(__file__).with_name("search_worker.py")
TRAIN, VAL = data(), data(8, seed=1)
QUIET = dict(save_plots=False, progress=False)


def _model():
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=50)


def test_failed_trial_is_recorded_and_best_equals_test_fine_tuning():
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("factory broke on purpose")
        return _model()

    result = test_hyperparameter_search(factory, CONFIG, TRAIN, VAL, n_trials=3, **QUIET)
    trials = result["trials"]
    assert len(trials) == 3 and list(trials["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "factory broke on purpose" in trials["reason"].iloc[1]
    assert math.isfinite(result["best_value"])
    assert result["best_val_perplexity"] == pytest.approx(math.exp(result["best_value"]))
    again = test_fine_tuning(_model(), CONFIG, TRAIN, VAL, n_epochs=1, progress=False, save_plots=False, **result["best_params"])
    assert again["final_val_loss"] == pytest.approx(result["best_value"], rel=1e-6)


def test_same_call_gives_the_same_parameters_and_instance_stays_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = test_hyperparameter_search(model=model, config=CONFIG, train_data=TRAIN, val_data=VAL, n_trials=2, **QUIET)
    second = test_hyperparameter_search(model=model, config=CONFIG, train_data=TRAIN, val_data=VAL, n_trials=2, **QUIET)
    assert [t["params"] for t in first["all_trials"]] == [t["params"] for t in second["all_trials"]]
    assert [t["value"] for t in first["all_trials"]] == pytest.approx([t["value"] for t in second["all_trials"]], rel=1e-9)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_second_call_continues_the_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    test_hyperparameter_search(_model, CONFIG, TRAIN, VAL, n_trials=2, storage=storage, study_name="s", **QUIET)
    result = test_hyperparameter_search(_model, CONFIG, TRAIN, VAL, n_trials=1, storage=storage, study_name="s", **QUIET)
    assert list(result["trials"]["number"]) == [0, 1, 2] and result["n_trials"] == 1


def test_hopeless_trial_is_pruned_before_its_last_epoch(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="p", direction="minimize")
    for learning_rate in (1e-3, 1e-3, 3.0):
        study.enqueue_trial({"learning_rate": learning_rate})
    result = test_hyperparameter_search(_model, CONFIG, TRAIN, VAL, n_trials=3, storage=storage, study_name="p",
                                        search_space={"learning_rate": ("log", 1e-5, 10.0)}, n_epochs=3, eval_every=2,
                                        **QUIET)
    trials = result["trials"]
    assert list(trials["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"]
    steps_per_epoch = math.ceil(len(TRAIN) / 4)  # batch_size 4, the default
    pruned = result["study"].trials[2]
    assert max(pruned.intermediate_values) < 3 * steps_per_epoch  # stopped before its last epoch ended
    assert "pruned" in trials["reason"].iloc[2]


def test_bad_search_space_raises_before_any_trial():
    calls = []
    factory = lambda: calls.append(1) or _model()  # noqa: E731
    bad_spaces = [{"epochs": ("int", 1, 3)}, {"learning_rate": ("log", 0.0, 1e-3)}, {"batch_size": ("categorical", [0, 4])},
                  {"learning_rate": (1e-3,)}, {"warmup_ratio": ("float", 0.3, 0.1)}, {"batch_size": ("int", 1.5, 4)}, {}]
    for space in bad_spaces:
        with pytest.raises(ValueError):
            test_hyperparameter_search(factory, CONFIG, TRAIN, VAL, n_trials=1, search_space=space, **QUIET)
    assert not calls


def test_mid_epoch_evaluations_are_recorded_by_test_fine_tuning(tmp_path):
    result = test_fine_tuning(_model(), CONFIG, TRAIN, VAL, n_epochs=1, batch_size=4, eval_every=2, output_dir=str(tmp_path),
                              progress=False, save_plots=False)
    import pandas as pd

    evals = pd.read_csv(tmp_path / "metrics_evals.csv")
    # Every 2nd step except the epoch's last, whose validation is the epoch row.
    assert list(evals["step"]) == list(range(2, result["global_step"], 2)) and len(evals) >= 2
    assert evals["val/loss_excl_padding"].notna().all()


def test_two_processes_share_one_journal_storage(tmp_path):
    storage = str(tmp_path / "study.log")
    workers = [subprocess.Popen([sys.executable, str(WORKER), storage, "2", "ok"], cwd=tmp_path) for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_trial_killed_mid_way_is_retried_with_its_parameters(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    killed = subprocess.run([sys.executable, str(WORKER), storage, "1", "kill"], cwd=tmp_path, timeout=300)
    assert killed.returncode == -9
    time.sleep(3)  # past the grace period (2 x heartbeat_interval=1 s)
    from search_worker import search

    result = search(storage, 1, heartbeat_interval=1)
    first, retry = result["study"].trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == first.params
    assert result["trials"]["retry_of"].iloc[1] == 0


def test_one_offline_wandb_run_per_trial_grouped_by_study(tmp_path, monkeypatch):
    from wandb_reader import read_records

    monkeypatch.delenv("WANDB_DIR", raising=False)
    result = test_hyperparameter_search(_model, CONFIG, TRAIN, VAL, n_trials=2, use_wandb=True, wandb_mode="offline",
                                        study_name="grouped", storage=str(tmp_path / "s.log"), output_dir=str(tmp_path), **QUIET)
    runs = sorted(tmp_path.glob("trial-*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == result["n_trials"] == 2
    for path in runs:
        run = next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")
        assert run.run_group == "grouped"
        config = {item.key: item.value_json for item in run.config.update}
        assert "learning_rate" in config and "batch_size" in config


def test_trial_that_turns_non_finite_in_a_later_epoch_is_failed_not_completed():
    class TurnsNaN(TinyCausalLM):
        def forward(self, idx):
            logits = super().forward(idx)
            if self.training:
                self.calls = getattr(self, "calls", 0) + 1
                if self.calls > 8:  # epoch 1 (6 steps of 4 lines) ends finite; epoch 2 does not
                    return logits * float("nan")
            return logits

    def factory():
        torch.manual_seed(0)
        return TurnsNaN(vocab_size=50)

    result = test_hyperparameter_search(factory, CONFIG, TRAIN, VAL, n_trials=1, n_epochs=2, pruning=False,
                                        search_space={"learning_rate": ("log", 1e-4, 1e-3)}, **QUIET)
    trials = result["trials"]
    assert list(trials["state"]) == ["FAIL"] and "not finite" in trials["reason"].iloc[0]
    assert result["best_value"] is None
