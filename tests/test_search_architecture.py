"""Searching the model as well as the training (issue 46): model parameters passed to the factory, one study per
model family, every trial's cost beside its loss, the Pareto front of two objectives."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from models import TinyCausalLM, tiny_gpt2
from search_worker import CONFIG, MODEL_SPACE, VOCAB, architecture, data, kill_a_trial_then_retry, search
from utils.tier3_training_utilities import test_hyperparameter_search

WORKER = Path(__file__).with_name("search_worker.py")
TRAIN, VAL = data(), data(8, seed=1)
QUIET = dict(save_plots=False, progress=False)
LEARNING_RATE = {"learning_rate": ("log", 1e-4, 1e-2)}


def tiny_parameters(n_layer, n_embd, vocab=VOCAB, positions=128):
    """TinyCausalLM's parameter count from its architecture (tests/models.py): token and position embeddings, per
    block attention in/out (4 d^2, no bias) + feed-forward d -> 2d -> d (4 d^2) + two LayerNorm weights, the head
    with its bias."""
    d = n_embd
    return vocab * d + positions * d + n_layer * (8 * d * d + 2 * d) + vocab * d + vocab


def _worker(tmp_path, storage, n_trials, mode, keywords):
    return subprocess.Popen([sys.executable, str(WORKER), storage, str(n_trials), mode, json.dumps(keywords)],
                            cwd=tmp_path)


def _journal(storage):
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(storage)))


def _reference(tmp_path, model_params, training_params, **keywords):
    """test_fine_tuning of ``architecture(model_params)`` in a fresh worker process, as the trials ran."""
    fixed = dict(n_epochs=1, model_params=model_params, **training_params, **keywords)
    folder = tmp_path / f"reference-{len(list(tmp_path.glob('reference-*')))}"
    folder.mkdir()
    assert subprocess.run([sys.executable, str(WORKER), str(folder / "out"), "0", "reference", json.dumps(fixed)],
                          cwd=folder, timeout=300).returncode == 0
    return json.loads((folder / "reference.json").read_text())


def test_two_processes_search_depth_width_and_rate_on_a_journal_each_trial_training_its_own_model(tmp_path):
    storage = str(tmp_path / "study.log")
    keywords = dict(architecture=True, search_space=LEARNING_RATE)
    workers = [_worker(tmp_path, storage, 4, "ok", keywords) for _ in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    trials = _journal(storage).trials
    assert len(trials) == 8 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8  # the two processes sampled apart
    assert {(t.params["n_layer"], t.params["n_embd"]) for t in trials} <= {(a, b) for a in (1, 2, 3) for b in (32, 64)}
    for t in trials:  # each trial trained the model its parameters describe, and says what it cost
        assert t.user_attrs["n_parameters"] == tiny_parameters(t.params["n_layer"], t.params["n_embd"])
        assert t.user_attrs["flops_estimate"] == 6 * t.user_attrs["n_parameters"] * t.user_attrs["train_real_tokens"]
        assert t.user_attrs["train_real_tokens"] == sum(len(line) - 1 for line in TRAIN)  # one epoch, every target
        assert t.user_attrs["train_seconds"] > 0
    assert len({t.user_attrs["n_parameters"] for t in trials}) >= 3

    # The rerun of the same call adds a new point.
    assert _worker(tmp_path, storage, 1, "ok", keywords).wait(timeout=300) == 0
    study = _journal(storage)
    assert len(study.trials) == 9 and len({tuple(sorted(t.params.items())) for t in study.trials}) == 9

    # The best trial's value is test_fine_tuning's on model_factory(best model parameters), exactly.
    # The workers' own call (its factory is the study's), joining with no trial of its own: the results.
    result = search(storage, 0, architecture_search=True, search_space=LEARNING_RATE,
                    output_dir=str(tmp_path / "outputs" / "search"), pruning=False)
    best = result["study"].trials[result["best_trial_number"]]
    assert result["best_model_params"] == {name: best.params[name] for name in MODEL_SPACE}
    assert set(result["best_params"]) == {"learning_rate"}
    assert vars(result["best_config"]) == dict(vars(CONFIG), **result["best_model_params"])
    assert list(result["trials"]["n_parameters"]) == [t.user_attrs["n_parameters"] for t in study.trials]
    again = _reference(tmp_path, result["best_model_params"], result["best_params"])
    assert again["final_val_loss"] == result["best_value"]  # fresh processes on both sides: bit for bit

    # Another model family, or other fixed config fields, are refused before any trial, naming the difference.
    built = []

    def other_family(params):
        built.append(params)
        return tiny_gpt2(vocab_size=VOCAB, n_embd=params["n_embd"], n_layer=params["n_layer"], n_head=2)

    call = dict(config=CONFIG, train_data=TRAIN, val_data=VAL, n_trials=1, storage=storage, study_name="shared",
                search_space=LEARNING_RATE, model_space=MODEL_SPACE, output_dir=str(tmp_path / "outputs" / "search"),
                pruning=False, **QUIET)
    with pytest.raises(ValueError, match=r"another set-up.*model family differs.*model_factory .*other_family"):
        test_hyperparameter_search(other_family, **call)
    with pytest.raises(ValueError, match=r"another set-up.*config.vocab_size 50 vs 64"):
        test_hyperparameter_search(lambda p: architecture(p), **dict(call, config=SimpleNamespace(
            vocab_size=64, pad_token_id=0)))
    assert len(built) <= 1 and len(_journal(storage).trials) == 9  # at most the reference model, no trial


def test_a_killed_architecture_trial_resumes_from_its_own_checkpoint_to_the_uninterrupted_value(tmp_path):
    keywords = dict(architecture=True, checkpoint_every=2, search_space=LEARNING_RATE)
    left, first, retry = kill_a_trial_then_retry(tmp_path, keywords, kill_at=5)
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params and retry.user_attrs["resumed_from_step"] == left[-1]
    assert retry.user_attrs["n_parameters"] == tiny_parameters(retry.params["n_layer"], retry.params["n_embd"])
    model_params = {name: retry.params[name] for name in MODEL_SPACE}
    uninterrupted = _reference(tmp_path, model_params, {"learning_rate": retry.params["learning_rate"]},
                               checkpoint_every=2)
    assert retry.user_attrs["resumed_from_step"] < uninterrupted["global_step"]  # inside the epoch
    assert retry.value == uninterrupted["final_val_loss"]  # bit for bit


def _non_dominated(points: dict) -> set:
    """Trial numbers whose (a, b) no other point beats in one and matches or beats in the other (minimising)."""
    return {n for n, (a, b) in points.items()
            if not any(x <= a and y <= b and (x < a or y < b) for m, (x, y) in points.items() if m != n)}


def test_two_objective_search_returns_exactly_the_non_dominated_trials_and_draws_them(tmp_path):
    result = test_hyperparameter_search(lambda p: architecture(p), CONFIG, TRAIN, VAL, n_trials=5,
                                        search_space=LEARNING_RATE, model_space=MODEL_SPACE,
                                        objectives=("val_loss", "params"), output_dir=str(tmp_path), progress=False)
    study = result["study"]
    assert result["objectives"] == ("val_loss", "n_parameters") and len(study.directions) == 2
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(completed) == 5
    points = {t.number: tuple(t.values) for t in completed}
    assert all(values[1] == tiny_parameters(t.params["n_layer"], t.params["n_embd"])
               for t, values in zip(completed, points.values()))
    assert set(result["pareto"]["number"]) == _non_dominated(points)
    for t in completed:  # each trial records the model it trained: its class and the sha256 of its shapes
        built = architecture({"n_layer": t.params["n_layer"], "n_embd": t.params["n_embd"]})
        shapes = [[name, list(parameter.shape)] for name, parameter in built.named_parameters()]
        assert t.user_attrs["model_class"] == type(built).__qualname__
        assert t.user_attrs["model_fingerprint"] == hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    assert set(result["trials"]["value_n_parameters"]) == {v[1] for v in points.values()}
    assert Path(result["plot_paths"]["pareto"]).stat().st_size > 0
    assert result["best_value"] == min(v[0] for v in points.values())


def test_model_space_mistakes_are_refused_before_any_trial():
    built = []
    factory = lambda p: built.append(p) or architecture(p)  # noqa: E731
    call = dict(config=CONFIG, train_data=TRAIN, val_data=VAL, n_trials=1, search_space=LEARNING_RATE, **QUIET)
    mistakes = [
        (dict(model_space={"batch_size": [4, 8]}), "also a test_fine_tuning keyword"),
        (dict(model_space={"learning_rate": [1e-3]}), "also a test_fine_tuning keyword"),
        (dict(model_space={"n_layer": ("int", 3, 1)}), "low"),
        (dict(model_space={"n_layer": ("int", 1.5, 3)}), "int bounds"),
        (dict(model_space={}), "non-empty dict"),
        (dict(model_space={"n_layer": [1, 2], "n_head": [3], "n_embd": [32, 64]},
              model_constraints=lambda p: p["n_embd"] % p["n_head"] == 0), "accept none of the 4 points"),
        (dict(model_constraints=lambda p: True), "needs model_space"),
        (dict(model_space=MODEL_SPACE, model_factory=lambda: architecture({"n_layer": 1, "n_embd": 32})),
         "does not take one argument"),
        (dict(model_space=MODEL_SPACE, model_factory=None, model=TinyCausalLM()), "an instance cannot be rebuilt"),
        (dict(model_space=MODEL_SPACE, objectives=("val_loss", "val_loss")), "distinct names"),
        (dict(model_space=MODEL_SPACE, objectives="accuracy"), "pass one name"),
        (dict(model_space=MODEL_SPACE, objectives="val_bits_per_byte"), "tokenizer= .* or token_bytes="),
    ]
    for change, message in mistakes:
        with pytest.raises((ValueError, TypeError), match=message):
            test_hyperparameter_search(**dict(dict(call, model_factory=factory), **change))
    assert not built


def test_a_factory_that_builds_another_model_than_its_parameters_is_refused_at_that_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    for _ in range(2):
        study.enqueue_trial({"n_layer": 2, "n_embd": 32, "learning_rate": 1e-3})
    calls = []

    def drifting(params):  # the same parameters give another width on the next call
        calls.append(1)
        return architecture(dict(params, n_embd=params["n_embd"] + 16 * (len(calls) > 2)))

    result = test_hyperparameter_search(drifting, CONFIG, TRAIN, VAL, n_trials=2, storage=storage, study_name="s",
                                        search_space=LEARNING_RATE, model_space=MODEL_SPACE, **QUIET)
    assert list(result["trials"]["state"]) == ["COMPLETE", "FAIL"]
    assert "another model from the same parameters {'n_layer': 2, 'n_embd': 32}" in result["trials"]["reason"][1]
    assert "trial 0" in result["trials"]["reason"][1]

    def ignores_depth(params):  # the config it builds says n_layer 1 whatever the trial asked
        return tiny_gpt2(vocab_size=VOCAB, n_embd=params["n_embd"], n_layer=1, n_head=2)

    result = test_hyperparameter_search(ignores_depth, CONFIG, TRAIN, VAL, n_trials=1, search_space=LEARNING_RATE,
                                        model_space={"n_layer": [2, 3], "n_embd": [32]}, **QUIET)
    assert list(result["trials"]["state"]) == ["FAIL"]
    assert "model.config.n_layer is 1, the trial's parameter" in result["trials"]["reason"][0]


def test_without_model_space_a_factory_returning_another_size_is_refused_at_that_trial():
    sizes = iter([32, 48, 32])

    def growing():
        torch.manual_seed(0)
        return TinyCausalLM(vocab_size=VOCAB, d_model=next(sizes))

    result = test_hyperparameter_search(growing, CONFIG, TRAIN, VAL, n_trials=3, search_space=LEARNING_RATE, **QUIET)
    assert list(result["trials"]["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "another model at trial 1 than the study's" in result["trials"]["reason"][1]
    assert "embed.weight [50, 32] vs [50, 48]" in result["trials"]["reason"][1]


def test_points_the_constraints_refuse_are_not_trained_nor_counted():
    built = []

    def heads(params):
        built.append(params)
        torch.manual_seed(0)
        return TinyCausalLM(vocab_size=VOCAB, d_model=params["n_embd"], n_heads=params["n_head"])

    result = test_hyperparameter_search(heads, CONFIG, TRAIN, VAL, n_trials=3, search_space=LEARNING_RATE,
                                        model_space={"n_head": [2, 3], "n_embd": [32, 48]},
                                        model_constraints=lambda p: p["n_embd"] % p["n_head"] == 0, **QUIET)
    trials = result["trials"]
    assert (trials["state"] == "COMPLETE").sum() == 3 and result["n_trials"] == 3
    assert all(p["n_embd"] % p["n_head"] == 0 for p in built)
    refused = trials[trials["state"] == "PRUNED"]
    assert all("model_constraints refuse" in reason for reason in refused["reason"])
    assert all(row.params_n_embd % row.params_n_head for row in refused.itertuples())


def test_trials_of_other_architectures_are_pruned_at_the_steps_the_others_reported(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="p")
    for n_layer, n_embd, learning_rate in ((1, 32, 1e-3), (1, 64, 1e-3), (3, 32, 3.0)):
        study.enqueue_trial({"n_layer": n_layer, "n_embd": n_embd, "learning_rate": learning_rate})
    with pytest.warns(UserWarning, match="recorded before its set-up included the model"):
        result = test_hyperparameter_search(lambda p: architecture(p), CONFIG, TRAIN, VAL, n_trials=3,
                                            storage=storage, study_name="p", model_space=MODEL_SPACE,
                                            search_space={"learning_rate": ("log", 1e-5, 10.0)}, n_epochs=1,
                                            eval_every=2, **QUIET)
    assert list(result["trials"]["state"]) == ["COMPLETE", "COMPLETE", "PRUNED"]
    first, second, pruned = result["study"].trials
    # The architecture does not change the steps: every trial reports at the same optimizer steps.
    assert list(first.intermediate_values) == list(second.intermediate_values)
    assert set(pruned.intermediate_values) < set(first.intermediate_values)  # stopped before its end
    assert pruned.user_attrs["n_parameters"] == tiny_parameters(3, 32)
