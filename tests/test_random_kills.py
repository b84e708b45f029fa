"""SIGKILL at random moments (during steps, validation and checkpoint writes), resume each time: the run ends
bit-identical to an uninterrupted one. TIER3_KILLS sets the number of kills (default 6; the hostile review used 56).

Every other attempt kills inside a background checkpoint write (at a random file operation of the writer thread),
and every other pair stages checkpoints in a local folder first, so kills also land in the copy to output_dir.
After each kill every step folder left must be intact and the newest must not be older than before the attempt."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.training.checkpoints import checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")
SETTINGS = {"n_epochs": 5, "checkpoint_every": 1, "keep_checkpoints": 2}


def _start(mode, out_dir, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), mode, str(out_dir), json.dumps(dict(SETTINGS, **extra))],
                            cwd=out_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _newest_intact_step(checkpoints_dir):
    """The newest step folder; every step folder there must verify (sizes and sha256): a kill damages none."""
    folders = checkpoint.step_folders(checkpoints_dir)
    for folder in folders:
        checkpoint.verify_folder(folder)
    return int(folders[0].name[len(checkpoint.STEP_PREFIX):]) if folders else 0


def test_random_sigkills_resume_to_the_uninterrupted_run(tmp_path):
    _soak(tmp_path, int(os.environ.get("TIER3_KILLS", "6")))


def test_random_sigkills_of_a_model_whose_forward_changes_its_state(tmp_path):
    """Issue 47: the background copy of the weights overlaps the next forward; a forward that changes a frozen
    parameter (an EMA), a buffer or a trained parameter in place once got the next step's values into a checkpoint
    (3 of 8 resumes differed). TIER3_FORWARD_WRITE_KILLS sets the number of kill attempts (default 3; the target
    is 8)."""
    # Kills early in the window: with few attempts, a first run that outlived its kill would finish the training and
    # leave the others nothing to kill.
    _soak(tmp_path, int(os.environ.get("TIER3_FORWARD_WRITE_KILLS", "3")), window=(0.2, 0.6),
          model_kind="forward_writes")


def _soak(tmp_path, attempts, window=(0.5, 1.0), **model):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    started = time.perf_counter()
    assert _start("full", reference_dir, **model).wait(timeout=300) == 0
    full_run_seconds = time.perf_counter() - started
    rng = random.Random(int(os.environ.get("TIER3_KILL_SEED", "0")))
    kills, newest = 0, 0
    for attempt in range(attempts):
        staging = {"checkpoint_staging_dir": str(tmp_path / "staging")} if attempt % 4 >= 2 else {}
        if attempt % 2:  # inside the writer: ~10-20 file operations per checkpoint, so within the first few
            process = _start("resume", killed_dir, kill_inside_checkpoint_write=True,
                             kill_at_operation=rng.randint(1, 60), **staging, **model)
            process.wait(timeout=300)
            assert process.returncode in (0, -signal.SIGKILL), process.stderr.read()[-2000:]
            kills += process.returncode == -signal.SIGKILL
        else:
            process = _start("resume", killed_dir, **staging, **model)
            try:
                process.wait(timeout=rng.uniform(*window) * full_run_seconds)  # python start-up is part of the window
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
            else:
                assert process.returncode == 0, process.stderr.read()[-2000:]
        now = _newest_intact_step(killed_dir / "run" / "checkpoints")
        assert now >= newest, f"attempt {attempt}: the newest checkpoint went back from step {newest} to {now}"
        newest = now
    final = _start("resume", killed_dir, **model)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    assert kills >= 1
    reference = json.loads((reference_dir / "full.json").read_text())
    resumed = json.loads((killed_dir / "resume.json").read_text())
    assert resumed["loss_history"] == reference["loss_history"]
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    assert resumed["epochs"] == reference["epochs"]
    weights = torch.load(killed_dir / "resume-weights.pt")
    for key, value in torch.load(reference_dir / "full-weights.pt").items():
        assert torch.equal(weights[key], value), key
