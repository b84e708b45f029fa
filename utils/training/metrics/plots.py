"""PNG plots of a run and of a search, shown inline in notebooks.

The figures are built by ``training_figures`` / ``search_figures`` (tests read their axes) and written by
``save_training_plots`` / ``save_search_plots``. Every x-axis counts something (optimizer steps, trials), so
its ticks are integers; every y-axis says its unit.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

LOSS_LABEL = "cross-entropy (nats per real token)"
OBJECTIVE_LABEL = "validation loss (excl. padding)"
MIN_TRIALS_FOR_IMPORTANCES = 8  # fANOVA on fewer completed trials ranks parameters by noise


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def show_inline(png_path) -> None:
    """Show a saved PNG in a Jupyter/Colab notebook (whatever matplotlib backend is active); nothing elsewhere."""
    if _in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(png_path)))


def _integer_x(*axes) -> None:
    """Whole-number x ticks. MaxNLocator(integer=True) falls back to fractional ticks when fewer than two integers
    are in view (one trial, one step), so such a view is widened to two units."""
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        low, high = axis.get_xlim()
        if high - low < 2:
            middle = (low + high) / 2
            axis.set_xlim(middle - 1, middle + 1)


class _PlainLogFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label (minor ones too when the range is under a decade or two),
    written as plain numbers ("600", "2,000", "0.0005") rather than 6×10²."""

    def _num_to_string(self, x, vmin, vmax):
        return f"{x:,.0f}" if x >= 1 else f"{x:.3g}"


def _plain_log_ticks(axis, which: str) -> None:
    target = axis.xaxis if which == "x" else axis.yaxis
    target.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    target.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if which == "x":  # small numbers are long: slanted, neighbours do not overlap
        axis.tick_params(axis="x", which="both", labelrotation=35)


def _study_title(study) -> str:
    name = study.study_name
    return "Search" if name.startswith("no-name-") else f"Search {name}"  # Optuna's in-memory default is a uuid


