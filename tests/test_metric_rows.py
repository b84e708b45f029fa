"""Metric rows live in the metrics files, not in the checkpoints (issue 34): a checkpoint records how far the rows go,
a resume reads the CSVs back to that point and cuts what a killed run wrote after it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

import rows_worker
from utils.tier3_training_utilities import test_fine_tuning

WORKER = Path(rows_worker.__file__)


def _worker(mode, out_dir, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), mode, str(out_dir), json.dumps(kill_at)], cwd=out_dir, env=env,
                          capture_output=True, text=True, timeout=300)


def _csvs(run_dir):
    """The three CSVs without their timing columns (seconds differ between runs)."""
    frames = {}
    for name in ("metrics_steps.csv", "metrics_evals.csv", "metrics_epochs.csv"):
        frame = pd.read_csv(run_dir / name, float_precision="round_trip")
        frames[name] = frame.drop(columns=[c for c in rows_worker.TIMING if c in frame])
    return frames


def test_a_run_killed_after_later_rows_were_written_resumes_with_every_row_once(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    assert _worker("full", full).returncode == 0
    # Killed in step 25: the newest checkpoint is step 20 (after its evaluation), and the evaluation at step 24 has
    # written step rows 21-24 and its own row after it.
    done = _worker("killed", killed, kill_at=25)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    steps_csv = killed / "run" / "metrics_steps.csv"
    assert pd.read_csv(steps_csv)["step"].max() == 24
    with open(steps_csv, "a") as handle:
        handle.write("25,2,3.1")  # and a line torn by a kill in the middle of an append
    done = _worker("resume", killed)
    assert done.returncode == 0, done.stderr[-3000:]
    reference, resumed = (json.loads((d / f"{m}.json").read_text()) for d, m in ((full, "full"), (killed, "resume")))
    assert resumed["resumed_from_step"] == 20
    expected, got = _csvs(full / "run"), _csvs(killed / "run")
    assert got["metrics_steps.csv"]["step"].tolist() == list(range(1, 31))  # every step once
    assert got["metrics_evals.csv"]["step"].tolist() == [4, 8, 12, 16, 20, 24, 28]
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame, check_exact=True, obj=name)
    # The results are built from the rows read back: bit-identical to the uninterrupted run (same process kind).
    for key in ("loss_history", "steps_summary", "metrics_summary"):
        assert resumed[key] == reference[key], key
    history = json.loads((killed / "run" / "metrics_history.json").read_text())
    assert [r["step"] for r in history["steps"]] == list(range(1, 31)) and len(history["evals"]) == 7


def _newest_checkpoint(run_dir, step):
    folder = run_dir / "checkpoints" / f"step-{step}"
    return (folder / "trainer_state.pt").stat().st_size, sum(p.stat().st_size for p in folder.iterdir())


# Before the rows left the checkpoints, trainer_state.pt grew ~64 bytes a step from 21.5 kB at step 100 (340 kB at
# step 5000); 2x was passed near step 440.
LONG_STEPS = 5000


def test_a_checkpoint_after_many_steps_is_at_most_twice_the_size_of_one_after_100(tmp_path):
    vocab = 16
    g = torch.Generator().manual_seed(0)
    lines = [torch.randint(1, vocab, (4,), generator=g) for _ in range(LONG_STEPS)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))  # forward(ids) -> logits
    # One torch thread, as every test (tests/conftest.py): 5000 steps of tiny tensors took 60-76 s on a 2-thread pool.
    result = test_fine_tuning(model, SimpleNamespace(vocab_size=vocab, pad_token_id=0), lines, lines[:4],
                              n_epochs=1, batch_size=1, shuffle=False, max_steps=LONG_STEPS, checkpoint_every=100,
                              keep_checkpoints=LONG_STEPS // 100, log_every=100, progress=False, save_plots=False,
                              output_dir=str(tmp_path))
    assert result["global_step"] == LONG_STEPS
    (state_100, folder_100), (state_long, folder_long) = (_newest_checkpoint(tmp_path, s) for s in (100, LONG_STEPS))
    assert state_long <= 2 * state_100 and folder_long <= 2 * folder_100, (state_100, state_long, folder_100,
                                                                           folder_long)
    assert len(pd.read_csv(tmp_path / "metrics_steps.csv")) == LONG_STEPS  # the rows are in the metrics files instead
