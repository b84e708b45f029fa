import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_SILENT", "true")
# W&B waits 30 s for its service process and 90 s for init by default; on 2 loaded cores a resumed run's start
# took longer and W&B turned itself off (the run then had no run file). Generous limits for the tests.
os.environ.setdefault("WANDB__SERVICE_WAIT", "300")
os.environ.setdefault("WANDB_INIT_TIMEOUT", "300")

# A fixture for every module that asks for it. Imported here, not in the test module: there the test's
# parameter of the same name would redefine the import (F811).
from postgres import postgres_url  # noqa: F401

# The tests' models are tiny: an intra-op thread pool only adds waits (on 2 loaded cores a 2-thread pool waits for
# preempted threads: tests/test_fine_tuning.py + test_loss.py took 19-25 s with it, 7 s without). The workers the
# tests start run with OMP_NUM_THREADS=1 (the notebook's kernel and the README snippet's process too), so
# in-process and worker runs use one thread alike.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Runs write their default output_dir under the working directory: keep that in a temp dir."""
    monkeypatch.chdir(tmp_path)


# Modules whose assertions compare floats with an independent computation or claim bit-identity. `bash
# scripts/test.sh` runs them a second time under torch's portable kernels (ATEN_CPU_CAPABILITY=default): torch
# picks its float32 kernels per instruction set, and a tolerance that holds on one CPU must hold on every CPU.
NUMERICS_MODULES = {"test_loss", "test_memory_lean_loss", "test_accumulation", "test_input_forms", "test_fine_tuning",
                    "test_real_text", "test_large_data", "test_conformance", "test_checkpoints", "test_bits_per_byte"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)
