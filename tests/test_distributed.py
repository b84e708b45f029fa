"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch (issue 4)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(command, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    _run([sys.executable, str(WORKER), str(single), "8"], single)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(WORKER),
          str(multi), "4"], multi)
    return single, multi


@pytest.mark.parametrize("name", ["ordered", "shuffled_lines", "shuffled_grouped"])
def test_two_processes_equal_one_process(runs, name):
    single, multi = runs
    alone = json.loads((single / f"{name}-rank0.json").read_text())
    ranks = [json.loads((multi / f"{name}-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank returns the same metrics
    assert ranks[0]["val_real_tokens"] == alone["val_real_tokens"]  # the odd validation set is not double counted
    assert ranks[0]["final_val_loss"] == pytest.approx(alone["final_val_loss"], rel=1e-5)
    assert ranks[0]["loss_history"] == pytest.approx(alone["loss_history"], rel=1e-5)
    weights_alone = torch.load(single / f"{name}-weights.pt")
    weights_multi = torch.load(multi / f"{name}-weights.pt")
    for key, value in weights_alone.items():
        torch.testing.assert_close(weights_multi[key], value, rtol=1e-5, atol=1e-6)


def test_only_rank_zero_writes_files(runs):
    _, multi = runs
    assert (multi / "ordered-run" / "metrics_epochs.csv").exists()
    assert len(list(multi.glob("ordered-run*"))) == 1


def test_checkpoint_and_resume_under_torchrun(runs):
    single, multi = runs
    uninterrupted = json.loads((multi / "shuffled_grouped-rank0.json").read_text())
    ranks = [json.loads((multi / f"resumed-rank{r}.json").read_text()) for r in (0, 1)]
    # The epoch-end checkpoint was removed: the resume starts one step before the end of epoch 1.
    assert ranks[0] == ranks[1] and ranks[0]["resumed_from_step"] == uninterrupted["epoch_steps"][0] - 1 > 0
    assert ranks[0]["loss_history"] == uninterrupted["loss_history"]
    assert ranks[0]["final_val_loss"] == uninterrupted["final_val_loss"]
    weights = torch.load(multi / "resumed-weights.pt")
    for key, value in torch.load(multi / "shuffled_grouped-weights.pt").items():
        assert torch.equal(weights[key], value), key
    # After the resume: the two epoch ends remain, the mid-epoch one was pruned (keep 2); only rank 0 wrote them.
    assert sorted(p.name for p in (multi / "resumed-run" / "checkpoints").iterdir()) == sorted(
        ["best"] + [f"step-{s}" for s in uninterrupted["epoch_steps"]])
