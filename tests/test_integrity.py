"""Nothing silently wrong, nothing lost (issue 16): one test per failure found by a hostile user."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from models import TinyCausalLM, random_lines, tiny_gpt2
from utils.tier3_training_utilities import test_fine_tuning

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)


_data = random_lines


TRAIN, VAL = _data(), _data(8, seed=1)


def _model():
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=VOCAB)


def _run(output_dir, model=None, **kwargs):
    options = dict(n_epochs=2, batch_size=4, progress=False, save_plots=False, output_dir=str(output_dir))
    return test_fine_tuning(model or _model(), CONFIG, kwargs.pop("train", TRAIN), kwargs.pop("val", VAL),
                            **dict(options, **kwargs))


# 1. Run ownership --------------------------------------------------------------------------------------
def test_fresh_run_into_another_runs_checkpoints_is_refused(tmp_path):
    _run(tmp_path, checkpoint_every=2)
    with pytest.raises(ValueError, match="already holds checkpoints of another run.*resume_from_checkpoint=True"):
        _run(tmp_path, n_epochs=1, checkpoint_every=2)
    # A run that writes no checkpoint may share the folder (its metrics files are its own).
    assert _run(tmp_path, n_epochs=1)["global_step"] > 0


def test_a_live_process_holding_the_folder_stops_a_second_one(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        tmp_path.mkdir(exist_ok=True)
        (tmp_path / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(RuntimeError, match=f"pid {other.pid}.*another output_dir"):
            _run(tmp_path, n_epochs=1)
    finally:
        other.kill()
        other.wait()
    with pytest.warns(UserWarning, match="no longer alive"):  # the same lock, its process now gone: taken over
        assert _run(tmp_path, n_epochs=1)["global_step"] > 0
    assert not (tmp_path / ".lock").exists()  # released at the end


# 2. A flipped bit ------------------------------------------------------------------------------------------
def test_flipped_bit_in_a_checkpoint_is_skipped_like_truncation(tmp_path):
    first = _run(tmp_path, n_epochs=1, checkpoint_every=2)
    newest = Path(first["last_checkpoint"])
    model_file = newest / "model.pt"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # same size, still loadable
    model_file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=f"Skipping checkpoint .*{newest.name}.*sha256"):
        resumed = _run(tmp_path, resume_from_checkpoint=True, checkpoint_every=2)
    assert resumed["resumed_from_checkpoint"] != str(newest)
    assert all(math.isfinite(v) for v in resumed["loss_history"])


# 3. Best model and step checkpoint cannot disagree --------------------------------------------------------
def test_best_model_after_a_kill_between_step_and_best(tmp_path):
    # Validation on training lines: it improves every epoch, so epoch 2 is the best.
    config = dict(learning_rate=3e-3, lr_schedule="constant", warmup_ratio=0.0, load_best_model_at_end=True,
                  val=TRAIN[:8])
    _run(tmp_path, n_epochs=1, **config)
    stale_best = tmp_path.parent / "stale-best"
    shutil.copytree(tmp_path / "checkpoints" / "best", stale_best)  # best/ as it was after epoch 1
    finished = _run(tmp_path, n_epochs=2, resume_from_checkpoint=True, **config)
    assert finished["best_epoch"] == 2
    # What the previous order (step folder, then best/) could leave after a kill: the step says epoch 2 is
    # the best, best/ still holds epoch 1.
    shutil.rmtree(tmp_path / "checkpoints" / "best")
    shutil.copytree(stale_best, tmp_path / "checkpoints" / "best")
    model = _model()
    again = _run(tmp_path, model=model, n_epochs=2, resume_from_checkpoint=True, **config)
    assert again["best_epoch"] == 2 and again["best_checkpoint"] == finished["last_checkpoint"]
    epoch_two = torch.load(Path(finished["last_checkpoint"]) / "model.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, epoch_two[name]), name


# 4. Resume refuses a different run; a raised n_epochs does not start at LR 0 --------------------------------
@pytest.mark.parametrize("change, named", [
    (dict(learning_rate=1e-2), "learning_rate=5e-05"), (dict(weight_decay=0.1), "weight_decay=0.01"),
    (dict(lr_schedule="linear"), "lr_schedule='cosine'"), (dict(warmup_ratio=0.2), "warmup_ratio=0.1"),
    (dict(max_grad_norm=None), "max_grad_norm=1.0"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=1"),
    (dict(val=_data(8, seed=5)), "different validation data"),
])
def test_resume_with_a_changed_setting_is_refused(tmp_path, change, named):
    _run(tmp_path, n_epochs=1, checkpoint_every=2)
    with pytest.raises(ValueError, match=re_escape(named)):
        _run(tmp_path, n_epochs=1, resume_from_checkpoint=True, checkpoint_every=2, **change)


def re_escape(text):
    import re

    return re.escape(text)


def test_raising_n_epochs_continues_on_the_new_schedule_not_at_lr_zero(tmp_path):
    done = _run(tmp_path, n_epochs=1, learning_rate=1e-3, warmup_ratio=0.0, checkpoint_every=100)
    assert done["steps_summary"]["train/learning_rate"].iloc[-1] < 1e-4  # the cosine was near its end
    more = _run(tmp_path, n_epochs=2, learning_rate=1e-3, warmup_ratio=0.0, checkpoint_every=100,
                resume_from_checkpoint=True)
    steps = more["steps_summary"]
    first_resumed = steps["train/learning_rate"].iloc[done["global_step"]]
    total, step = more["global_step"], done["global_step"]
    assert first_resumed == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / total)))


# 5. Gradients left on the model ---------------------------------------------------------------------------
def test_gradients_left_on_the_model_do_not_join_the_first_step(tmp_path):
    clean = _model()
    _run(tmp_path / "a", model=clean, n_epochs=1)
    dirty = _model()
    for parameter in dirty.parameters():
        parameter.grad = torch.full_like(parameter, 5.0)
    _run(tmp_path / "b", model=dirty, n_epochs=1)
    for p, q in zip(clean.parameters(), dirty.parameters()):
        assert torch.equal(p, q)


# 6. A non-finite step never reaches the weights -----------------------------------------------------------
def test_non_finite_step_is_stopped_before_its_update(tmp_path):
    model = _model()
    result = _run(tmp_path, model=model, n_epochs=3, learning_rate=1e6, max_grad_norm=None, warmup_ratio=0.0,
                  lr_schedule="constant", log_every=10)
    assert result["stopped_early"] and "not finite" in result["stop_reason"]
    assert "learning_rate" in result["stop_reason"] and "max_grad_norm=None" in result["stop_reason"]
    assert result["global_step"] == len(result["loss_history"])
    assert f"optimizer step {result['global_step'] + 1}" in result["stop_reason"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(__import__("pandas").read_csv(tmp_path / "metrics_steps.csv")) == result["global_step"]


# 7. Sequences longer than the model's positions ------------------------------------------------------------
def test_too_long_example_is_named_before_any_step():
    model = tiny_gpt2(vocab_size=VOCAB, n_positions=16, pad_token_id=PAD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = _data(8, seed=2, low=3, high=10) + [torch.randint(1, VOCAB, (20,))]
    with pytest.raises(ValueError, match="Example 8 of the training data has 20 tokens.*16 positions.*max_length=16"):
        test_fine_tuning(model, model.config, train, VAL[:2], n_epochs=1, progress=False, save_plots=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unexpected_error_mid_epoch_keeps_the_steps_done_in_the_csv(tmp_path):
    class Breaking(TinyCausalLM):
        calls = 0

        def forward(self, idx):
            if self.training:
                Breaking.calls += 1
                if Breaking.calls == 4:
                    raise RuntimeError("a bug in the user's model")
            return super().forward(idx)

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="a bug"):
        _run(tmp_path, model=Breaking(vocab_size=VOCAB), n_epochs=1, log_every=10)
    assert len(__import__("pandas").read_csv(tmp_path / "metrics_steps.csv")) == 3


# 8. The rest ---------------------------------------------------------------------------------------------------
def test_ctrl_c_while_wandb_closes_still_returns_the_results(tmp_path):
    with mock.patch("utils.tier3_training_utilities.wandb") as wandb:
        wandb.init.return_value.finish.side_effect = KeyboardInterrupt
        with pytest.warns(UserWarning, match="interrupted while closing"):
            result = _run(tmp_path, n_epochs=1, use_wandb=True)
    assert result["final_val_loss"] is not None


def test_step_and_epoch_throughput_have_distinct_names(tmp_path):
    result = _run(tmp_path, n_epochs=1)
    assert "train/step_real_tokens_per_sec" in result["steps_summary"].columns
    assert "train/real_tokens_per_sec" not in result["steps_summary"].columns
    assert "train/real_tokens_per_sec" in result["metrics_summary"].columns


def test_rerunning_a_finished_run_returns_its_best_checkpoint(tmp_path):
    first = _run(tmp_path, checkpoint_every=3)
    again = _run(tmp_path, checkpoint_every=3, resume_from_checkpoint=True)
    assert first["best_checkpoint"] and again["best_checkpoint"] == first["best_checkpoint"]
    assert again["global_step"] == first["global_step"]
