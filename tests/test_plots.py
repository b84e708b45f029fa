"""What the plots show (issue 26): per-step training loss with validation points on one step axis, perplexity
on a log axis, integer ticks, units and a title; the search's history, parameter and importance figures."""
import math

import optuna
import pandas as pd
import pytest
from matplotlib.ticker import MaxNLocator
from PIL import Image

from utils.training.metrics import EPOCH_COLUMNS, MetricRows
from utils.training.metrics import OBJECTIVE_LABEL, plot_rows, run_title, search_figures, training_figures

N_STEPS = 30


def _frames(one_epoch=True):
    steps = pd.DataFrame({"step": range(1, N_STEPS + 1), "epoch": 1,
                          "train/step_loss_excl_padding": [5 - 0.1 * i for i in range(N_STEPS)],
                          "train/learning_rate": [1e-3] * N_STEPS,
                          "train/grad_norm": [1.0 + (i % 3) for i in range(N_STEPS)]})
    epochs = pd.DataFrame([{c: None for c in EPOCH_COLUMNS} | {"epoch": 1, "global_step": N_STEPS,
                                                                "val/loss_excl_padding": 2.5,
                                                                "val/perplexity": math.exp(2.5)}])
    evals = pd.DataFrame({"step": [10, 20], "epoch": 1, "val/loss_excl_padding": [4.0, 3.0],
                          "val/perplexity": [math.exp(4.0), math.exp(3.0)]})
    return epochs, steps, evals


def _integer_ticks(axis):
    locator = axis.xaxis.get_major_locator()
    return isinstance(locator, MaxNLocator) and locator._integer


def test_one_epoch_run_shows_every_step_and_the_validations_on_the_step_axis():
    epochs, steps, evals = _frames()
    figures = training_figures(epochs, steps, evals, title="my-run")
    loss_ax, ppl_ax = figures["loss"].axes
    assert "my-run" in figures["loss"]._suptitle.get_text() and "my-run" in figures["steps"]._suptitle.get_text()
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert len(labels) == 4 and labels[0] == "training, each step" and labels[1].startswith("training, smoothed")
    raw, smoothed, epoch_val, mid_val = loss_ax.get_lines()
    assert list(raw.get_xdata()) == list(range(1, N_STEPS + 1))  # every step, not one dot per epoch
    # The smoothed line lags a falling loss.
    assert len(smoothed.get_xdata()) == N_STEPS and smoothed.get_ydata()[-1] > raw.get_ydata()[-1]
    assert list(epoch_val.get_xdata()) == [N_STEPS] and list(mid_val.get_xdata()) == [10, 20]
    assert loss_ax.get_xlabel() == ppl_ax.get_xlabel() == "optimizer step"
    assert "nats per real token" in loss_ax.get_ylabel()
    assert ppl_ax.get_yscale() == "log" and "perplexity" in ppl_ax.get_ylabel()
    assert list(ppl_ax.get_lines()[2].get_ydata()) == pytest.approx([math.exp(4.0), math.exp(3.0)])
    lr_ax, grad_ax = figures["steps"].axes
    assert lr_ax.get_ylabel() == "learning rate" and "norm" in grad_ax.get_ylabel()
    assert [len(a.get_lines()) for a in (lr_ax, grad_ax)] == [1, 1]
    assert all(_integer_ticks(a) for a in (loss_ax, ppl_ax, lr_ax, grad_ax))


def test_without_mid_epoch_validation_there_is_no_empty_series():
    epochs, steps, _ = _frames()
    loss_ax, _ = training_figures(epochs, steps, None)["loss"].axes
    assert [line.get_label() for line in loss_ax.get_lines()][2:] == ["validation (epoch end)"]


def test_tracker_plot_writes_pngs_titled_with_the_run(tmp_path):
    epochs, steps, evals = _frames()
    rows = MetricRows()
    rows.step_rows, rows.epoch_rows, rows.eval_rows = (f.to_dict("records") for f in (steps, epochs, evals))
    paths = plot_rows(rows, tmp_path / "demo-run")
    assert set(paths) == {"loss", "steps"} and run_title(tmp_path / "demo-run") == "demo-run"
    for path in paths.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 1000


def _study(values, name="plots", with_pruned=True):
    study = optuna.create_study(study_name=name)
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "warmup_ratio": optuna.distributions.FloatDistribution(0.0, 0.2)}
    for i, value in enumerate(values):
        params = {"learning_rate": 1e-4 * (1.5 ** i), "warmup_ratio": 0.02 * (i % 10)}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    pruned = optuna.trial.create_trial(params={"learning_rate": 1e-3, "warmup_ratio": 0.1}, distributions=distributions,
                                       state=optuna.trial.TrialState.PRUNED, intermediate_values={3: 9.0})
    if with_pruned:
        study.add_trial(pruned)
    return study


def test_search_history_names_the_objective_and_counts_trials_in_integers():
    figures = search_figures(_study([4.0, 3.0, 3.5]))
    axis = figures["history"].axes[0]
    assert axis.get_ylabel() == OBJECTIVE_LABEL == "validation loss (excl. padding)"
    assert axis.get_xlabel() == "trial number" and _integer_ticks(axis)
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"completed trial", "pruned trial (last validation)", "best so far"}
    assert list(lines["best so far"].get_ydata()) == [4.0, 3.0, 3.0]
    assert list(lines["pruned trial (last validation)"].get_xdata()) == [3]
    assert "plots" in axis.get_title()


def test_a_one_trial_search_history_still_ticks_whole_trial_numbers():
    axis = search_figures(_study([4.0], with_pruned=False))["history"].axes[0]
    ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # MaxNLocator falls back to fractions in a narrow view


def test_search_parameter_plot_uses_a_log_axis_for_the_learning_rate():
    lr_ax, warmup_ax = search_figures(_study([4.0, 3.0, 3.5]))["params"].axes
    assert lr_ax.get_xscale() == "log" and warmup_ax.get_xscale() == "linear"
    assert lr_ax.get_ylabel() == OBJECTIVE_LABEL and lr_ax.get_xlabel().startswith("learning_rate")
    assert len(lr_ax.get_lines()[0].get_xdata()) == 3  # completed trials only


def test_importances_only_from_eight_completed_trials():
    few = search_figures(_study([4.0, 3.0, 3.5]))["importances"].axes[0]
    assert not few.patches and "at least 8 completed trials" in few.texts[0].get_text()
    many = search_figures(_study([4.0 - 0.1 * i for i in range(8)]))["importances"].axes[0]
    assert len(many.patches) == 2 and not many.texts
    assert {t.get_text() for t in many.get_yticklabels()} == {"learning_rate", "warmup_ratio"}
