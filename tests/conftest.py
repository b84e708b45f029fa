import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_SILENT", "true")
# W&B waits 30 s for its service process and 90 s for init by default; on 2 loaded cores a resumed run's start
# took longer and W&B turned itself off (the run then had no run file). Generous limits for the tests.
os.environ.setdefault("WANDB__SERVICE_WAIT", "300")
os.environ.setdefault("WANDB_INIT_TIMEOUT", "300")


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Runs write their default output_dir under the working directory: keep that in a temp dir."""
    monkeypatch.chdir(tmp_path)
