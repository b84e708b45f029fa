"""What a search trial costs beside its loss, the objectives a search minimises, and the Pareto front of them.

Every trial records (as Optuna user attributes, columns of ``results["trials"]``): ``n_parameters``,
``train_real_tokens`` (real target tokens of every optimizer step), ``train_seconds`` (the training phase, across a
resume), ``flops_estimate`` = 6 x parameters x tokens (forward 2, backward 4 multiply-adds per parameter and token;
attention's own terms left out, as in the Chinchilla/Kaplan estimates) and its validation loss and bits per byte.
"""
from __future__ import annotations

import math

import pandas as pd

# name -> what it is; every objective is minimised
OBJECTIVES = {
    "val_loss": "validation loss (excl. padding)",
    "val_bits_per_byte": "validation bits per byte",
    "n_parameters": "parameters",
    "train_seconds": "training seconds",
    "flops_estimate": "training FLOPs (6 x parameters x tokens)",
}
ALIASES = {"loss": "val_loss", "bits_per_byte": "val_bits_per_byte", "params": "n_parameters",
           "parameters": "n_parameters", "time": "train_seconds", "flops": "flops_estimate"}
COST_COLUMNS = ("n_parameters", "train_real_tokens", "train_seconds", "flops_estimate", "val_loss",
                "val_bits_per_byte", "model_class", "model_fingerprint")


def canonical_objectives(objectives, bytes_known: bool) -> tuple[str, ...]:
    """``objectives`` (a name or a sequence of names, all minimised) in their canonical names; raises before any
    trial on an unknown or repeated name, or bits per byte without a tokenizer or ``token_bytes``."""
    given = ("val_loss",) if objectives is None else (objectives,) if isinstance(objectives, str) else objectives
    try:
        names = tuple(ALIASES.get(name, name) for name in given)
    except TypeError:
        names = ()
    if not names or any(name not in OBJECTIVES for name in names) or len(set(names)) != len(names):
        raise ValueError(f"objectives={objectives!r}: pass one name or a tuple of distinct names from "
                         f"{sorted(OBJECTIVES)} (aliases {sorted(ALIASES)}), all minimised, e.g. "
                         "objectives=('val_loss', 'n_parameters') for the Pareto front of loss against size.")
    if "val_bits_per_byte" in names and not bytes_known:
        raise ValueError("objectives names val_bits_per_byte, which needs to know how many bytes each token stands "
                         "for: pass tokenizer= (a Hugging Face or tokenizers tokenizer) or token_bytes= (bytes per "
                         "token id).")
    return names


def cost_of(results: dict, n_parameters: int) -> dict:
    """A trial's cost and measured values from its ``test_fine_tuning`` results."""
    steps = results["steps_summary"]
    tokens = int(steps["train/step_real_tokens"].sum()) if len(steps) else 0
    return {"n_parameters": int(n_parameters), "train_real_tokens": tokens,
            "train_seconds": float(results["training_time_seconds"]),
            "flops_estimate": 6.0 * n_parameters * tokens,
            "val_loss": results["final_val_loss"], "val_bits_per_byte": results["val_bits_per_byte"]}


def objective_values(results: dict, n_parameters: int, objectives: tuple) -> list:
    cost = cost_of(results, n_parameters)
    return [cost[name] for name in objectives]


def pareto_columns(objectives: tuple) -> list[str]:
    """The front's axes: the objectives; a single one against the parameter count (is the bigger model worth it)."""
    if len(objectives) > 1:
        return list(objectives)
    return [objectives[0], "n_parameters" if objectives[0] != "n_parameters" else "val_loss"]


def pareto_front(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The completed trials no other completed trial dominates (as good in every column and better in one), sorted
    by the first column."""
    if frame.empty or any(column not in frame for column in columns):
        return frame.iloc[0:0]
    done = frame[frame["state"] == "COMPLETE"].dropna(subset=columns)
    points = done[columns].astype(float).to_numpy()
    keep = [i for i, point in enumerate(points)
            if all(math.isfinite(v) for v in point)
            and not any((other <= point).all() and (other < point).any() for other in points)]
    return done.iloc[keep].sort_values(columns).reset_index(drop=True)


def trials_frame(study, objectives: tuple = ("val_loss",)) -> pd.DataFrame:
    """One row per trial: number, state, value (the first objective), one column per objective when there are
    several, the parameters, the cost columns, duration, reason and the trial it retries."""
    rows = []
    for trial in study.trials:
        duration = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                    if trial.datetime_complete and trial.datetime_start else None)
        values = trial.values or []
        per_objective = ({f"value_{name}": value for name, value in zip(objectives, values)}
                         if len(objectives) > 1 else {})
        rows.append({"number": trial.number, "state": trial.state.name, "value": values[0] if values else None,
                     **per_objective, **{f"params_{k}": v for k, v in trial.params.items()},
                     **{column: trial.user_attrs.get(column) for column in COST_COLUMNS}, "duration_s": duration,
                     "reason": trial.user_attrs.get("reason"), "retry_of": trial.system_attrs.get("failed_trial")})
    return pd.DataFrame(rows)
