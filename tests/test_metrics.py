"""Metrics that say what they are: W&B offline, no-W&B fallback, CSV after interruption, plots (issue 5)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from models import StopAtForward, TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from wandb_reader import history_and_config

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
EPOCH_METRICS = ["train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity", "train/accuracy_excl_padding",
                 "val/accuracy_excl_padding", "learning_rate", "train/pad_fraction", "train/real_tokens",
                 "train/padded_tokens"]
STEP_METRICS = ["train/step_loss_excl_padding", "train/learning_rate", "train/grad_norm", "train/real_tokens_per_sec"]


def _model():
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=VOCAB)


def _run(tmp_path, model=None, **kwargs):
    kwargs = dict(dict(n_epochs=2, batch_size=16, learning_rate=1e-3, progress=False,
                       output_dir=str(tmp_path / "out")), **kwargs)
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        return test_fine_tuning(model or _model(), CONFIG, **kwargs)


def test_offline_wandb_run_holds_the_metric_names_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = _run(tmp_path, use_wandb=True, wandb_project="tests", wandb_run_name="offline-check")
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and result["wandb_run_id"] in run_files[0].name
    rows, config = history_and_config(run_files[0])
    logged = set().union(*rows)
    assert set(EPOCH_METRICS + STEP_METRICS) <= logged
    epoch_rows = [r for r in rows if "val/perplexity" in r]
    assert ([json.loads(r["val/perplexity"]) for r in epoch_rows]
            == pytest.approx(list(result["metrics_summary"]["val/perplexity"])))
    assert {"learning_rate", "batch_size", "pad_token_id", "pad_token_id_source", "n_parameters"} <= config


def test_wandb_failure_warns_once_and_keeps_metrics(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # "pip uninstall wandb": import raises ImportError
    with pytest.warns(UserWarning, match="W&B logging is off"):
        result = _run(tmp_path, use_wandb=True)
    assert len(result["metrics_summary"]) == 2 and result["wandb_run_id"] is None
    assert len(result["loss_history"]) == result["global_step"] > 0


@pytest.mark.parametrize("interrupt_at", [20, 3])  # in epoch 2 (after one full epoch), and in epoch 1
def test_interrupted_run_returns_partial_results_and_the_csv_matches(tmp_path, interrupt_at):
    model = StopAtForward(_model(), interrupt_at)  # 13 training steps per epoch
    result = _run(tmp_path, model=model, log_every=4)
    assert result["interrupted"] and result["stopped_early"]
    assert result["global_step"] == interrupt_at - 1 == len(result["loss_history"])  # every completed step kept
    epochs = pd.read_csv(result["metrics_csv"])
    steps = pd.read_csv(result["steps_csv"])
    assert len(epochs) == (1 if interrupt_at > 13 else 0)
    # metrics_summary is a DataFrame subclass that prints whole (summary_table.py): compare the values
    pd.testing.assert_frame_equal(epochs, result["metrics_summary"], check_dtype=False, check_frame_type=False)
    pd.testing.assert_frame_equal(steps, result["steps_summary"], check_dtype=False)


def test_plots_are_valid_png_images(tmp_path):
    result = _run(tmp_path)
    assert set(result["plot_paths"]) == {"loss", "steps"}
    for path in result["plot_paths"].values():
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
        assert Path(path).parent == tmp_path / "out"


def test_metric_names_say_excl_padding(tmp_path):
    result = _run(tmp_path, n_epochs=1)
    loss_columns = [c for c in result["metrics_summary"].columns if "loss" in c or "accuracy" in c]
    assert loss_columns and all(c.endswith("excl_padding") for c in loss_columns)
