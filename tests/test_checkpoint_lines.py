"""Lines of training (issue 47): a resume from a checkpoint older than the newest starts a new line; pruning and
resume_from_checkpoint=True follow it, and the abandoned continuation's folders are kept aside, not mixed in.

Every run is a fresh worker process (tests/resume_worker.py), so the resumed new line and the uninterrupted one are
compared bit for bit (same operations, same kernels, same kind of process)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.training.checkpoints import step_folders

WORKER = Path(__file__).with_name("resume_worker.py")
OLD_LINE = dict(n_epochs=4, checkpoint_every=2, keep_checkpoints=20)
# Another n_epochs: another cosine schedule, so the new line's weights differ from the abandoned line's.
NEW_LINE = dict(n_epochs=5, checkpoint_every=3, keep_checkpoints=2)
FROM_STEP = 2


def _run(mode, out_dir, **settings):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(WORKER), mode, str(out_dir), json.dumps(settings)], cwd=out_dir,
                          env=env, capture_output=True, text=True, timeout=300)
    return done


def _steps(checkpoints_dir):
    return sorted(int(f.name.split("-")[1]) for f in step_folders(checkpoints_dir))


def test_a_resume_from_an_older_checkpoint_starts_a_line_that_pruning_and_resume_follow(tmp_path):
    lines, reference = tmp_path / "lines", tmp_path / "reference"
    lines.mkdir()
    assert _run("full", lines, **OLD_LINE).returncode == 0
    checkpoints = lines / "run" / "checkpoints"
    old_steps = _steps(checkpoints)
    assert old_steps[0] == FROM_STEP and old_steps[-1] > 12  # newer than anything the new line reaches
    shutil.copytree(lines, reference)  # the same start for the uninterrupted new line

    # The new line: from step-2 with step-4 ... step-N of the old line present; SIGKILLed at its 11th step.
    started = time.time()
    start_from = str(checkpoints / f"step-{FROM_STEP}")
    killed = _run("killed", lines, resume_from_checkpoint=start_from, **NEW_LINE)
    assert killed.returncode == -9, killed.stderr[-2000:]
    kept = step_folders(checkpoints)
    # keep_checkpoints=2 kept the new line's two newest: none of them was pruned for the abandoned line's.
    assert len(kept) == 2 and all((f / "meta.json").stat().st_mtime >= started for f in kept), _steps(checkpoints)
    assert "new line of training" in killed.stdout
    new_line_newest = _steps(checkpoints)[-1]
    aside = [p for p in checkpoints.iterdir() if p.name.startswith("abandoned-after-step-2")]
    assert len(aside) == 1 and sorted(int(p.name.split("-")[1]) for p in aside[0].glob("step-*")) == old_steps[1:]

    # resume_from_checkpoint=True continues the new line: equal to the new line run without interruption.
    resumed = _run("resume", lines, **NEW_LINE)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = _run("uninterrupted", reference, resume_from_checkpoint=str(
        reference / "run" / "checkpoints" / f"step-{FROM_STEP}"), **NEW_LINE)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    resumed_summary = json.loads((lines / "resume.json").read_text())
    reference_summary = json.loads((reference / "uninterrupted.json").read_text())
    assert resumed_summary["resumed_from_step"] == new_line_newest
    assert resumed_summary["final_val_loss"] == reference_summary["final_val_loss"]
    assert resumed_summary["loss_history"] == reference_summary["loss_history"]
    weights = torch.load(lines / "resume-weights.pt")
    for name, value in torch.load(reference / "uninterrupted-weights.pt").items():
        assert torch.equal(weights[name], value), name
