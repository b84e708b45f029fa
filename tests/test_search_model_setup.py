"""A search study never mixes models (issue 36): the model is part of the study's recorded set-up."""
import optuna
import pytest
import torch

from models import TinyCausalLM
from search_worker import CONFIG, data
from utils.tier3_training_utilities import test_hyperparameter_search

TRAIN, VAL = data(), data(8, seed=1)
CALL = dict(config=CONFIG, train_data=TRAIN, val_data=VAL, n_trials=1, study_name="s", save_plots=False, progress=False,
            search_space={"learning_rate": ("log", 1e-4, 1e-2)})


class RenamedLM(TinyCausalLM):
    """The same parameters under another class: another model."""


def _factory(calls, cls=TinyCausalLM, **sizes):
    def build():
        calls.append(cls)
        torch.manual_seed(0)
        return cls(vocab_size=50, **sizes)
    return build


def _trials(storage):
    return len(optuna.load_study(study_name="s", storage=storage).trials)


def _refused(factory, storage, named, **change):
    with pytest.raises(ValueError, match=rf"another set-up.*model differs \(study vs this call\): .*{named}"):
        test_hyperparameter_search(factory, storage=storage, **dict(CALL, **change))
    assert _trials(storage) == 1


def test_another_model_is_refused_before_any_trial_the_same_one_accepted_and_an_old_study_adopts_it(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    calls = []
    test_hyperparameter_search(_factory(calls), storage=storage, **CALL)
    assert calls == [TinyCausalLM]  # the first trial trains the model the set-up was read from: no extra build
    study = optuna.load_study(study_name="s", storage=storage)
    record = study.user_attrs["tier3_setup"]["model"]
    assert record["class"].endswith("TinyCausalLM") and ["head.weight", [50, 32]] in record["parameters"]
    assert record["config"] == {"vocab_size": 50, "pad_token_id": 0}

    _refused(_factory([], d_model=48), storage, r"first that differs: embed.weight \[50, 32\] vs \[50, 48\]")
    _refused(_factory([], cls=RenamedLM), storage, r"class .*TinyCausalLM vs .*RenamedLM")
    _refused(_factory([]), storage, r"config.vocab_size 50 vs 64", config=type(CONFIG)(vocab_size=64, pad_token_id=0))

    # A study recorded before the model was part of the set-up: the first caller's model is adopted, with a warning.
    setup = dict(study.user_attrs["tier3_setup"])
    del setup["model"]
    study.set_user_attr("tier3_setup", setup)
    with pytest.warns(UserWarning, match="recorded before its set-up included the model"):
        # An instance: the same model.
        test_hyperparameter_search(model=TinyCausalLM(vocab_size=50), storage=storage, **CALL)
    assert _trials(storage) == 2
    assert optuna.load_study(study_name="s", storage=storage).user_attrs["tier3_setup"]["model"] == record
    with pytest.raises(ValueError, match="another set-up.*model differs"):
        test_hyperparameter_search(_factory([], d_model=48), storage=storage, **CALL)
    assert _trials(storage) == 2