def _smoothing_window(n: int) -> int:
    return max(1, min(50, n // 10))


def _validation_points(epochs: pd.DataFrame, evals: pd.DataFrame | None) -> list[tuple[str, str, pd.DataFrame]]:
    """(label, marker, frame with 'step', 'loss', 'perplexity') for epoch-end and mid-epoch validations."""
    points = []
    if len(epochs):
        points.append(("validation (epoch end)", "s", pd.DataFrame({
            "step": epochs["global_step"], "loss": epochs["val/loss_excl_padding"],
            "perplexity": epochs["val/perplexity"]})))
    if evals is not None and len(evals):
        points.append(("validation (eval_every)", "o", pd.DataFrame({
            "step": evals["step"], "loss": evals["val/loss_excl_padding"], "perplexity": evals["val/perplexity"]})))
    return points


def training_figures(epochs: pd.DataFrame, steps: pd.DataFrame, evals: pd.DataFrame | None = None,
                     title: str | None = None) -> dict[str, Figure]:
    """``loss``: training loss per optimizer step (raw and smoothed) with the validation points on the same step
    axis, and perplexity on a log axis; ``steps``: learning rate and gradient norm per step."""
    name = f"{title}: " if title else ""
    window = _smoothing_window(len(steps))
    smoothed = steps["train/step_loss_excl_padding"].ewm(span=window, adjust=True).mean()
    validation = _validation_points(epochs, evals)

    figure = Figure(figsize=(12, 4.2))
    loss_ax, ppl_ax = figure.subplots(1, 2)
    loss_ax.plot(steps["step"], steps["train/step_loss_excl_padding"], color="tab:blue", alpha=0.3, lw=0.8,
                 label="training, each step")
    loss_ax.plot(steps["step"], smoothed, color="tab:blue", lw=2, label=f"training, smoothed (EMA span {window})")
    ppl_ax.plot(steps["step"], smoothed.map(_safe_exp), color="tab:blue", lw=2, label="training, smoothed")
    for (label, marker, frame), color in zip(validation, ("tab:orange", "tab:green")):
        loss_ax.plot(frame["step"], frame["loss"], marker, color=color, ms=7, ls="none", label=label)
        ppl_ax.plot(frame["step"], frame["perplexity"], marker, color=color, ms=7, ls="none", label=label)
    loss_ax.set(title="Loss (excl. padding)", xlabel="optimizer step", ylabel=LOSS_LABEL)
    ppl_ax.set(title="Perplexity (excl. padding)", xlabel="optimizer step", ylabel="perplexity (log scale)",
               yscale="log")
    _plain_log_ticks(ppl_ax, "y")
    for axis in (loss_ax, ppl_ax):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    _integer_x(loss_ax, ppl_ax)
    figure.suptitle(f"{name}loss and perplexity per optimizer step")
    figure.tight_layout()

    step_figure = Figure(figsize=(12, 4.2))
    lr_ax, grad_ax = step_figure.subplots(1, 2)
    lr_ax.plot(steps["step"], steps["train/learning_rate"], color="tab:purple")
    lr_ax.set(title="Learning rate (schedule)", xlabel="optimizer step", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    grad_ax.plot(steps["step"], steps["train/grad_norm"], color="tab:red", lw=0.9)
    grad_ax.set(title="Gradient norm (before clipping)", xlabel="optimizer step", ylabel="global L2 norm")
    for axis in (lr_ax, grad_ax):
        axis.grid(alpha=0.3)
    _integer_x(lr_ax, grad_ax)
    step_figure.suptitle(f"{name}learning rate and gradient norm per optimizer step")
    step_figure.tight_layout()
    return {"loss": figure, "steps": step_figure}


def _safe_exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


FILE_NAMES = {"loss": "loss_and_perplexity.png", "steps": "learning_rate_and_grad_norm.png"}


def save_training_plots(epochs, steps, output_dir: Path, evals=None, title: str | None = None) -> dict[str, str]:
    """Write the training figures as PNGs under ``output_dir`` (and show them inline in a notebook)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, figure in training_figures(epochs, steps, evals, title).items():
        path = Path(output_dir) / FILE_NAMES[key]
        figure.savefig(path, dpi=100)
        show_inline(path)
        paths[key] = str(path)
    return paths


def plot_rows(rows, output_dir, title: str | None = None) -> dict[str, str]:
    """The training figures of a run's :class:`~utils.training.metrics.MetricRows` (none before its first epoch)."""
    if not rows.epoch_rows:
        return {}
    return save_training_plots(rows.epochs_frame(), rows.steps_frame(), Path(output_dir), evals=rows.evals_frame(),
                               title=run_title(output_dir, title))


def run_title(output_dir, name: str | None = None) -> str:
    """A run's title: its W&B run name when it has one, else the name of its output folder."""
    return name or Path(output_dir).name


# ---- the search ---------------------------------------------------------------------------------
def _trial_points(study):
    """(completed [(number, value, params)], pruned [(number, last reported value)])."""
    from optuna.trial import TrialState

    completed, pruned = [], []
    for trial in study.trials:
        value = trial.values[0] if trial.values else None  # several objectives: the first one
        if trial.state == TrialState.COMPLETE and value is not None and math.isfinite(value):
            completed.append((trial.number, value, trial.params))
        elif trial.state == TrialState.PRUNED and trial.intermediate_values:
            pruned.append((trial.number, trial.intermediate_values[max(trial.intermediate_values)]))
    return completed, pruned


def _history_figure(study, completed, pruned, label: str = OBJECTIVE_LABEL) -> Figure:
    figure = Figure(figsize=(7, 4.2))
    axis = figure.subplots()
    numbers = [n for n, _, _ in completed]
    values = [v for _, v, _ in completed]
    best = pd.Series(values).cummin()
    axis.plot(numbers, values, "o", color="tab:blue", ls="none", label="completed trial")
    if pruned:
        axis.plot([n for n, _ in pruned], [v for _, v in pruned], "x", color="tab:gray", ls="none",
                  label="pruned trial (last validation)")
    axis.plot(numbers, best, drawstyle="steps-post", color="tab:red", lw=2, label="best so far")
    axis.set(title=f"{_study_title(study)}: {label.split(' (')[0]} per trial", xlabel="trial number", ylabel=label)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    _integer_x(axis)
    figure.tight_layout()
    return figure


def _params_figure(study, completed, label: str = OBJECTIVE_LABEL) -> Figure:
    names = sorted({name for _, _, params in completed for name in params})
    figure = Figure(figsize=(4.5 * max(1, len(names)), 4.2))
    axes = figure.subplots(1, max(1, len(names)), squeeze=False)[0]
    distributions = {name: distribution for trial in study.trials for name, distribution in trial.distributions.items()}
    best_value = min(v for _, v, _ in completed)
    for axis, name in zip(axes, names):
        pairs = [(params[name], value) for _, value, params in completed if name in params]
        xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            axis.plot(xs, ys, "o", color="tab:blue", ls="none", label="completed trial")
            if getattr(distributions.get(name), "log", False):
                axis.set_xscale("log")
                _plain_log_ticks(axis, "x")
        else:  # categorical: one position per choice
            choices = sorted({str(x) for x in xs})
            axis.plot([choices.index(str(x)) for x in xs], ys, "o", color="tab:blue", ls="none",
                      label="completed trial")
            axis.set_xticks(range(len(choices)), choices)
        best_x = [x for x, y in pairs if y == best_value][:1]
        if best_x and isinstance(best_x[0], (int, float)):
            axis.plot(best_x, [best_value], "*", color="tab:red", ms=14, ls="none", label="best")
        scale = " (log scale)" if axis.get_xscale() == "log" else ""
        axis.set(title=f"objective vs {name}", xlabel=f"{name}{scale}", ylabel=label)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{_study_title(study)}: each parameter against the objective")
    figure.tight_layout()
    return figure


def _importances_figure(study, n_completed: int) -> Figure:
    figure = Figure(figsize=(7, 3.5))
    axis = figure.subplots()
    if n_completed < MIN_TRIALS_FOR_IMPORTANCES:
        axis.axis("off")
        axis.text(0.5, 0.5, importances_note(n_completed), ha="center", va="center", wrap=True, fontsize=11)
        return figure
    import optuna

    import warnings

    several = len(study.directions) > 1  # then the first objective's importances
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*low `target` values")  # Optuna's note on any target: minimised
        importances = optuna.importance.get_param_importances(study,
                                                              target=(lambda t: t.values[0]) if several else None)
    names = list(importances)[::-1]
    axis.barh(names, [importances[n] for n in names], color="tab:blue")
    axis.set(title=f"{_study_title(study)}: parameter importances ({n_completed} completed trials)",
             xlabel="importance (fANOVA, share of the objective's variance)")
    axis.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    return figure


def importances_note(n_completed: int) -> str:
    return (f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCES} completed trials to mean something; "
            f"this search has {n_completed}.")


def search_figures(study, label: str = OBJECTIVE_LABEL) -> dict[str, Figure]:
    """``history`` (trial values and best so far vs trial number), ``params`` (objective vs each parameter) and
    ``importances`` (a bar chart, or a note saying too few trials completed)."""
    completed, pruned = _trial_points(study)
    if not completed:
        return {}
    return {"history": _history_figure(study, completed, pruned, label),
            "params": _params_figure(study, completed, label),
            "importances": _importances_figure(study, len(completed))}


def pareto_figure(frame: pd.DataFrame, front: pd.DataFrame, columns: list[str], labels: dict, title: str) -> Figure:
    """The completed trials on the first two of ``columns`` (``labels``: column -> axis label), the non-dominated
    ones joined as a staircase and labelled with their parameters."""
    x_name, y_name = columns[1], columns[0]  # the cost across, the loss up
    figure = Figure(figsize=(7.5, 4.8))
    axis = figure.subplots()
    done = frame[frame["state"] == "COMPLETE"].dropna(subset=columns[:2])
    axis.plot(done[x_name], done[y_name], "o", color="tab:blue", alpha=0.5, ls="none", label="completed trial")
    ordered = front.sort_values(x_name)
    axis.plot(ordered[x_name], ordered[y_name], "o-", color="tab:red", drawstyle="steps-post", lw=1.5,
              label="Pareto front (not dominated)")
    parameters = [c for c in frame.columns if c.startswith("params_")]
    for _, row in ordered.iterrows():
        text = ", ".join(f"{c[len('params_'):]}={_short_value(row[c])}" for c in parameters)
        axis.annotate(text, (row[x_name], row[y_name]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if x_name in ("n_parameters", "flops_estimate") and len(done) and done[x_name].max() > 4 * done[x_name].min():
        axis.set_xscale("log")
    axis.set(title=f"{title}: {labels.get(y_name, y_name)} against {labels.get(x_name, x_name)}",
             xlabel=labels.get(x_name, x_name), ylabel=labels.get(y_name, y_name))
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _short_value(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def save_search_plots(study, output_dir: Path, front: tuple | None = None) -> dict[str, str]:
    """Write ``search_<name>.png`` for each search figure under ``output_dir`` (shown inline in a notebook);
    ``front``: (trials frame, Pareto rows, their columns, axis labels) adds ``search_pareto.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    label = OBJECTIVE_LABEL if front is None else front[3].get(front[2][0], front[2][0])  # the (first) objective
    figures = search_figures(study, label)
    if front is not None and figures and len(front[1]):
        figures["pareto"] = pareto_figure(*front, title=_study_title(study))
    for name, figure in figures.items():
        path = output_dir / f"search_{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        show_inline(path)
        paths[name] = str(path)
    return paths
