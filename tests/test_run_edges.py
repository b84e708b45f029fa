"""Issue 47, the edges of a run: a loss scale that does not depend on log_every, tampered or unreadable meta.json
named as such, a deleted output_dir recreated with a warning, a damaged only checkpoint named and kept aside."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
TRAIN, VAL = random_lines(20, seed=1), random_lines(8, seed=2)
QUIET = dict(progress=False, save_plots=False)


class InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class OverflowThenNaN(nn.Module):
    """Training forward ``overflow_at`` gets an infinite gradient (fp16: skipped, scale halved, training goes on);
    from training forward ``nan_from`` on every loss is NaN (the run stops at the first)."""

    def __init__(self, overflow_at, nan_from):
        super().__init__()
        torch.manual_seed(0)
        self.lm, self.overflow_at, self.nan_from, self.calls = TinyCausalLM(vocab_size=VOCAB), overflow_at, nan_from, 0

    def forward(self, idx):
        logits = self.lm(idx)
        if not self.training:
            return logits
        self.calls += 1
        if self.calls == self.overflow_at:
            return InfGradient.apply(logits)
        return logits * float("nan") if self.nan_from is not None and self.calls >= self.nan_from else logits


def _fp16_run(nan_from, **options):
    return test_fine_tuning(OverflowThenNaN(2, nan_from), CONFIG, TRAIN, VAL,
                            **dict(n_epochs=3, batch_size=4, learning_rate=3e-3, shuffle=False, precision="fp16",
                                   **QUIET, **options))


def test_final_loss_scale_is_the_last_applied_steps_whatever_log_every():
    nan_from = 7  # optimizer step 7 (one micro-batch a step); steps 1-6 applied except the overflowed step 2
    # Independent: the same run ended as planned after step 6, reporting the scale its last update left.
    planned = _fp16_run(None, max_steps=nan_from - 1)
    assert planned["completed"] and planned["final_loss_scale"] == 65536.0 / 2  # halved once, at step 2
    for log_every in (1, 10):
        stopped = _fp16_run(nan_from, log_every=log_every)
        assert stopped["non_finite"] and stopped["global_step"] == nan_from - 1, log_every
        assert stopped["final_loss_scale"] == planned["final_loss_scale"], log_every


def _train_tiny(output_dir, **options):
    torch.manual_seed(0)
    return test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, TRAIN, VAL,
                            **dict(dict(n_epochs=1, batch_size=4, learning_rate=3e-3, checkpoint_every=2,
                                        keep_checkpoints=3, output_dir=str(output_dir)), **QUIET, **options))


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("made") / "run"
    _train_tiny(folder)
    return folder


def _newest(run_dir):
    return max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _edit_meta(folder, seal, **changes):
    path = folder / "meta.json"
    meta = json.loads(path.read_text())
    if not seal:
        meta.pop("meta_sha256", None)  # as meta.json was before it was sealed (format 2 and older)
    for key, value in changes.items():
        if isinstance(value, dict):
            meta[key] = dict(meta[key], **value)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("change", [{"format_version": None}, {"format_version": "abc"}, {"best_val_loss": 0.5},
                                    {"settings": {"n_epochs": 3}}])
def test_an_edited_meta_json_is_named_as_tampered(made_run, tmp_path, change):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=True, **change)
    with pytest.raises(ValueError, match=r"meta\.json.*tampered"):
        _train_tiny(run, resume_from_checkpoint=str(folder))


@pytest.mark.parametrize("value", [None, "abc"])
def test_an_unreadable_format_version_of_an_unsealed_meta_json_is_named(made_run, tmp_path, value):
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=False, format_version=value)
    with pytest.raises(ValueError, match=rf"{folder}/meta\.json records format_version={value!r}.*tampered"):
        _train_tiny(run, resume_from_checkpoint=True)


def test_a_format_2_checkpoint_still_resumes(made_run, tmp_path):
    """Format 3 only added meta.json's seal: a format 2 meta.json (unsealed) is read as before."""
    run = tmp_path / "run"
    shutil.copytree(made_run, run)
    folder = _newest(run)
    _edit_meta(folder, seal=False, format_version=2)
    result = _train_tiny(run, resume_from_checkpoint=str(folder), n_epochs=2)
    assert result["resumed_from_checkpoint"] == str(folder) and result["completed"]
