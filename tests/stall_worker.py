"""Run by tests/test_waits.py: a run whose checkpoint writes stall, as on a network mount that hangs.

The stall is real blocking, not a replaced function: an audit hook (``sys.addaudithook``, Python's own hook on
every ``open()``) holds the writer thread inside its ``open()`` of a checkpoint file for the number of seconds
given per step, as a hung Google Drive mount holds it inside the system call. The package's code runs unchanged.
Markers ``STALL step-N <monotonic time>`` on stderr tell the test when each stall began.

Usage: stall_worker.py OUT_DIR STEP=SECONDS [STEP=SECONDS ...]; the results (or the error) go to OUT_DIR/result.json.
When they name a write still pending, the same call with ``resume_from_checkpoint=True`` follows in the same
process (OUT_DIR/resumed.json).
"""
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyCausalLM, random_lines  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402


def stall_checkpoint_writes(seconds_by_step: dict[int, float]) -> None:
    stalled = set()
    guard = threading.Lock()

    def hook(event, args):
        if event != "open" or not isinstance(args[0], (str, Path)):
            return
        path = str(args[0])
        for step, seconds in seconds_by_step.items():
            if f"/.tmp-step-{step}/" in path:
                with guard:
                    if step in stalled:
                        return
                    stalled.add(step)
                print(f"STALL step-{step} {time.monotonic()}", file=sys.stderr, flush=True)
                time.sleep(seconds)

    sys.addaudithook(hook)


def run(out_dir: str, **options) -> dict:
    torch.manual_seed(0)
    try:
        # 32 lines, batch 4, one epoch: 8 steps; checkpoints at steps 2, 4, 6 and the epoch's end (8).
        result = test_fine_tuning(TinyCausalLM(vocab_size=50), SimpleNamespace(vocab_size=50, pad_token_id=0),
                                  random_lines(32), random_lines(8, seed=1), n_epochs=1, batch_size=4,
                                  shuffle=False, checkpoint_every=2, keep_checkpoints=10, progress=False,
                                  save_plots=False, output_dir=f"{out_dir}/run", **options)
        return {k: result[k] for k in ("completed", "interrupted", "global_step", "last_checkpoint",
                                       "checkpoint_error", "checkpoint_pending", "final_val_loss",
                                       "resumed_from_step")}
    except BaseException as error:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(error).__name__}: {error}"}


def main(out_dir: str, stalls: list[str]) -> None:
    stall_checkpoint_writes({int(step): float(seconds) for step, seconds in (s.split("=") for s in stalls)})
    first = run(out_dir)
    Path(out_dir, "result.json").write_text(json.dumps(first))
    print("RESULT WRITTEN", flush=True)
    if first.get("checkpoint_pending"):
        # A notebook's next call in the same process, while the write that Ctrl-C stopped waiting for goes on.
        Path(out_dir, "resumed.json").write_text(json.dumps(run(out_dir, resume_from_checkpoint=True)))
        print("RESUMED WRITTEN", flush=True)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
