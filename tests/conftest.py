import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Runs write their default output_dir under the working directory: keep that in a temp dir."""
    monkeypatch.chdir(tmp_path)
