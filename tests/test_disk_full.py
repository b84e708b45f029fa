"""A disk that fills during a checkpoint write (issue 47): the error names the folder that is full (staging or
output_dir) and the bytes the checkpoint needs, not torch's "[enforce fail at inline_container.cc] unexpected pos".
The disks are small tmpfs mounts (root only; skipped with the reason elsewhere)."""
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.checkpoints import CheckpointWriteError

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0)
TRAIN, VAL = random_lines(20, seed=1), random_lines(8, seed=2)


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: room for a run's metrics files, not for a checkpoint of TinyCausalLM and its AdamW state."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (root only): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _train(output_dir, asynchronous=True, **options):
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=VOCAB)
    needed = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # weights + AdamW's two moments
    with pytest.raises(CheckpointWriteError) as failed:
        test_fine_tuning(model, CONFIG, TRAIN, VAL, n_epochs=1, batch_size=4, checkpoint_every=2, progress=False,
                         save_plots=False, output_dir=str(output_dir), async_checkpoints=asynchronous, **options)
    message = str(failed.value)
    assert "inline_container" not in message and "unexpected pos" not in message, message
    stated = re.search(r"needs about ([\d,]+) bytes", message)
    assert stated, message
    assert needed <= int(stated.group(1).replace(",", "")) <= 2 * needed, message
    return message


@pytest.mark.parametrize("asynchronous", [True, False])
def test_a_full_staging_disk_is_named_with_the_bytes_needed(tmp_path, small_disk, asynchronous):
    staging = small_disk / "staging"
    message = _train(tmp_path / "run", asynchronous, checkpoint_staging_dir=str(staging))
    # The run's own folder inside the staging folder (one per output_dir).
    assert re.search(rf"the disk holding {re.escape(str(staging))}/\w+ is full", message), message
    assert "checkpoint_staging_dir" in message, message
    assert str(tmp_path / "run") not in message.split(" is full")[1], message  # the advice is about staging


def test_a_full_output_dir_disk_is_named_with_the_bytes_needed(small_disk):
    run = small_disk / "run"
    message = _train(run, checkpoint_staging_dir=None)
    assert f"the disk holding {run / 'checkpoints'} is full" in message, message
    assert "keep_checkpoints" in message and "checkpoint_staging_dir" not in message, message
