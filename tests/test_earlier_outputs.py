"""Nothing of an earlier run is overwritten silently (issue 45): running the same fresh cell twice into one
output_dir keeps every file of the first run, moved aside, and says where."""
from pathlib import Path
from types import SimpleNamespace

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning

CONFIG = SimpleNamespace(vocab_size=50, pad_token_id=0, max_position_embeddings=128)


def _run(output_dir, seed, **extra):
    lines = random_lines(16, seed=seed, low=4, high=12)
    return test_fine_tuning(TinyCausalLM(), CONFIG, lines, lines[:4], n_epochs=1, batch_size=4, progress=False,
                            output_dir=str(output_dir), random_seed=seed, **extra)


def test_running_the_same_cell_twice_loses_none_of_the_first_runs_files(tmp_path, capsys):
    first = _run(tmp_path, seed=1)
    assert first["earlier_outputs_moved_to"] is None
    names = ["metrics_epochs.csv", "metrics_steps.csv", "metrics_history.json", "loss_and_perplexity.png",
             "learning_rate_and_grad_norm.png"]
    before = {name: (tmp_path / name).read_bytes() for name in names}
    second = _run(tmp_path, seed=2)
    moved = Path(second["earlier_outputs_moved_to"])
    assert moved.parent == tmp_path / "earlier_runs"
    assert {name: (moved / name).read_bytes() for name in names} == before  # every byte of the first run kept
    assert (tmp_path / "metrics_epochs.csv").read_bytes() != before["metrics_epochs.csv"]  # the second run's own
    assert f"moved to {moved}" in capsys.readouterr().out
    third = _run(tmp_path, seed=3, save_plots=False)  # a third run keeps the second's beside the first's
    assert len(list((tmp_path / "earlier_runs").iterdir())) == 2 and third["earlier_outputs_moved_to"] != str(moved)


def test_a_resumed_run_keeps_its_own_files_in_place(tmp_path):
    _run(tmp_path, seed=1, checkpoint_every=2, save_plots=False)
    resumed = _run(tmp_path, seed=1, checkpoint_every=2, resume_from_checkpoint=True, max_steps=6, save_plots=False)
    assert resumed["resumed_from_step"] is not None and resumed["earlier_outputs_moved_to"] is None
    assert not (tmp_path / "earlier_runs").exists()
