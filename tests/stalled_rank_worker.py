"""Run by tests/test_waits.py under torchrun (2 processes, gloo): rank 1 stops itself with SIGSTOP right after its
optimizer step ``STOP_AFTER`` (a frozen process: no exit, no error, its sockets open), and rank 0 reports what
``test_fine_tuning`` raised and when, in OUT_DIR/rank0.json. Rank 1's pid and the time it stopped go to
OUT_DIR/rank1.json, so that the test can end it (torchrun cannot stop a stopped process by SIGTERM)."""
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyCausalLM, random_lines  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

STOP_AFTER = 6


def stop_after(steps: int, out_dir: str) -> None:
    done = []

    def after_step(optimizer, args, kwargs):
        done.append(1)
        if len(done) == steps:
            Path(out_dir, "rank1.json").write_text(json.dumps({"pid": os.getpid(), "stopped_at": time.time()}))
            os.kill(os.getpid(), signal.SIGSTOP)

    register_optimizer_step_post_hook(after_step)


def main(out_dir: str, timeout_minutes: float) -> None:
    rank = int(os.environ["RANK"])
    if rank == 1:
        stop_after(STOP_AFTER, out_dir)
    torch.manual_seed(0)
    try:
        # 96 lines, 2 per process and step: 24 steps; checkpoints every 2 steps.
        test_fine_tuning(TinyCausalLM(vocab_size=50), SimpleNamespace(vocab_size=50, pad_token_id=0),
                         random_lines(96), random_lines(8, seed=1), n_epochs=1, batch_size=2, shuffle=False,
                         group_by_length=False, checkpoint_every=2, keep_checkpoints=10, progress=False,
                         save_plots=False, process_timeout_minutes=timeout_minutes, output_dir=f"{out_dir}/run")
        report = {"error": None}
    except Exception as error:  # noqa: BLE001 - reported to the test
        report = {"error": type(error).__name__, "message": str(error)}
    report["time"] = time.time()
    if rank == 0:
        Path(out_dir, "rank0.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
