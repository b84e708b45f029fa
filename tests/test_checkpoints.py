"""Checkpoints, exact resume after SIGKILL, damaged checkpoints, early stopping, best model (issue 11)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import resume_worker
from models import TinyCausalLM
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

WORKER = Path(resume_worker.__file__)
WANDB = {"use_wandb": True, "wandb_mode": "offline"}


def _worker(mode, out_dir, extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_DIR=str(out_dir))
    return subprocess.run([sys.executable, str(WORKER), mode, str(out_dir), json.dumps(extra or {})], cwd=out_dir,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    full, killed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("killed")
    assert _worker("full", full, WANDB).returncode == 0
    done = _worker("killed", killed, WANDB)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    snapshot = tmp_path_factory.mktemp("snapshot") / "run"
    shutil.copytree(killed / "run", snapshot)  # the state right after the kill, for the damaged-checkpoint test
    resumed = _worker("resume", killed, WANDB)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return full, killed, snapshot


def _load(directory, mode):
    return json.loads((directory / f"{mode}.json").read_text()), torch.load(directory / f"{mode}-weights.pt")


def _assert_same_run(a, weights_a, b, weights_b):
    assert a["loss_history"] == b["loss_history"]
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["epochs"] == b["epochs"]
    for key, value in weights_a.items():
        assert (weights_b[key] - value).abs().max() <= 1e-6, key


def _checkpoint_steps(reference, upto):
    """Steps that get a checkpoint: every 3rd (checkpoint_every=3) and each epoch's end, up to ``upto``."""
    every = resume_worker.SETTINGS["checkpoint_every"]
    epoch_ends = reference["epochs"]["global_step"]
    return sorted(set(range(every, upto + 1, every)) | {s for s in epoch_ends if s <= upto})


# Token-budget steps hold exactly gradient_accumulation_steps forwards each, so the kill at forward 21 falls in
# optimizer step 11 and the last checkpoint before it is the last of those up to step 10.
KILLED_IN_STEP = (resume_worker.KILL_AT_FORWARD + 1) // resume_worker.SETTINGS["gradient_accumulation_steps"]


def test_killed_run_resumes_to_the_uninterrupted_result(runs):
    full, killed, _ = runs
    reference, reference_weights = _load(full, "full")
    resumed, resumed_weights = _load(killed, "resume")
    last = _checkpoint_steps(reference, KILLED_IN_STEP - 1)[-1]
    assert last not in reference["epochs"]["global_step"]  # a mid-epoch resume: the hard case
    assert resumed["resumed_from_step"] == last and resumed["resumed_from_checkpoint"].endswith(f"step-{last}")
    assert resumed["global_step"] == reference["global_step"] > KILLED_IN_STEP
    _assert_same_run(reference, reference_weights, resumed, resumed_weights)


def test_checkpoint_layout_and_pruning(runs):
    full, killed, snapshot = runs
    reference, _ = _load(full, "full")
    kept = lambda steps: sorted(["best"] + [f"step-{s}" for s in steps[-2:]])  # noqa: E731 - keep_checkpoints=2
    assert (sorted(p.name for p in (snapshot / "checkpoints").iterdir())
            == kept(_checkpoint_steps(reference, KILLED_IN_STEP - 1)))
    assert (sorted(p.name for p in (killed / "run" / "checkpoints").iterdir())
            == kept(_checkpoint_steps(reference, reference["global_step"])))
    newest = _checkpoint_steps(reference, KILLED_IN_STEP - 1)[-1]
    assert ({"model.pt", "optimizer.pt", "trainer_state.pt", "meta.json"}
            <= {p.name for p in (snapshot / "checkpoints" / f"step-{newest}").iterdir()})


def test_wandb_run_continues_with_the_same_id(runs):
    _, killed, _ = runs
    resumed, _ = _load(killed, "resume")
    assert resumed["wandb_run_id"] and len(list(killed.glob(f"wandb/offline-run-*-{resumed['wandb_run_id']}"))) == 2


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(runs, tmp_path):
    full, _, snapshot = runs
    reference, reference_weights = _load(full, "full")
    previous, newest = _checkpoint_steps(reference, KILLED_IN_STEP - 1)[-2:]
    shutil.copytree(snapshot, tmp_path / "run")
    damaged = tmp_path / "run" / "checkpoints" / f"step-{newest}" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    # A new process, like the reference run: same thread count, so the same floating-point reductions.
    done = _worker("resume", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Skipping checkpoint" in done.stderr and f"step-{newest}" in done.stderr
    resumed, resumed_weights = _load(tmp_path, "resume")
    assert resumed["resumed_from_step"] == previous
    _assert_same_run(reference, reference_weights, resumed, resumed_weights)


@pytest.mark.parametrize("change, words", [
    ({"train": "other"}, "different training data"),
    ({"batch_size": 2}, "batch_size=4"),
    ({"random_seed": 7}, "random_seed=42"),
])
def test_resume_onto_other_data_or_settings_is_refused(runs, tmp_path, change, words):
    _, _, snapshot = runs
    shutil.copytree(snapshot, tmp_path / "run")
    if change.get("train") == "other":
        change = {"train": resume_worker.data(seed=9)}
    with pytest.raises(ValueError, match=words):
        resume_worker.run("resume", str(tmp_path), **change)


def _sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 50, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g) for _ in range(n)]


def test_early_stopping_after_patience_epochs_without_improvement():
    torch.manual_seed(0)
    result = test_fine_tuning(TinyCausalLM(vocab_size=50), SimpleNamespace(vocab_size=50, pad_token_id=0),
                              _sequences(16, 1), _sequences(8, 2), n_epochs=10, learning_rate=0.0,
                              early_stopping_patience=2, progress=False, save_plots=False)
    assert len(result["metrics_summary"]) == 3  # epoch 1 sets the best; 2 and 3 do not improve on it
    assert result["stopped_early"] and "early stopping" in result["stop_reason"] and result["best_epoch"] == 1


def test_load_best_model_at_end_restores_the_best_epoch():
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=50)
    config = SimpleNamespace(vocab_size=50, pad_token_id=0)
    train, val = _sequences(8, 3), _sequences(16, 4)  # tiny random data: it overfits, validation loss turns up
    result = test_fine_tuning(model, config, train, val, n_epochs=12, learning_rate=1e-2, batch_size=4,
                              warmup_ratio=0.0, lr_schedule="constant", load_best_model_at_end=True, progress=False,
                              save_plots=False)
    losses = list(result["metrics_summary"]["val/loss_excl_padding"])
    best = min(range(len(losses)), key=losses.__getitem__)
    assert best < len(losses) - 1  # the best epoch is not simply the last one
    assert result["best_epoch"] == best + 1 and Path(result["best_checkpoint"]).name == "best"
    assert evaluate_perplexity(model, val, config, batch_size=4)["loss"] == pytest.approx(losses[best], rel=1e-6)


def test_raising_n_epochs_continues_a_finished_run(runs, tmp_path):
    full, killed, _ = runs
    reference, _ = _load(full, "full")
    shutil.copytree(killed / "run", tmp_path / "run")
    result = resume_worker.run("resume", str(tmp_path), n_epochs=3)
    assert result["resumed_from_step"] == reference["global_step"] < result["global_step"]
    assert (list(result["metrics_summary"]["epoch"]) == [1, 2, 3]
            and len(result["loss_history"]) == result["global_step"])
    assert result["loss_history"][:reference["global_step"]] == reference["loss_history"]
