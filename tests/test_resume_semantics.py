"""Runs that continue as asked (issue 36): max_steps raised, lowered or equal on resume; checkpoints of another
format version; how a run ended, named for what it means."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.outcome import Outcome, OutcomeKind

META_KEY = "format_version"  # utils.training.checkpoints.META_KEY (spelled out: the test must run on older code)

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0)
# 40 lines at batch 4: about 10 token-budget steps an epoch, so max_steps=4 ends the run inside epoch 1 and
# max_steps=14 inside epoch 2.
BASE = dict(batch_size=4, shuffle=True, learning_rate=3e-3, progress=False, save_plots=False, n_epochs=1)


def _run(output_dir, max_steps, seed_model=True, train=None, **keywords):
    torch.manual_seed(0)  # the initial weights; a resume replaces them from the checkpoint
    model = TinyCausalLM(vocab_size=VOCAB)
    result = test_fine_tuning(model, CONFIG, train or random_lines(40, seed=1), random_lines(8, seed=2),
                              output_dir=str(output_dir), max_steps=max_steps, resume_from_checkpoint=True,
                              **dict(BASE, **keywords))
    return result, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A run ended by max_steps=4 inside its first epoch (constant rate: the schedule does not depend on max_steps)."""
    folder = tmp_path_factory.mktemp("cut") / "run"
    result, _ = _run(folder, 4, lr_schedule="constant", warmup_steps=0)
    assert result["global_step"] == 4
    return folder


def _copy(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


def test_raising_max_steps_continues_to_the_new_total_as_one_run(cut_run, tmp_path):
    reference, reference_weights = _run(tmp_path / "fresh", 14, lr_schedule="constant", warmup_steps=0)
    resumed, weights = _run(_copy(cut_run, tmp_path), 14, lr_schedule="constant", warmup_steps=0)
    assert resumed["resumed_from_step"] == 4 and resumed["global_step"] == 14
    # The epoch max_steps had cut is continued, not restarted: the same steps as the uninterrupted 14-step run
    # (same ops, same kernels, same process: bit-identical).
    assert resumed["loss_history"] == reference["loss_history"]
    assert list(resumed["metrics_summary"]["epoch"]) == list(reference["metrics_summary"]["epoch"]) == [1, 2]
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), name
    assert resumed["completed"]


def test_raising_max_steps_rebuilds_the_schedule_for_the_new_total(tmp_path):
    first, _ = _run(tmp_path / "run", 4, lr_schedule="cosine", warmup_steps=2)
    resumed, _ = _run(tmp_path / "run", 14, lr_schedule="cosine", warmup_steps=2)
    assert resumed["global_step"] == 14
    rates = list(resumed["steps_summary"]["train/learning_rate"])
    assert rates[:4] == list(first["steps_summary"]["train/learning_rate"])  # the steps already trained are kept
    for step in range(4, 14):  # every later step follows the cosine over 14 steps (optim.build_scheduler's formula)
        expected = BASE["learning_rate"] * 0.5 * (1 + math.cos(math.pi * (step - 2) / (14 - 2)))
        assert rates[step] == pytest.approx(expected, rel=1e-6), step


def test_lowering_max_steps_below_the_steps_trained_is_refused_naming_both(cut_run, tmp_path):
    folder = _copy(cut_run, tmp_path)
    with pytest.raises(ValueError, match=r"optimizer step 4, past max_steps=3 .*max_steps >= 4"):
        _run(folder, 3, lr_schedule="constant", warmup_steps=0)
    assert not (folder / "checkpoints" / "step-3").exists()


def test_a_finished_run_resumed_with_the_same_max_steps_says_it_is_complete(cut_run, tmp_path, capsys):
    capsys.readouterr()
    again, _ = _run(_copy(cut_run, tmp_path), 4, lr_schedule="constant", warmup_steps=0)
    said = capsys.readouterr().out
    assert again["already_complete"] and again["completed"] and again["outcome"].kind is OutcomeKind.COMPLETED
    assert again["global_step"] == 4 and len(again["metrics_summary"]) == 1
    assert said.count("Nothing to train") == 1 and "max_steps=4" in said


def _meta_path(folder):
    return max((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])) / "meta.json"


@pytest.mark.parametrize("version", ["none", "newer"])
def test_a_checkpoint_of_another_format_is_refused_naming_both_versions(cut_run, tmp_path, version):
    folder = _copy(cut_run, tmp_path)
    meta_path = _meta_path(folder)
    meta = json.loads(meta_path.read_text())
    current = meta.get(META_KEY)
    assert isinstance(current, int)  # every checkpoint records its format
    version = None if version == "none" else current + 1
    if version is None:
        del meta[META_KEY]  # as every checkpoint written before formats were recorded
    else:
        meta[META_KEY] = version
    meta.pop("meta_sha256", None)  # as a checkpoint written by that version would be: not sealed the way 3 seals
    meta_path.write_text(json.dumps(meta))
    other = f"format {version}" if version else "format 1"
    # Other training data too: the format is named, not the data (fingerprints compare only within a format).
    with pytest.raises(ValueError, match=rf"{other}.*reads checkpoint format {current}") as refused:
        _run(folder, 8, lr_schedule="constant", warmup_steps=0, train=random_lines(40, seed=5))
    assert "different training data" not in str(refused.value)


def test_outcome_properties_say_what_they_mean(tmp_path):
    interrupted = Outcome(OutcomeKind.INTERRUPTED, "interrupted (KeyboardInterrupt)")
    assert not interrupted.completed and interrupted.ended_early and not interrupted.stopped_by_early_stopping
    assert interrupted.stopped_early  # the previous name keeps its meaning for callers of results["stopped_early"]
    early = Outcome(OutcomeKind.STOPPED_EARLY, "early stopping")
    assert early.stopped_by_early_stopping and early.ended_early and not early.completed
    keys = interrupted.as_result_keys()
    assert keys["completed"] is False and keys["stopped_early"] is True and keys["interrupted"] is True
    torch.manual_seed(0)
    stopped = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, random_lines(16, seed=1),
                               random_lines(8, seed=2), n_epochs=10, learning_rate=0.0, early_stopping_patience=1,
                               progress=False, save_plots=False, output_dir=str(tmp_path / "run"))
    assert stopped["outcome"].stopped_by_early_stopping and not stopped["completed"] and stopped["stopped_early"]
